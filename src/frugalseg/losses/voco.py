"""VoCo's losses (Wu et al., CVPR 2024): predict each random crop's overlap with every base from similarities,
push non-overlapping bases to cos <= 0, keep the bases of a volume dissimilar. Batched over volumes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-6


def overlap_logits(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``ReLU(cos(p_r, q_k))`` for crops ``p`` ``(V, R, D)`` and bases ``q`` ``(V, K, D)`` -> ``(V, R, K)``."""
    return F.relu(F.normalize(p, dim=-1) @ F.normalize(q, dim=-1).transpose(1, 2))


def overlap_losses(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positive and the zero term, each averaged over volumes.

    ``L_pos = −Σ_{r,k} y·log(1 − |y − l| + ε) / (Σ y + ε)`` (overlap-weighted: bases the crop covers more count
    more); ``L_neg = Σ_{y=0} l² / (#{y=0} + ε)``. ``logits``, ``target`` ``(V, R, K)``, target in [0, 1].
    """
    dims = (1, 2)
    pos = -(target * torch.log(1.0 - (target - logits).abs() + EPS)).sum(dims) / (target.sum(dims) + EPS)
    zero = (target == 0).to(logits.dtype)
    neg = (logits.pow(2) * zero).sum(dims) / (zero.sum(dims) + EPS)
    return pos.mean(), neg.mean()


def base_dissimilarity(q: torch.Tensor) -> torch.Tensor:
    """``mean_{k<j} ReLU(cos(q_k, sg(q_j)))²`` per volume, averaged over volumes; ``q`` ``(V, K, D)``."""
    k = q.shape[1]
    cos = F.normalize(q, dim=-1) @ F.normalize(q.detach(), dim=-1).transpose(1, 2)
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=q.device), diagonal=1)
    return F.relu(cos[:, upper]).pow(2).mean()
