"""Per-volume intensity normalisation, named CT windows and optional resampling, invertible for prediction."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from frugalseg.data.volume import Volume, slice_axis
from frugalseg.errors import UserError

CT_WINDOWS = {"abdomen": (-175.0, 250.0), "head-neck": (0.0, 1700.0), "chest": (-500.0, 1000.0)}
EPS = 1e-8


def normalise(image: np.ndarray, method: str, percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """Normalise a ``(C, *spatial)`` image channel by channel.

    Args:
        method: ``zscore`` (mean 0, sd 1 per volume), ``percentile`` (clip to the given percentiles, scale to
            [0, 1]), ``minmax`` (scale to [0, 1]), ``none``, or ``ct:<window>`` with a window from
            :data:`CT_WINDOWS` (clip to the window in HU, scale to [0, 1]).
    """
    out = np.empty_like(image, dtype=np.float32)
    for c, chan in enumerate(image.astype(np.float32, copy=False)):
        if method == "zscore":
            with np.errstate(over="ignore", invalid="ignore"):
                mean, std = chan.mean(), float(chan.std())
            if not (np.isfinite(mean) and np.isfinite(std)):  # one extreme voxel overflows float32 statistics
                chan = chan.astype(np.float64)
                mean, std = chan.mean(), float(chan.std())
            out[c] = (chan - mean) / max(std, EPS)
        elif method == "percentile":
            lo, hi = np.percentile(chan, percentiles)
            out[c] = (np.clip(chan, lo, hi) - lo) / max(hi - lo, EPS)
        elif method == "minmax":
            lo, hi = float(chan.min()), float(chan.max())
            out[c] = (chan.astype(np.float64) - lo) / max(hi - lo, EPS)
        elif method.startswith("ct:"):
            lo, hi = CT_WINDOWS[method[3:]]
            out[c] = (np.clip(chan, lo, hi) - lo) / (hi - lo)
        elif method == "none":
            out[c] = chan
        else:
            raise ValueError(f"unknown normalisation {method!r}")
    return out


def resize(array: np.ndarray, shape: tuple[int, ...], mode: str) -> np.ndarray:
    """Resize ``(C, *spatial)`` to ``(C, *shape)`` with ``linear`` (images, probabilities) or ``nearest`` (labels)."""
    if tuple(array.shape[1:]) == tuple(shape):
        return array
    t = torch.from_numpy(np.ascontiguousarray(array)).float()[None]
    dims = len(shape)
    if mode == "linear":
        kind = {2: "bilinear", 3: "trilinear"}[dims]
        out = F.interpolate(t, size=tuple(shape), mode=kind, align_corners=False)
    else:
        out = F.interpolate(t, size=tuple(shape), mode="nearest-exact")
    return out[0].numpy()


@dataclass
class Preprocessor:
    """Normalise and (optionally) resample a volume; :meth:`restore_shape` inverts the resampling.

    ``spacing`` is the target voxel size. For 3-D models it is given per axis in the file's order. For 2-D
    (slice-wise) models only the in-plane spacing is used - the last two values, applied to the two axes other
    than each volume's slice axis - so a model trained on one layout applies to scans stored in another.
    """

    normalisation: str = "zscore"
    percentiles: tuple[float, float] = (0.5, 99.5)
    spacing: tuple[float, ...] | None = None
    spatial_dims: int = 3

    def target_spacing(self, vol: Volume) -> tuple[float, ...]:
        if self.spacing is None:
            return tuple(vol.spacing)
        if self.spatial_dims == 2 and len(vol.spacing) == 3:
            axis = slice_axis(vol.spacing, vol.spatial_shape)
            target = list(vol.spacing)
            for a, s in zip([a for a in range(3) if a != axis], self.spacing[-2:]):
                target[a] = s
            return tuple(target)
        return tuple(self.spacing[-len(vol.spacing):])

    def target_shape(self, vol: Volume) -> tuple[int, ...]:
        target = self.target_spacing(vol)
        return tuple(max(1, round(n * s / t)) for n, s, t in zip(vol.spatial_shape, vol.spacing, target))

    def __call__(self, vol: Volume) -> Volume:
        with np.errstate(over="ignore", invalid="ignore"):
            image = normalise(vol.image, self.normalisation, self.percentiles)
        if not np.isfinite(image).all():
            raise UserError(f"case {vol.case_id}: its intensities do not fit data.normalisation "
                            f"{self.normalisation} (values beyond float32 after normalising); check the image")
        label = vol.label
        spacing = vol.spacing
        shape = self.target_shape(vol)
        if shape != vol.spatial_shape:
            image = resize(image, shape, "linear")
            if label is not None:
                label = resize(label[None].astype(np.float32), shape, "nearest")[0].astype(np.int64)
            spacing = self.target_spacing(vol)
        return Volume(vol.case_id, image.astype(np.float32), label, vol.affine, spacing, vol.spacing_known)

    @staticmethod
    def restore_shape(probabilities: np.ndarray, original_shape: tuple[int, ...]) -> np.ndarray:
        """Bring ``(K, *spatial)`` class probabilities back to the original grid (linear, before argmax)."""
        return resize(probabilities, original_shape, "linear")
