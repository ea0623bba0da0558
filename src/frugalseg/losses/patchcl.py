"""PatchCL (Basak & Yin, CVPR 2023): entropy-guided patch sampling and the pseudo-label-guided contrastive bound.

Pure functions; the class queues live in the method.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def binary_entropy(c: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``−c·log2 c − (1 − c)·log2(1 − c)`` elementwise, 0 at certainty, 1 at c = ½."""
    c = c.clamp(eps, 1 - eps)
    return -(c * torch.log2(c) + (1 - c) * torch.log2(1 - c))


def unit_image(image: torch.Tensor) -> torch.Tensor:
    """``(B, C, *S)`` -> ``(B, 1, *S)`` in [0, 1]: each sample scaled by its own minimum and maximum, channels
    averaged (the intensity I of the attended image I ⊙ C^k)."""
    b = image.shape[0]
    flat = image.float().reshape(b, -1)
    shape = (b,) + (1,) * (image.dim() - 1)
    lo, hi = flat.amin(1).view(shape), flat.amax(1).view(shape)
    return ((image.float() - lo) / (hi - lo).clamp_min(1e-6)).mean(1, keepdim=True)


def patch_statistics(confidence: torch.Tensor, patch: int, image: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean confidence of every class map, and mean binary entropy of the attended image I ⊙ C^k (PatchCL's
    "average patch entropy"), over a regular grid of patches.

    Args:
        confidence: ``(B, K, *S)`` class confidences C^k (softmax, or one-hot labels).
        patch: patch side in pixels; the grid is ``S // patch`` per axis (an incomplete border is ignored).
        image: ``(B, C, *S)`` the images (scaled to [0, 1] per sample by :func:`unit_image`); ``None`` ranks on the
            entropy of C^k alone.

    Returns:
        ``(mean_conf, mean_entropy)``, each ``(B, K, P)`` with ``P`` patches in row-major grid order.
    """
    pool = F.avg_pool2d if confidence.dim() == 4 else F.avg_pool3d
    conf = pool(confidence.float(), patch).flatten(2)
    attended = confidence.float() if image is None else unit_image(image) * confidence.float()
    ent = pool(binary_entropy(attended), patch).flatten(2)
    return conf, ent


def select_patches(mean_conf: torch.Tensor, mean_entropy: torch.Tensor, per_class: int,
                   threshold: float = 0.5) -> list[tuple[int, int, int]]:
    """Pick up to ``per_class`` patches per class: those the class dominates (mean confidence > ``threshold``),
    lowest mean patch entropy first; ties keep grid order.

    Returns ``(image, class, patch)`` triples, class-major.
    """
    b, k, p = mean_conf.shape
    chosen: list[tuple[int, int, int]] = []
    for cls in range(k):
        ok = mean_conf[:, cls] > threshold  # (B, P)
        if not ok.any():
            continue
        idx = ok.flatten().nonzero().flatten()
        ent = mean_entropy[:, cls].flatten()[idx]
        order = torch.argsort(ent, stable=True)[:per_class]
        for flat in idx[order].tolist():
            chosen.append((flat // p, cls, flat % p))
    return chosen


def attended_patch_features(features: torch.Tensor, confidence: torch.Tensor, picks: list[tuple[int, int, int]],
                            patch: int) -> torch.Tensor:
    """Embed the attended patches ``F ⊙ C^k`` by confidence-weighted average pooling over each patch.

    Args:
        features: ``(B, C, *S_f)`` a feature map; ``S_f`` may be a power-of-two fraction of the image size.
        confidence: ``(B, K, *S)`` class confidences at image resolution.
        picks: ``(image, class, patch)`` triples from :func:`select_patches`.
        patch: patch side in image pixels.

    Returns:
        ``(len(picks), C)``.
    """
    dims = features.dim() - 2
    scale = confidence.shape[2] // features.shape[2]
    pool = F.avg_pool2d if dims == 2 else F.avg_pool3d
    conf = pool(confidence.float(), scale) if scale > 1 else confidence.float()  # to the feature grid
    fp = max(patch // scale, 1)
    b_idx = torch.tensor([p[0] for p in picks], device=features.device)
    k_idx = torch.tensor([p[1] for p in picks], device=features.device)
    p_idx = torch.tensor([p[2] for p in picks], device=features.device)
    weights = conf[b_idx, k_idx][:, None]  # (N, 1, *S_f)
    weighted = pool(features.float()[b_idx] * weights, fp).flatten(2)  # (N, C, P)
    mass = pool(weights, fp).flatten(2).clamp_min(1e-6)
    pooled = weighted / mass
    return pooled[torch.arange(len(picks)), :, p_idx]


def plgcl_loss(student: torch.Tensor, classes: torch.Tensor, means: torch.Tensor, covs: torch.Tensor,
               present: torch.Tensor, temperature: float = 0.2, lam: float = 4.0, zeta: float = 512.0
               ) -> torch.Tensor:
    """The pseudo-label-guided contrastive loss in closed form (PatchCL's bound, as restated in our notes).

    For a normalised student embedding ``t`` of class ``i`` and class statistics ``(μ_k, Σ_k)`` of teacher
    embeddings in the queues, with ``a_k(t) = tᵀμ_k/τ + λ/(2τ²)·tᵀΣ_k t`` (the expectation of ``exp(tᵀw/τ)`` for
    ``w ~ N(μ_k, λΣ_k)``):

        ``ℓ(t) = −tᵀμ_i/τ + log(exp a_i(t) + (ζ/K_b)·Σ_{j≠i, j present} exp a_j(t))``

    averaged over the student embeddings. ``K_b`` is the number of classes present.

    Args:
        student: ``(N, D)`` student embeddings (normalised here).
        classes: ``(N,)`` class of each embedding.
        means: ``(K, D)``, covs: ``(K, D, D)`` class statistics.
        present: ``(K,)`` bool, classes whose statistics exist.
        temperature, lam, zeta: τ, λ, ζ.
    """
    t = F.normalize(student.float(), dim=-1)
    lin = t @ means.float().T / temperature  # (N, K)
    quad = torch.einsum("nd,kde,ne->nk", t, covs.float(), t) * (lam / (2 * temperature**2))
    a = lin + quad
    own = F.one_hot(classes, means.shape[0]).bool()
    neg = present[None, :] & ~own
    k_b = int(present.sum().item())
    log_neg = torch.logsumexp(torch.where(neg, a, torch.full_like(a, -math.inf)), dim=1) + math.log(zeta / k_b)
    log_pos = a.gather(1, classes[:, None])[:, 0]
    terms = -lin.gather(1, classes[:, None])[:, 0] + torch.logaddexp(log_pos, log_neg)
    return terms.mean()
