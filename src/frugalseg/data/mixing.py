"""Boxes for CutMix (UniMatch, Yang et al. CVPR 2023) and copy-paste (BCP, Bai et al. CVPR 2023), in 2-D and 3-D.

A box is drawn as integer ``[start, start + size)`` per spatial axis and returned with its parameters; the mask
it covers is built from those parameters, never the other way round. Mixing an image and its label (or pseudo-label)
with the same mask moves the label's box exactly with the image's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class BoxSpec:
    """How boxes are drawn.

    Attributes:
        count: boxes per sample (batch keys ``box``, ``box2``, ...: UniMatch mixes each strong view with its own).
        probability: chance that a sample gets its box (else an empty mask; UniMatch 0.5).
        area: the box's fraction of the patch area (2-D) or volume (3-D), uniform in this range (UniMatch 2-40 %).
        ratio: aspect ratio range (2-D: width / height; 3-D: each further side / the first), log-uniform in it
            (UniMatch 0.3-3.3).
        side: a fixed fraction of every axis instead of ``area``/``ratio`` (BCP: 2/3).
        per_batch: one box for every sample of the batch (BCP) instead of one per sample.
    """

    count: int = 1
    probability: float = 1.0
    area: tuple[float, float] = (0.02, 0.4)
    ratio: tuple[float, float] = (0.3, 1 / 0.3)
    side: float | None = None
    per_batch: bool = False


def draw_box(rng: np.random.Generator, shape: Sequence[int], spec: BoxSpec) -> tuple[np.ndarray, np.ndarray]:
    """One box inside ``shape``: ``(start, size)`` integer arrays, each side at least 1 voxel."""
    shape = np.asarray(shape, dtype=np.int64)
    dims = len(shape)
    if spec.side is not None:
        size = np.maximum(np.round(shape * spec.side).astype(np.int64), 1)
    else:
        volume = float(np.prod(shape)) * rng.uniform(*spec.area)
        # relative side lengths: 1 for the first axis, log-uniform ratios for the others
        rel = np.ones(dims)
        lo, hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
        rel[1:] = np.exp(rng.uniform(lo, hi, size=dims - 1))
        scale = (volume / float(np.prod(rel))) ** (1.0 / dims)
        size = np.clip(np.round(rel * scale).astype(np.int64), 1, shape)
    start = np.array([rng.integers(0, n - s + 1) for n, s in zip(shape, size)], dtype=np.int64)
    return start, size


def box_mask(shape: Sequence[int], start: np.ndarray, size: np.ndarray) -> torch.Tensor:
    """A boolean mask of ``shape``, true inside the box ``[start, start + size)``."""
    mask = torch.zeros(tuple(shape), dtype=torch.bool)
    mask[tuple(slice(int(a), int(a) + int(s)) for a, s in zip(start, size))] = True
    return mask


def draw_masks(rng: np.random.Generator, batch: int, shape: Sequence[int], spec: BoxSpec
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(masks (batch, *shape) bool, boxes (batch, D, 2) int)`` for one box key; a sample without a box has an
    empty mask and a zero-size box."""
    masks = torch.zeros((batch, *shape), dtype=torch.bool)
    boxes = torch.zeros((batch, len(shape), 2), dtype=torch.int64)
    shared = draw_box(rng, shape, spec) if spec.per_batch else None
    for i in range(batch):
        start, size = shared if shared is not None else draw_box(rng, shape, spec)
        if spec.probability < 1.0 and rng.random() >= spec.probability:
            continue
        masks[i] = box_mask(shape, start, size)
        boxes[i, :, 0], boxes[i, :, 1] = torch.from_numpy(start), torch.from_numpy(start + size)
    return masks, boxes


def paste(outside: torch.Tensor, inside: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``inside`` where ``mask`` is true, ``outside`` elsewhere; ``mask`` ``(B, *S)`` broadcasts over channels of
    ``(B, C, *S)`` images (labels ``(B, *S)`` take it as is)."""
    if outside.dim() == mask.dim() + 1:
        mask = mask.unsqueeze(1)
    return torch.where(mask, inside, outside)


class BoxedSampler:
    """Adds box masks drawn by ``spec`` to every batch of ``inner``: ``box`` (and ``box2``, ... for ``count`` > 1)
    ``(B, *patch)`` bool, with their boxes ``box_coords`` ``(B, D, 2)`` (``box2_coords``, ...). Deterministic in
    ``(seed, step)``, from a stream of its own (the inner batches are unchanged)."""

    STREAM = 3

    def __init__(self, inner, spec: BoxSpec, patch_size: Sequence[int], batch_size: int, seed: int) -> None:
        self.inner, self.spec = inner, spec
        self.patch, self.batch_size, self.seed = tuple(int(p) for p in patch_size), batch_size, seed

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        out = self.inner.batch(step)
        rng = np.random.default_rng([self.seed, step, self.STREAM])
        for k in range(self.spec.count):
            key = "box" if k == 0 else f"box{k + 1}"
            out[key], out[f"{key}_coords"] = draw_masks(rng, self.batch_size, self.patch, self.spec)
        return out
