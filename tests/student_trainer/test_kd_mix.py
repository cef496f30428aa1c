"""student_trainer.kd_mix: alpha mixes CE and KD, temperature and re-tempering, and the checks on teacher fields
and kinds."""

from __future__ import annotations

import warnings

import pytest
import torch

from student_trainer import losses as L
from student_trainer.kd_mix import KDConfig, RetemperWarning, kd_loss
from tests.student_trainer.teacher_fields import (
    B,
    CALL,
    K,
    T,
    V,
    all_fields,
    cached_topk,
    gen,
    kl,
    masked_mean,
    random_logits,
    some_mask,
)


# ------------------------------------------------------------------------------------ mixing and temperature


def test_alpha_mixes_cross_entropy_and_kd_linearly():
    z, f, mask = all_fields(14)
    ce = L.cross_entropy(z, f["labels"], mask)
    kd = CALL["fkl_ghost"](z, f, mask)
    mixed = kd_loss(z, mask, KDConfig(kind="fkl_ghost", alpha=0.3), **f)
    torch.testing.assert_close(mixed, 0.3 * ce + 0.7 * kd, rtol=1e-12, atol=1e-12)
    only_ce = kd_loss(z, mask, KDConfig(alpha=1.0), labels=f["labels"])  # no teacher fields needed
    torch.testing.assert_close(only_ce, ce, rtol=1e-12, atol=1e-12)


def test_temperature_divides_student_logits_and_multiplies_kd_by_its_square():
    z, f, mask = all_fields(15)
    cfg = KDConfig(kind="fkl_ghost", alpha=0.2, temperature=2.0, capture_temperature=2.0)
    expected = 0.2 * L.cross_entropy(z, f["labels"], mask) + 0.8 * 4.0 * CALL["fkl_ghost"](z / 2.0, f, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # T == T_c: no re-tempering, no warning
        torch.testing.assert_close(kd_loss(z, mask, cfg, **f), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("capture", "train"), [(1.0, 2.0), (2.0, 1.0)])
def test_retempered_renormalised_top_k_kd_equals_the_dense_kl_at_the_training_temperature(capture, train):
    g = gen(16)
    teacher, z = random_logits(g, B, T, V), random_logits(g, B, T, V)
    mask = some_mask(g, B, T)
    f = cached_topk(torch.log_softmax(teacher / capture, -1), K)
    ids = f["topk_ids"].long()
    p_k = torch.softmax(teacher / train, -1).gather(-1, ids)
    q_k = torch.softmax(z / train, -1).gather(-1, ids)
    expected = train**2 * masked_mean(kl(p_k / p_k.sum(-1, keepdim=True), q_k / q_k.sum(-1, keepdim=True)), mask)
    cfg = KDConfig(kind="fkl_renorm", temperature=train, capture_temperature=capture)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact: no warning
        torch.testing.assert_close(kd_loss(z, mask, cfg, **f), expected, rtol=1e-10, atol=1e-12)


def test_retempering_with_a_tail_bucket_warns_and_keeps_a_normalised_distribution():
    z, f, mask = all_fields(17)
    cfg = KDConfig(kind="fkl_ghost", temperature=2.0, capture_temperature=1.0)
    with pytest.warns(RetemperWarning, match="approximate"):
        kd_loss(z, mask, cfg, **f)
    lp, tail = L.retemper(f["topk_logprobs"], f["tail_logmass"], 0.5)
    total = torch.logsumexp(torch.cat([lp, tail[..., None]], -1), -1)
    torch.testing.assert_close(total, torch.zeros_like(total), rtol=0, atol=1e-12)
    same_lp, same_tail = L.retemper(f["topk_logprobs"], f["tail_logmass"], 1.0)
    torch.testing.assert_close(same_lp, f["topk_logprobs"], rtol=0, atol=1e-12)
    torch.testing.assert_close(same_tail, f["tail_logmass"], rtol=0, atol=1e-12)


def test_rskd_refuses_a_temperature_other_than_the_capture_temperature():
    z, f, mask = all_fields(18)
    with pytest.raises(ValueError, match="capture temperature"):
        kd_loss(z, mask, KDConfig(kind="rskd", temperature=2.0), **f)


def test_kd_loss_names_the_teacher_fields_a_kind_is_missing():
    z, f, mask = all_fields(19)
    with pytest.raises(ValueError, match="sample_ids, sample_counts"):
        kd_loss(z, mask, KDConfig(kind="rskd"), topk_ids=f["topk_ids"])
    with pytest.raises(ValueError, match="labels"):
        kd_loss(z, mask, KDConfig(alpha=0.5), **{k: v for k, v in f.items() if k != "labels"})
    with pytest.raises(ValueError, match="not one of"):  # checked where the kind is looked up
        kd_loss(z, mask, KDConfig(kind="kl"), **f)


