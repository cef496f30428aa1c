"""student_trainer.hidden_align: the hidden projector's loss against its formula, and layer maps."""

from __future__ import annotations

import pytest
import torch

from student_trainer.hidden_align import HiddenProjector, parse_layer_map
from tests.student_trainer.teacher_fields import B, DT, T, gen, some_mask


# ------------------------------------------------------------------------------------ hidden-state alignment


def projector_batch(metric: str):
    g = gen(30)
    proj = HiddenProjector({1: 2, 3: 6}, student_dim=8, teacher_dim=12, metric=metric).double()
    student = tuple(torch.randn(B, T, 8, generator=g, dtype=DT) for _ in range(4))  # hidden_states 0..3
    teacher = {2: torch.randn(B, T, 12, generator=g).half(), 6: torch.randn(B, T, 12, generator=g).half()}
    return proj, student, teacher, some_mask(g, B, T)


def test_hidden_projector_has_one_linear_per_mapped_layer_from_student_to_teacher_width():
    proj, student, teacher, mask = projector_batch("mse")
    assert sorted(proj.proj) == ["1", "3"]
    assert all(lin.weight.shape == (12, 8) and lin.bias.shape == (12,) for lin in proj.proj.values())
    assert proj(student, teacher, mask).shape == ()


@pytest.mark.parametrize("metric", ["mse", "cosine"])
def test_hidden_projector_loss_is_the_mean_over_layers_of_the_masked_distance(metric):
    proj, student, teacher, mask = projector_batch(metric)
    per_layer = []
    for s, t in [(1, 2), (3, 6)]:
        lin = proj.proj[str(s)]
        x, y = student[s] @ lin.weight.T + lin.bias, teacher[t].double()
        if metric == "mse":
            d = ((x - y) ** 2).mean(-1)
        else:
            d = 1 - (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
        per_layer.append(d[mask].mean())
    torch.testing.assert_close(proj(student, teacher, mask), sum(per_layer) / 2, rtol=1e-12, atol=1e-12)
    nothing = proj(student, teacher, torch.zeros(B, T, dtype=torch.bool))
    nothing.backward()
    assert nothing.item() == 0.0 and all((p.grad == 0).all() for p in proj.parameters())


def test_hidden_projector_rejects_an_unknown_metric():
    with pytest.raises(ValueError, match="'mse' or 'cosine'"):
        HiddenProjector({1: 2}, 8, 12, metric="l1")


def test_layer_map_parses_student_teacher_pairs():
    assert parse_layer_map("2:10,4:20", 4, 24) == {2: 10, 4: 20}
    assert parse_layer_map(" 2 : 10 , 4:20 ", 4, 24, available=[10, 20, 24]) == {2: 10, 4: 20}


def test_uniform_layer_map_spreads_student_layers_evenly_and_ends_on_the_last_teacher_layer():
    assert parse_layer_map("uniform", 4, 12) == {1: 3, 2: 6, 3: 9, 4: 12}
    assert parse_layer_map("uniform", 3, 8) == {1: 3, 2: 5, 3: 8}
    m = parse_layer_map("uniform", 24, 36)
    assert list(m) == list(range(1, 25)) and m[24] == 36
    assert all(b > a for a, b in zip(list(m.values()), list(m.values())[1:]))


@pytest.mark.parametrize(("spec", "message"), [
    ("", "is not 'student:teacher'"),
    ("2-10", "'2-10' is not 'student:teacher'"),
    ("a:b", "'a:b' is not 'student:teacher'"),
    ("2:10,", "'' is not 'student:teacher'"),
    ("2:10,2:12", "student layer 2 is mapped twice"),
    ("5:10", r"student layer 5 is outside 0\.\.4"),
    ("2:30", r"teacher layer 30 is outside 0\.\.24"),
    ("-1:3", "is not 'student:teacher'"),
])
def test_bad_layer_maps_raise_a_value_error_that_names_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_layer_map(spec, 4, 24)


def test_layer_map_refuses_teacher_layers_the_cache_does_not_store():
    with pytest.raises(ValueError, match=r"needs teacher layers \[6, 18\]; the cache stores \[12, 24\]"):
        parse_layer_map("uniform", 4, 24, available=[12, 24])
