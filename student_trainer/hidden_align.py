"""Hidden-state alignment: which student layer is matched to which teacher layer (`parse_layer_map`), and the
learned projection and distance between them (`HiddenProjector`). Notation as in student_trainer/losses.py.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from student_trainer.losses import masked_mean, upcast


def parse_layer_map(
    spec: str, student_layers: int, teacher_layers: int, available: Collection[int] | None = None
) -> dict[int, int]:
    """Student layer -> teacher layer, both Hugging Face `hidden_states` indices (0 = embeddings, L = last).

    "2:10,4:20" maps student layer 2 to teacher layer 10 and 4 to 20. "uniform" maps student layers 1..L_s
    evenly onto the teacher's: i -> round(i * L_t / L_s) (half up), so the last maps to the last. `available`
    (the cache's build.hidden_layers), when given, must hold every teacher layer the map uses.
    Raises ValueError naming the offending part.
    """
    text = spec.strip()
    if text == "uniform":
        if student_layers < 1 or teacher_layers < 1:
            raise ValueError(
                f"layer map 'uniform' needs >= 1 layer on each side, got {student_layers} and {teacher_layers}"
            )
        half_up = 2 * student_layers  # round(i * L_t / L_s) in integers, halves rounded up
        mapping = {i: (2 * i * teacher_layers + student_layers) // half_up for i in range(1, student_layers + 1)}
    else:
        mapping = {}
        for piece in text.split(","):
            m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", piece)
            if m is None:
                raise ValueError(
                    f"layer map {spec!r}: {piece!r} is not 'student:teacher'; write e.g. '2:10,4:20' or 'uniform'"
                )
            s, t = int(m[1]), int(m[2])
            if s in mapping:
                raise ValueError(f"layer map {spec!r}: student layer {s} is mapped twice")
            if s > student_layers:
                raise ValueError(f"layer map {spec!r}: student layer {s} is outside 0..{student_layers}")
            if t > teacher_layers:
                raise ValueError(f"layer map {spec!r}: teacher layer {t} is outside 0..{teacher_layers}")
            mapping[s] = t
    if available is not None:
        missing = sorted(set(mapping.values()) - set(available))
        if missing:
            raise ValueError(f"layer map {spec!r} needs teacher layers {missing}; the cache stores {sorted(available)}")
    return mapping


class HiddenProjector(nn.Module):
    """Hidden-state alignment: one learned Linear(H, H_t) per mapped student layer, and its loss.

        loss = mean over (s -> t) in layer_map of  mean_{masked positions} d(W_s h_s + b_s, h_t)
        d = "mse":    mean over H_t of (x - y)^2
        d = "cosine": 1 - x.y / (|x| |y|)

    student_hidden: the student's `hidden_states` (tuple or dict by layer index) of (B, T, H); teacher_hidden:
    dict layer -> (B, T, H_t) as read from the cache (F16/BF16, upcast here); mask (B, T). Returns a scalar;
    0.0 with zero gradient when nothing is masked in.
    """

    def __init__(self, layer_map: Mapping[int, int], student_dim: int, teacher_dim: int, metric: str = "mse"):
        super().__init__()
        if metric not in ("mse", "cosine"):
            raise ValueError(f"hidden alignment metric must be 'mse' or 'cosine', got {metric!r}")
        if not layer_map:
            raise ValueError("HiddenProjector needs at least one mapped layer")
        self.layer_map = dict(layer_map)
        self.metric = metric
        self.proj = nn.ModuleDict({str(s): nn.Linear(student_dim, teacher_dim) for s in self.layer_map})

    def forward(self, student_hidden: Sequence[Tensor] | Mapping[int, Tensor], teacher_hidden: Mapping[int, Tensor],
                mask: Tensor) -> Tensor:
        m = (mask > 0 if mask.is_floating_point() else mask.bool())[..., None]  # (B, T, 1)
        total = None
        for s, t in self.layer_map.items():
            proj = self.proj[str(s)]
            x = upcast(proj(student_hidden[s].to(proj.weight.dtype)))  # (B, T, H_t)
            y = torch.where(m, upcast(teacher_hidden[t]), 0.0)  # (B, T, H_t)
            if self.metric == "mse":
                rows = (x - y).pow(2).mean(-1)  # (B, T)
            else:
                rows = 1.0 - F.cosine_similarity(x, y.to(x.dtype), dim=-1, eps=1e-8)  # (B, T)
            loss = masked_mean(rows, mask)
            total = loss if total is None else total + loss
        return total / len(self.layer_map)
