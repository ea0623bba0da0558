"""PCRLv2's views (Zhou et al., TPAMI 2023): two global crops under an IoU constraint, local crops inside their
bounding box ("sub-crop"); spatial augmentation on every view, corruption the restoration must undo.

Works on 2-D slices and 3-D volumes alike: boxes are ``(D, 2)`` integer ``[start, stop)`` per spatial axis.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from frugalseg.data.augment import blur_radius, blur_with, gaussian_kernels
from frugalseg.data.sampling import as_training_arrays
from frugalseg.data.volume import Volume
from frugalseg.errors import Incompatible


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.clip(np.minimum(a[:, 1], b[:, 1]) - np.maximum(a[:, 0], b[:, 0]), 0, None).prod()
    union = (a[:, 1] - a[:, 0]).prod() + (b[:, 1] - b[:, 0]).prod() - inter
    return float(inter / union)


def random_box(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, frac: tuple[float, float]) -> np.ndarray:
    """A box of ``frac`` of the extent ``hi - lo`` per axis (at least 2 voxels), uniformly placed inside
    ``[lo, hi)``."""
    extent = hi - lo
    size = np.maximum(np.round(extent * rng.uniform(*frac, size=len(extent))).astype(int), np.minimum(2, extent))
    start = lo + np.array([rng.integers(0, e - s + 1) for e, s in zip(extent, size)])
    return np.stack([start, start + size], -1)


def sub_crop_boxes(rng: np.random.Generator, shape: Sequence[int], n_local: int, min_iou: float = 0.3,
                   global_frac: tuple[float, float] = (0.5, 0.9), local_frac: tuple[float, float] = (0.3, 0.6),
                   tries: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two global boxes with IoU > ``min_iou`` (the second redrawn up to ``tries`` times, else a copy of the
    first), and ``n_local`` local boxes inside the minimal box holding both (fractions of that box's extent)."""
    lo, hi = np.zeros(len(shape), int), np.asarray(shape, int)
    g1 = random_box(rng, lo, hi, global_frac)
    g2 = g1.copy()
    for _ in range(tries):
        cand = random_box(rng, lo, hi, global_frac)
        if box_iou(g1, cand) > min_iou:
            g2 = cand
            break
    bbox = np.stack([np.minimum(g1[:, 0], g2[:, 0]), np.maximum(g1[:, 1], g2[:, 1])], -1)
    local = np.stack([random_box(rng, bbox[:, 0], bbox[:, 1], local_frac) for _ in range(n_local)])
    return np.stack([g1, g2]), local, bbox


def crop_resize(image: np.ndarray, box: np.ndarray, size: Sequence[int]) -> torch.Tensor:
    """``(C, *size)``: the box of ``image`` ``(C, *spatial)`` resampled (bi/trilinear) to ``size``."""
    crop = torch.from_numpy(np.ascontiguousarray(image[(slice(None), *(slice(a, b) for a, b in box))]))
    mode = "bilinear" if crop.dim() == 3 else "trilinear"
    return F.interpolate(crop[None].float(), size=tuple(size), mode=mode, align_corners=False)[0]


def _unit(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, *S)`` scaled to [0, 1] per view and channel."""
    shape = (*x.shape[:2], *([1] * (x.dim() - 2)))
    lo = x.flatten(2).amin(2).view(shape)
    hi = x.flatten(2).amax(2).view(shape)
    return (x - lo) / (hi - lo).clamp_min(1e-6)


def _by_shape(views: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, view in enumerate(views):
        groups[tuple(view.shape)].append(i)
    return groups


def unit_views(views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each view ``(C, *S)`` scaled to [0, 1] per channel (min and max exact, so batching changes no bit)."""
    out = list(views)
    for idx in _by_shape(views).values():
        scaled = _unit(torch.stack([views[i] for i in idx]))
        for j, i in enumerate(idx):
            out[i] = scaled[j]
    return out


def _blur_views(views: list[torch.Tensor], sigmas: list[float]) -> list[torch.Tensor]:
    """Each view ``(C, *S)`` Gaussian-blurred with its sigma (replicated borders; none under sigma 0.1), exactly as
    alone: computed in one batch per (shape, kernel radius), ~5x faster than view by view for PCRLv2's 128 small
    views per batch, with the same kernel per view and the same operations per voxel."""
    out = list(views)
    groups: dict[tuple, list[int]] = defaultdict(list)
    sigma32 = np.asarray(sigmas, dtype=np.float32)  # as torch holds them
    for i, view in enumerate(views):
        if sigmas[i] >= 0.1:
            groups[(tuple(view.shape), blur_radius(float(sigma32[i])))].append(i)
    for (_, radius), idx in groups.items():
        kernels = gaussian_kernels(torch.from_numpy(sigma32[idx]), radius, views[idx[0]].dtype)
        blurred = blur_with(torch.stack([views[i] for i in idx]), kernels, radius)
        for j, i in enumerate(idx):
            out[i] = blurred[j]
    return out


def swap_patches(x: np.ndarray, starts: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """``x`` ``(C, *spatial)`` with the patches of ``size`` at ``starts[i, 0]`` and ``starts[i, 1]`` exchanged, one
    pair after the other (``starts`` ``(n, 2, D)``). Both patches of a pair are read before either is written, so
    where they overlap the second write wins: the first patch's content, now at the second place."""
    x = x.copy()
    _swap_in_place(x, starts, size)
    return x


def _swap_in_place(x: np.ndarray, starts: np.ndarray, size: Sequence[int]) -> None:
    """:func:`swap_patches` in ``x`` itself, channel by channel (every channel the same swaps)."""
    pairs = starts.tolist()
    for channel in x:
        held = np.empty(tuple(size), dtype=x.dtype)
        if len(size) == 2:  # written out for 2 and 3 axes: PCRLv2 makes 3,200 swaps per 2-D batch
            q0, q1 = size
            for (a0, a1), (b0, b1) in pairs:
                pa, pb = channel[a0:a0 + q0, a1:a1 + q1], channel[b0:b0 + q0, b1:b1 + q1]
                held[...] = pa
                pa[...] = pb  # numpy reads an overlapping source in full before writing
                pb[...] = held
        elif len(size) == 3:
            q0, q1, q2 = size
            for (a0, a1, a2), (b0, b1, b2) in pairs:
                pa = channel[a0:a0 + q0, a1:a1 + q1, a2:a2 + q2]
                pb = channel[b0:b0 + q0, b1:b1 + q1, b2:b2 + q2]
                held[...] = pa
                pa[...] = pb
                pb[...] = held
        else:
            for a, b in pairs:
                pa = channel[tuple(slice(u, u + q) for u, q in zip(a, size))]
                pb = channel[tuple(slice(u, u + q) for u, q in zip(b, size))]
                held[...] = pa
                pa[...] = pb
                pb[...] = held


def draw_corruption(rng: np.random.Generator, shape: Sequence[int], swap: bool) -> dict:
    """The random parameters of the official corruption of a [0, 1] view of ``shape`` ``(C, *S)``, in the order
    they are drawn: blur σ~U(0,2), noise σ~U(0,0.25), gamma log γ~U(−0.3,0.3), (globals, ``swap``) 100 swaps of
    patches of 1/8 the view's extent. :func:`corrupt_views` applies them, then z-normalises."""
    sigma = float(rng.uniform(0, 2))
    # the noise from torch's generator, seeded from rng: ~4x faster than numpy's float64 normals (PCRLv2 draws
    # 0.9 million per 2-D batch); serial, so the same in any process and with any number of threads
    noise_gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    noise_std = float(rng.uniform(0, 0.25))
    noise = (torch.randn(tuple(shape), generator=noise_gen) * noise_std).numpy()
    gamma = float(np.exp(rng.uniform(-0.3, 0.3)))
    starts, size = None, None
    if swap:
        spatial = tuple(shape[1:])
        size = [max(1, s // 8) for s in spatial]
        starts = rng.integers(0, [s - q + 1 for s, q in zip(spatial, size)], size=(100, 2, len(spatial)))
    return {"sigma": sigma, "noise": noise, "noise_std": noise_std, "gamma": gamma, "starts": starts, "size": size}


def corrupt_views(views: list[torch.Tensor], params: list[dict]) -> list[torch.Tensor]:
    """Every view corrupted with its parameters from :func:`draw_corruption`: blur, noise, gamma, patch swaps,
    z-normalisation. Computed in one batch per view shape (the blurs per shape and kernel radius) with the same
    operations per voxel as view by view, so a view comes out the same alone or with others."""
    blurred = _blur_views(views, [p["sigma"] for p in params])
    out = list(blurred)
    for idx in _by_shape(blurred).values():
        x = torch.stack([blurred[i] for i in idx]) + torch.from_numpy(np.stack([params[i]["noise"] for i in idx]))
        shape = (len(idx), *([1] * (x.dim() - 1)))
        gamma = torch.tensor([params[i]["gamma"] for i in idx], dtype=x.dtype).view(shape)
        x = torch.sign(x) * x.abs().pow(gamma)
        arr = x.numpy()
        for j, i in enumerate(idx):
            if params[i]["starts"] is not None:
                _swap_in_place(arr[j], params[i]["starts"], params[i]["size"])
        # mean and sd per view in float64 in one thread (numpy; the same sums as view by view): a multi-threaded
        # reduction's last bits depend on the thread count, and a batch must not depend on the process that makes
        # it (data.workers)
        a = arr.reshape(len(idx), -1).astype(np.float64)
        mean = torch.from_numpy(a.mean(1)).to(x.dtype).view(shape)
        sd = torch.from_numpy(np.maximum(a.std(1, ddof=1), 1e-6)).to(x.dtype).view(shape)
        x = (x - mean) / sd
        for j, i in enumerate(idx):
            out[i] = x[j]
    return out


class SubCropSampler:
    """Batches of ``batch_size`` samples: ``image``/``view2`` (corrupted global views, z-scored), ``target`` (global
    view 1 spatially augmented, not corrupted, in [0, 1]), ``local`` ``(B, L, C, *local_size)``, and the boxes
    (``boxes`` ``(B, 2, D, 2)``, ``local_boxes`` ``(B, L, D, 2)``, in the voxel grid of the sampled slice/volume).
    Spatial augmentation = a random flip per axis and view (p 0.5); deterministic in ``(seed, step)``."""

    def __init__(self, volumes: Sequence[Volume], spatial_dims: int, patch_size: Sequence[int], batch_size: int,
                 seed: int, locals_per_sample: int = 6, min_iou: float = 0.3) -> None:
        if not volumes:
            raise Incompatible("needs at least one training volume")
        self.arrays = [as_training_arrays(v, spatial_dims)[0] for v in volumes]
        self.dims, self.patch = spatial_dims, tuple(int(p) for p in patch_size)
        self.local = tuple(max(8, p // 2) for p in self.patch)
        self.batch_size, self.seed, self.n_local, self.min_iou = batch_size, seed, locals_per_sample, min_iou

    def _flip(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        axes = [1 + d for d in range(x.dim() - 1) if rng.random() < 0.5]
        return x.flip(axes) if axes else x

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, 11])
        out: dict[str, list] = {k: [] for k in ("target", "boxes", "local_boxes")}
        views: list[torch.Tensor] = []  # per sample: global 1, global 2, the locals (corrupted at the end, together)
        params: list[dict] = []
        for _ in range(self.batch_size):
            arr = self.arrays[int(rng.integers(len(self.arrays)))]
            if self.dims == 2:  # one slice (slice axis first in the training arrays)
                arr = arr[:, int(rng.integers(arr.shape[1]))]
            globals_, local, _ = sub_crop_boxes(rng, arr.shape[1:], self.n_local, self.min_iou)
            g = [self._flip(crop_resize(arr, b, self.patch), rng) for b in globals_]
            for view in g:
                views.append(view)
                params.append(draw_corruption(rng, view.shape, swap=True))
            for b in local:
                view = self._flip(crop_resize(arr, b, self.local), rng)
                views.append(view)
                params.append(draw_corruption(rng, view.shape, swap=False))
            out["boxes"].append(torch.from_numpy(globals_))
            out["local_boxes"].append(torch.from_numpy(local))
        views = unit_views(views)
        per = 2 + self.n_local
        out["target"] = [views[i * per] for i in range(self.batch_size)]
        done = corrupt_views(views, params)
        out["image"] = [done[i * per] for i in range(self.batch_size)]
        out["view2"] = [done[i * per + 1] for i in range(self.batch_size)]
        out["local"] = [torch.stack(done[i * per + 2:(i + 1) * per]) for i in range(self.batch_size)]
        order = ("image", "view2", "target", "local", "boxes", "local_boxes")
        return {k: torch.stack(out[k]).contiguous() for k in order}
