"""Contrastive and non-contrastive representation losses (pure functions of tensors)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def byol_regression(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL's per-sample loss ``‖p/‖p‖ − z/‖z‖‖² = 2 − 2·cos(p, z)`` (Grill et al. 2020, Eq. 2).

    Args:
        prediction: ``(B, D)`` online predictions ``q_θ(z_θ)``.
        target: ``(B, D)`` target projections ``z'_ξ``; the caller detaches them (stop-gradient).

    Returns:
        ``(B,)`` losses in [0, 4], computed in fp32.
    """
    p = F.normalize(prediction.float(), dim=-1, eps=1e-6)
    z = F.normalize(target.float(), dim=-1, eps=1e-6)
    return 2.0 - 2.0 * (p * z).sum(-1)


def symmetric_byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """``mean_B[ℓ(p1, sg z2) + ℓ(p2, sg z1)]``: the symmetric sum of BYOL (range [0, 8])."""
    return (byol_regression(p1, z2.detach()) + byol_regression(p2, z1.detach())).mean()


GLOBAL_STRATEGIES = ("GR", "GD-", "GD")


def global_pair_masks(instance: torch.Tensor, partition: torch.Tensor, strategy: str) -> tuple[torch.Tensor, ...]:
    """Positive and negative masks of Chaitanya et al. (NeurIPS 2020), Sec. 3.1, from each image's metadata.

    Args:
        instance: ``(M,)`` id of the slice an image is a view of (views of one slice share it).
        partition: ``(M,)`` partition index of that slice within its volume.
        strategy: ``GR`` — positives are the other views of the same slice, every other image is a negative
            (SimCLR); ``GD-`` — same positives, but images of the same partition (of any volume) are never
            negatives; ``GD`` — positives are every other image of the same partition (other views of the slice
            and the same partition of other volumes), negatives are the images of other partitions.

    Returns:
        ``(positive, negative)`` boolean ``(M, M)`` masks; ``positive[i, j]`` marks an ordered pair (anchor ``i``),
        ``negative[i, k]`` the negatives in anchor ``i``'s denominator. The diagonal is in neither.
    """
    if strategy not in GLOBAL_STRATEGIES:
        raise ValueError(f"strategy must be one of {GLOBAL_STRATEGIES}, got {strategy!r}")
    eye = torch.eye(len(instance), dtype=torch.bool, device=instance.device)
    same_slice = instance[:, None] == instance[None, :]
    same_part = partition[:, None] == partition[None, :]
    if strategy == "GR":
        return same_slice & ~eye, ~same_slice
    if strategy == "GD-":
        return same_slice & ~eye, ~same_part
    return same_part & ~eye, ~same_part


def global_contrastive_loss(z: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                            temperature: float = 0.1) -> torch.Tensor:
    """Mean over ordered positive pairs ``(i, j)`` of
    ``−log(exp(s_ij) / (exp(s_ij) + Σ_{k ∈ N(i)} exp(s_ik)))``, ``s = cos / τ`` (Chaitanya et al., Eq. 1).

    Args:
        z: ``(M, D)`` projections (normalised here, fp32).
        positive: ``(M, M)`` bool, the ordered positive pairs.
        negative: ``(M, M)`` bool, each anchor's negatives.
        temperature: τ (paper 0.1).
    """
    zn = F.normalize(z.float(), dim=-1)
    sim = zn @ zn.T / temperature
    neg = torch.where(negative, sim, torch.full_like(sim, float("-inf")))
    neg_lse = torch.logsumexp(neg, dim=1, keepdim=True)  # log Σ_k exp(s_ik); -inf when an anchor has none
    # −log(e^s / (e^s + e^n)) = log(1 + e^(n − s)) = softplus(n − s)
    terms = F.softplus(neg_lse - sim)
    return terms[positive].mean()
