"""SelfReg-UNet regularisers (Zhu et al., MICCAI 2024): semantic consistency and internal feature distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pool_to(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    pool = F.adaptive_avg_pool2d if x.dim() == 4 else F.adaptive_avg_pool3d
    return pool(x, size)


def semantic_consistency(student: torch.Tensor, teacher: torch.Tensor, generator: torch.Generator | None = None
                         ) -> torch.Tensor:
    """SCR (paper Eq. 3): the last decoder features (``teacher``, detached) supervise a layer's features.

    The larger map is average-pooled to the smaller one's size; ``min(C_s, C_t)`` channels are drawn at random
    (independently) from each and compared with the mean squared error.

    Args:
        student: ``(B, C_s, *S_s)`` features of an encoder or decoder layer.
        teacher: ``(B, C_t, *S_t)`` output of the last decoder block (before the 1×1 head).
        generator: randomness for the channel pairing (the global generator when ``None``).
    """
    s, t = student.float(), teacher.detach().float()
    if s.shape[2:] != t.shape[2:]:
        if s[0, 0].numel() > t[0, 0].numel():
            s = _pool_to(s, tuple(t.shape[2:]))
        else:
            t = _pool_to(t, tuple(s.shape[2:]))
    c = min(s.shape[1], t.shape[1])
    idx_s = torch.randperm(s.shape[1], generator=generator)[:c].to(s.device)
    idx_t = torch.randperm(t.shape[1], generator=generator)[:c].to(t.device)
    return F.mse_loss(s[:, idx_s], t[:, idx_t])


def channel_scores(feature: torch.Tensor) -> torch.Tensor:
    """Mean over batch and space of each channel's spatially L2-normalised map: ``(B, C, *S)`` -> ``(C,)``."""
    flat = F.normalize(feature.float().flatten(2), p=2, dim=2)
    return flat.mean(dim=(0, 2))


def internal_distillation(feature: torch.Tensor) -> torch.Tensor:
    """IFD (paper Eq. 4): channels sorted by :func:`channel_scores`; the strongest half distils into the weakest.

    Mean squared error between the two halves (pairing the i-th strongest with the i-th of the lower half), with
    gradient through both, as the official code does. With an odd channel count the weakest channel is left out.
    """
    f = feature.float()
    order = channel_scores(f).argsort(descending=True)
    half = f.shape[1] // 2
    return F.mse_loss(f[:, order[:half]], f[:, order[half:2 * half]])
