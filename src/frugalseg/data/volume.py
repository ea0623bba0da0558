"""The in-memory unit every reader returns."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass
class Volume:
    """One case.

    Attributes:
        case_id: identifier used in splits, reports and file names.
        image: ``(C, *spatial)`` float32, in the file's axis order.
        label: ``(*spatial)`` int64 class indices, or ``None`` for an unlabelled case.
        affine: 4x4 voxel-to-world matrix (identity when the format stores none).
        spacing: voxel size per spatial axis in mm (1.0 where unknown).
        spacing_known: whether ``spacing`` was read from the file (distances are then in mm) or is nominal (the
            SSL4MIS files store none: distances are then in voxels).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    spacing: tuple[float, ...]
    spacing_known: bool = True

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[1:])

    def without_label(self) -> Volume:
        """The same image with no label (what pre-training sees)."""
        return replace(self, label=None)


def slice_axis(spacing: tuple[float, ...], shape: tuple[int, ...]) -> int:
    """The through-plane axis for slice-wise 2-D work: the coarsest spacing, ties broken by the fewest voxels."""
    return min(range(len(shape)), key=lambda a: (-round(spacing[a], 4), shape[a]))
