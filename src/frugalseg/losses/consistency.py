"""Consistency losses and ramps for semi-supervised training (pure functions)."""

from __future__ import annotations

import math

import torch


def sigmoid_rampup(progress: float, length: float) -> float:
    """``exp(−5(1 − t)²)`` with ``t = clip(progress / length, 0, 1)`` (Laine & Aila 2017; Tarvainen & Valpola 2017).

    0 → 0.0067, ``length`` and beyond → 1. ``length == 0`` means no ramp (always 1).
    """
    if length <= 0:
        return 1.0
    t = min(max(progress / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def softmax_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the class probabilities, ``(B, K, *spatial)`` each; the teacher is detached."""
    return (student_logits.float().softmax(1) - teacher_logits.detach().float().softmax(1)).square().mean()
