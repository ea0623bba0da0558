"""Local contrastive loss on decoder feature maps (Chaitanya et al., NeurIPS 2020, Sec. 3.2)."""

from __future__ import annotations

import torch

LOCAL_STRATEGIES = ("LR", "LD")


def region_corners(height: int, width: int, size: int = 3) -> list[tuple[int, int]]:
    """The paper's 13 region positions: top-left corners on the grid {0, ½, 1}² of the free range plus the
    four points {¼, ¾}², so regions of ``size``×``size`` cover the map evenly whatever its size."""
    fy, fx = max(height - size, 0), max(width - size, 0)
    outer = [(a * fy // 2, b * fx // 2) for a in range(3) for b in range(3)]
    inner = [(a * fy // 4, b * fx // 4) for a in (1, 3) for b in (1, 3)]
    return outer + inner


def extract_regions(feature: torch.Tensor, corners: list[tuple[int, int]], size: int = 3) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, R, C·size²)``: each region's features flattened (channel-major)."""
    return torch.stack([feature[:, :, y:y + size, x:x + size].flatten(1) for y, x in corners], dim=1)


def local_pair_masks(image: torch.Tensor, region: torch.Tensor, partition: torch.Tensor,
                     strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative masks over region embeddings, from (image, region, partition) metadata.

    Args:
        image: ``(M,)`` id of the slice a region comes from (both intensity views of a slice share it).
        region: ``(M,)`` region index (the same index is the same position in every view).
        partition: ``(M,)`` partition of the slice within its volume.
        strategy: ``LR`` — the positive of a region is the same region in the other view of its slice; its
            negatives are the other regions of that slice, in both views. ``LD`` — positives are also the same
            region of the same-partition slices of the other volumes; negatives are the other regions of the
            anchor's slice and of those slices.

    Returns:
        ``(positive, negative)`` boolean ``(M, M)`` masks (rows are anchors); the diagonal is in neither.
    """
    if strategy not in LOCAL_STRATEGIES:
        raise ValueError(f"strategy must be one of {LOCAL_STRATEGIES}, got {strategy!r}")
    eye = torch.eye(len(image), dtype=torch.bool, device=image.device)
    same_region = region[:, None] == region[None, :]
    group = (image[:, None] == image[None, :]) if strategy == "LR" else (partition[:, None] == partition[None, :])
    return group & same_region & ~eye, group & ~same_region
