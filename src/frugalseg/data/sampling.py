"""Training batches from cached, preprocessed volumes: 2-D slices or 3-D patches, with augmentation.

Randomness is derived from ``(seed, step)``, so the batch at a step is the same whether or not the run was
interrupted and resumed; no sampler state needs saving.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from frugalseg.config import AugmentConfig
from frugalseg.data.augment import (
    apply_intensity,
    apply_spatial,
    apply_strong,
    draw_intensity,
    draw_spatial,
    draw_strong,
)
from frugalseg.data.volume import Volume, slice_axis

# the crop window is larger than the patch so rotation and zoom-out have real image to draw from
WINDOW_FACTOR = math.sqrt(2.0)


def as_training_arrays(vol: Volume, spatial_dims: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Put the slice axis first for 2-D training: ``(C, S, H, W)``; 3-D volumes are returned unchanged."""
    if spatial_dims == 3 or vol.image.ndim == 3:
        return vol.image, vol.label
    axis = slice_axis(vol.spacing, vol.spatial_shape)
    image = np.ascontiguousarray(np.moveaxis(vol.image, axis + 1, 1))
    label = None if vol.label is None else np.ascontiguousarray(np.moveaxis(vol.label, axis, 0))
    return image, label


class PatchSampler:
    """Draw augmented batches of 2-D slices or 3-D patches from a list of preprocessed volumes.

    Args:
        volumes: preprocessed volumes (``image`` ``(C, *spatial)``, ``label`` or ``None``).
        spatial_dims: 2 = slices along each volume's slice axis, 3 = 3-D patches.
        patch_size: output patch size.
        batch_size: samples per batch.
        seed: base seed; batch ``k`` uses ``(seed, k)``.
        foreground_oversample: probability that a sample is centred on a labelled foreground voxel.
        augment: augmentation settings, or ``None`` for plain crops.
        views: 1, or 2 for two independently augmented views of the same crops (``image``, ``view2``), as
            two-view pre-training methods need.
        partitions: 0 for independent samples; ``S > 0`` for batches of ``batch_size / S`` volumes with one slice
            from each of their ``S`` partitions (Chaitanya et al.'s G^D batches); 2-D only.
        shared_spatial: with two views, one spatial transform for both (voxel ``p`` of one view is voxel ``p`` of
            the other) and independent intensity augmentation (local contrast needs corresponding positions).
        weak_view2: with ``shared_spatial``, the second view gets no intensity augmentation (a mean teacher's
            weakly augmented input; the first view is the student's strongly augmented one).
        stream: ``None`` or an integer that separates this sampler's random stream from another sampler's with
            the same seed (e.g. the unlabelled stream of a semi-supervised run).
        strong_views: ``k > 0`` makes ``image`` the weak view (spatial augmentation only) and adds ``strong1`` ..
            ``strong<k>``: the same crops under the same spatial transform, each with its own strong intensity
            perturbation (colour jitter and blur, :func:`~frugalseg.data.augment.apply_strong`).

    Every batch also holds ``volume`` (index of the source volume, ``(B,)``) and ``position`` (the crop centre
    relative to the volume extent in training axis order: ``(B,)`` slice position for 2-D, ``(B, 3)`` for 3-D).
    """

    def __init__(
        self,
        volumes: Sequence[Volume],
        spatial_dims: int,
        patch_size: Sequence[int],
        batch_size: int,
        seed: int,
        foreground_oversample: float = 0.33,
        augment: AugmentConfig | None = None,
        views: int = 1,
        partitions: int = 0,
        shared_spatial: bool = False,
        weak_view2: bool = False,
        stream: int | None = None,
        strong_views: int = 0,
    ) -> None:
        if views not in (1, 2):
            raise ValueError(f"views must be 1 or 2, got {views}")
        if strong_views and views != 1:
            raise ValueError("strong views come with one (weak) view")
        if partitions and (spatial_dims != 2 or batch_size % partitions):
            raise ValueError(f"partitioned batches need 2-D slices and a batch size divisible by {partitions}")
        self.views, self.partitions, self.shared_spatial = views, partitions, shared_spatial
        self.weak_view2, self.stream, self.strong_views = weak_view2, stream, strong_views
        if not volumes:
            raise ValueError("PatchSampler needs at least one volume")
        self.dims = spatial_dims
        self.patch = tuple(int(p) for p in patch_size)
        self.batch_size = batch_size
        self.seed = seed
        self.fg_prob = foreground_oversample
        self.augment = augment
        self.window = tuple(int(math.ceil(p * WINDOW_FACTOR)) if augment else p for p in self.patch)
        self.images: list[np.ndarray] = []
        self.labels: list[np.ndarray | None] = []
        self.pad_values: list[np.ndarray] = []
        self.foreground: list[np.ndarray] = []
        for vol in volumes:
            img, lab = as_training_arrays(vol, spatial_dims)
            self.images.append(img)
            self.labels.append(lab)
            self.pad_values.append(img.reshape(img.shape[0], -1).min(1))
            self.foreground.append(np.argwhere(lab > 0) if lab is not None else np.zeros((0, 3), dtype=np.int64))
        # 2-D: every slice equally likely; 3-D: every volume equally likely
        weights = np.array([img.shape[1] if spatial_dims == 2 else 1 for img in self.images], dtype=np.float64)
        self.volume_p = weights / weights.sum()
        self.has_labels = all(lab is not None for lab in self.labels)

    def _crop(self, v: int, centre: np.ndarray, out_img: np.ndarray, out_lab: np.ndarray | None) -> None:
        """Crop a window (spatial dims in training order) around ``centre`` into ``out_img`` ``(C, *window)`` and
        ``out_lab`` ``(*window)``, padding outside the volume (the image with its minimum, the label with 0)."""
        img, lab = self.images[v], self.labels[v]
        full = img.shape[1:]
        if self.dims == 2:  # the slice axis: a window of one slice
            win = (1, *self.window)
            out_img = out_img[:, None]
            out_lab = out_lab[None] if out_lab is not None else None
        else:
            win = self.window
        src, dst = [], []
        for c, w, n in zip(centre, win, full):
            start = int(c) - w // 2
            lo, hi = max(start, 0), min(start + w, n)
            src.append(slice(lo, hi))
            dst.append(slice(lo - start, hi - start))
        if any(d.start > 0 or d.stop < w for d, w in zip(dst, win)):  # part of the window is outside the volume
            out_img[:] = self.pad_values[v].reshape(-1, *([1] * len(win)))
            if out_lab is not None:
                out_lab[:] = 0
        out_img[(slice(None), *dst)] = img[(slice(None), *src)]
        if out_lab is not None:
            out_lab[tuple(dst)] = lab[tuple(src)]

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The batch for training step ``step`` (deterministic in ``(seed, step)``)."""
        rng = np.random.default_rng([self.seed, step] if self.stream is None else [self.seed, step, self.stream])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        picks = list(self._partitioned(rng) if self.partitions else self._random(rng))
        # cropped straight into the batch; labels as float32 (exact for class indices), as resampling takes them
        crops_np = np.empty((len(picks), self.images[0].shape[0], *self.window), dtype=np.float32)
        labels_np = np.empty((len(picks), *self.window), dtype=np.float32) if self.has_labels else None
        vol_index, position = [], []
        for k, (v, centre) in enumerate(picks):
            self._crop(v, centre, crops_np[k], labels_np[k] if labels_np is not None else None)
            vol_index.append(v)
            position.append((np.asarray(centre, dtype=np.float64) + 0.5) / np.asarray(self.images[v].shape[1:]))
        crops = torch.from_numpy(crops_np)
        label = torch.from_numpy(labels_np) if labels_np is not None else None
        strong: list[torch.Tensor] = []
        if self.strong_views:
            # the weak view: spatial augmentation only; strong views share it and add strong intensity changes
            aug = self.augment if self.augment is not None else AugmentConfig(probability=0.0)
            image, label = apply_spatial(crops, label, draw_spatial(self.batch_size, self.dims, aug, gen), self.patch)
            strong = [apply_strong(image, draw_strong(self.batch_size, aug, gen)) for _ in range(self.strong_views)]
            second = None
        elif self.views == 2 and self.shared_spatial and self.augment is not None:
            # both views share one spatial transform (voxels correspond) and differ in intensity only
            spatial = draw_spatial(self.batch_size, self.dims, self.augment, gen)
            moved, label = apply_spatial(crops, label, spatial, self.patch)
            image = apply_intensity(moved, draw_intensity(self.batch_size, self.augment, gen), gen)
            second = moved if self.weak_view2 else apply_intensity(
                moved, draw_intensity(self.batch_size, self.augment, gen), gen)
        else:
            image, label = self._augment(crops, label, gen)
            second = self._augment(crops, None, gen)[0] if self.views == 2 else None
        out = {"image": image.contiguous(), "volume": torch.tensor(vol_index, dtype=torch.int64)}
        pos = torch.tensor(np.stack(position), dtype=torch.float32)
        out["position"] = pos[:, 0] if self.dims == 2 else pos
        if label is not None:
            out["label"] = label.long()  # the float32 crops when not resampled (no augmentation)
        if second is not None:
            out["view2"] = second.contiguous()
        for k, view in enumerate(strong):
            out[f"strong{k + 1}"] = view.contiguous()
        return out

    def _inner_centre(self, rng: np.random.Generator, v: int) -> np.ndarray:
        """A centre that keeps the crop window inside the volume where the volume is large enough."""
        full = self.images[v].shape[1:]
        win = self.window if self.dims == 3 else (1, *self.window)
        return np.array([rng.integers(min(w // 2, n // 2), max(n - w // 2, n // 2) + 1) for w, n in zip(win, full)])

    def _random(self, rng: np.random.Generator):
        for _ in range(self.batch_size):
            v = int(rng.choice(len(self.images), p=self.volume_p))
            full = self.images[v].shape[1:]
            fg = self.foreground[v]
            if len(fg) and rng.random() < self.fg_prob:
                centre = fg[rng.integers(len(fg))]
            else:
                centre = np.array([rng.integers(n) for n in full])
                if self.dims == 3:  # keep 3-D patches mostly inside small volumes
                    centre = self._inner_centre(rng, v)
            yield v, centre

    def _partitioned(self, rng: np.random.Generator):
        """``batch_size / S`` volumes, one slice from each of their ``S`` partitions along the slice axis.

        Partition ``k`` of a volume with ``n`` slices holds the slices with ``(z + 0.5) / n`` in ``[k/S, (k+1)/S)``
        (every slice belongs to one partition). In-plane the crop stays inside the image where it can.
        """
        s = self.partitions
        m = self.batch_size // s
        chosen = rng.choice(len(self.images), size=m, replace=len(self.images) < m)
        for v in chosen:
            n = self.images[v].shape[1]
            for k in range(s):
                zs = [z for z in range(n) if min(int((z + 0.5) * s / n), s - 1) == k] or [min(k * n // s, n - 1)]
                centre = self._inner_centre(rng, int(v))
                centre[0] = zs[int(rng.integers(len(zs)))]
                yield int(v), centre

    def _augment(self, image: torch.Tensor, label: torch.Tensor | None,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.augment is None:
            return image, label
        params = draw_spatial(self.batch_size, self.dims, self.augment, gen)
        image, label = apply_spatial(image, label, params, self.patch)
        return apply_intensity(image, draw_intensity(self.batch_size, self.augment, gen), gen), label


class SemiSupervisedSampler:
    """Labelled and unlabelled batches together: the labelled keys as :class:`PatchSampler` gives them, the
    unlabelled ones prefixed ``u_`` (``u_image``, ``u_view2``, ...). Both are deterministic in ``(seed, step)``."""

    def __init__(self, labelled: PatchSampler, unlabelled: PatchSampler) -> None:
        self.labelled, self.unlabelled = labelled, unlabelled

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        out = self.labelled.batch(step)
        out.update({f"u_{k}": v for k, v in self.unlabelled.batch(step).items()})
        return out


def build_sampler(spec, volumes: Sequence[Volume], unlabelled: Sequence[Volume] | None, spatial_dims: int,
                  patch_size: Sequence[int], batch_size: int, seed: int, foreground_oversample: float,
                  augment: AugmentConfig | None):
    """The batch source a method's record (:class:`~frugalseg.methods.base.MethodSpec`) asks for: its ``stream``
    on ``volumes``, plus an unlabelled stream over ``unlabelled`` (``u_`` keys) when it declares one. A method whose
    views are not patches (VoCo's bases, PCRLv2's sub-crops) declares its own ``sampler`` factory."""
    if spec.sampler is not None:
        return spec.sampler(volumes, patch_size, seed, spatial_dims=spatial_dims, batch_size=batch_size)
    sampler = PatchSampler(volumes, spatial_dims, patch_size, batch_size, seed, foreground_oversample, augment,
                           **_stream_options(spec.stream))
    if spec.unlabelled is not None and unlabelled is not None:
        stream = PatchSampler([v.without_label() for v in unlabelled], spatial_dims, patch_size, batch_size, seed,
                              0.0, augment, stream=1, **_stream_options(spec.unlabelled))
        sampler = SemiSupervisedSampler(sampler, stream)
    if spec.boxes is not None:
        from frugalseg.data.mixing import BoxedSampler

        sampler = BoxedSampler(sampler, spec.boxes, patch_size, batch_size, seed)
    return sampler


def _stream_options(stream) -> dict:
    return {"views": stream.views, "shared_spatial": stream.shared_spatial, "weak_view2": stream.weak_view2,
            "partitions": stream.partitions, "strong_views": stream.strong_views}
