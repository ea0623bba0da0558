"""VoCo's views (Wu et al., CVPR 2024): base crops on a regular in-plane grid and random crops of the same size.

Boxes are continuous ``[start, stop)`` intervals in voxel units along the first two spatial axes; every crop spans
the whole third axis. The overlap of a random crop with each base is computed from the boxes (area of the
intersection / area of a base), never re-derived from pixels; a random crop inside the grid has overlaps summing
to 1. Crops are resampled to the patch size by trilinear interpolation, one axis at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from frugalseg.data.volume import Volume
from frugalseg.errors import Incompatible

# a random crop of one base's size overlaps at most 2 x 2 bases: with 3 or more per axis some bases are always
# left out, so the negative (zero-overlap) term of VoCo's loss is never empty
SMALLEST_GRID = 3
ROTATE_PROBABILITY = 0.2  # RandRotate90 of the official augmentation (max_k 3, the first two axes)


def grid_size(extent: Sequence[int], patch: Sequence[int], largest: int = 4) -> int:
    """Bases per in-plane axis: the volume's extent in patches, between :data:`SMALLEST_GRID` and ``largest``, as
    VoCo's 4x4 grid of 96-voxel bases on a 384-voxel canvas."""
    fits = min(e / max(p, 1) for e, p in zip(extent[:2], patch[:2]))
    return int(min(max(round(fits), SMALLEST_GRID), largest))


def base_boxes(extent: Sequence[int], g: int) -> np.ndarray:
    """``(g*g, 2, 2)`` boxes ``[[x0, x1], [y0, y1]]`` tiling the first two axes, row-major."""
    bx, by = extent[0] / g, extent[1] / g
    return np.array([[[i * bx, (i + 1) * bx], [j * by, (j + 1) * by]] for i in range(g) for j in range(g)],
                    dtype=np.float64)


def overlap_fractions(crops: np.ndarray, bases: np.ndarray) -> np.ndarray:
    """``(R, K)`` area of ``crop_r ∩ base_k`` over the area of ``base_k``, from the boxes."""
    lo = np.maximum(crops[:, None, :, 0], bases[None, :, :, 0])
    hi = np.minimum(crops[:, None, :, 1], bases[None, :, :, 1])
    inter = np.clip(hi - lo, 0.0, None).prod(-1)
    area = (bases[:, :, 1] - bases[:, :, 0]).prod(-1)
    return inter / area[None, :]


def _axis_taps(lo: np.ndarray, hi: np.ndarray, out: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear-interpolation taps resampling ``[lo, hi)`` (per box, ``(R,)``) of an axis of ``size`` voxels to ``out``
    samples at the intervals' centres, borders replicated (``grid_sample``'s ``align_corners=False`` and
    ``padding_mode="border"``): indices ``i0``, ``i1`` ``(R, out)`` and the weight of ``i1``."""
    centre = lo[:, None] + (np.arange(out) + 0.5) * ((hi - lo) / out)[:, None] - 0.5
    src = np.clip(centre, 0, size - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, size - 1)
    return torch.from_numpy(i0), torch.from_numpy(i1), torch.from_numpy((src - i0).astype(np.float32))


def sample_crops(image: np.ndarray, boxes: np.ndarray, patch: Sequence[int]) -> torch.Tensor:
    """``(R, C, *patch)`` trilinear resamplings of ``image`` ``(C, X, Y, Z)`` inside each box (the whole third axis),
    as ``grid_sample`` (bilinear, border padding, ``align_corners=False``) on the boxes' affine grids, axis by axis:
    the boxes are axis-aligned, so trilinear interpolation is three linear ones (~4x faster than ``grid_sample``'s
    8 corners per voxel; equal to it to float rounding, the positions computed in float64)."""
    img = torch.from_numpy(np.ascontiguousarray(image))
    shape = image.shape[1:]
    boxes = np.asarray(boxes, dtype=np.float64)
    whole = np.array([0.0]), np.array([float(shape[2])])
    z0, z1, wz = (t[0] for t in _axis_taps(*whole, patch[2], shape[2]))  # the same for every box: once
    img = torch.lerp(img[..., z0], img[..., z1], wz)
    x0, x1, wx = _axis_taps(boxes[:, 0, 0], boxes[:, 0, 1], patch[0], shape[0])
    y0, y1, wy = _axis_taps(boxes[:, 1, 0], boxes[:, 1, 1], patch[1], shape[1])
    rows = torch.lerp(img[:, x0], img[:, x1], wx[:, :, None, None])  # (C, R, px, Y, pz): every box's rows
    r, p = torch.arange(len(boxes))[:, None, None], torch.arange(patch[0])[None, :, None]
    out = torch.lerp(rows[:, r, p, y0[:, None, :]], rows[:, r, p, y1[:, None, :]], wy[:, None, :, None])
    return out.transpose(0, 1).contiguous()


class VoCoSampler:
    """Batches of ``volumes_per_step`` volumes, each as ``g*g`` bases then ``crops`` random crops.

    ``image`` ``(V*(K+R), C, *patch)``; ``overlap`` ``(V, R, K)``; ``volume`` ``(V*(K+R),)``. Each crop gets its own
    flips (p 0.2 per axis), a rotation by k·90° in the first two axes (p 0.2, k in 1..3; k = 2 only when the patch
    is not square in those axes, so that every crop keeps its shape) and an intensity shift (±0.1, p 0.1), as the
    official code; the overlap is the crop's position, so augmentation does not change it. Deterministic in
    ``(seed, step)``.
    """

    def __init__(self, volumes: Sequence[Volume], patch_size: Sequence[int], seed: int, volumes_per_step: int = 2,
                 crops: int = 2, grid: int = 0) -> None:
        if not volumes:
            raise Incompatible("needs at least one training volume")
        if any(v.image.ndim != 4 for v in volumes):
            raise Incompatible("crops 3-D volumes (set data.spatial_dims=3 on 3-D data)")
        self.images = [v.image for v in volumes]
        self.patch = tuple(int(p) for p in patch_size)
        self.seed, self.per_step, self.crops = seed, volumes_per_step, crops
        # one grid for every volume (the batch stacks their bases): the smallest volume decides when automatic
        self.grid = grid or min(grid_size(img.shape[1:], self.patch) for img in self.images)

    def boxes(self, v: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        extent = self.images[v].shape[1:]
        bases = base_boxes(extent, self.grid)
        size = bases[0, :, 1] - bases[0, :, 0]
        starts = rng.uniform(0.0, 1.0, size=(self.crops, 2)) * (np.asarray(extent[:2]) - size)
        crops = np.stack([starts, starts + size], -1)
        return bases, crops

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, 7])
        chosen = rng.choice(len(self.images), size=self.per_step, replace=len(self.images) < self.per_step)
        images, overlaps, index = [], [], []
        for v in chosen:
            bases, crops = self.boxes(int(v), rng)
            views = sample_crops(self.images[int(v)], np.concatenate([bases, crops]), self.patch)
            flips = rng.random((len(views), 3)) < 0.2
            rotate = rng.random(len(views)) < ROTATE_PROBABILITY
            turns = rng.integers(1, 4, size=len(views)) if self.patch[0] == self.patch[1] else np.full(len(views), 2)
            for r in range(len(views)):
                axes = [1 + d for d in range(3) if flips[r, d]]  # (C, X, Y, Z)
                if axes:
                    views[r] = views[r].flip(axes)
                if rotate[r]:
                    views[r] = torch.rot90(views[r], int(turns[r]), dims=(1, 2))
            shift = np.where(rng.random(len(views)) < 0.1, rng.uniform(-0.1, 0.1, len(views)), 0.0)
            views = views + torch.tensor(shift, dtype=views.dtype).view(-1, 1, 1, 1, 1)
            images.append(views)
            overlaps.append(torch.tensor(overlap_fractions(crops, bases), dtype=torch.float32))
            index += [int(v)] * len(views)
        return {"image": torch.cat(images).contiguous(), "overlap": torch.stack(overlaps),
                "volume": torch.tensor(index, dtype=torch.int64)}
