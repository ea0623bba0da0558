"""Batched augmentation as tensor ops: one ``affine_grid`` + ``grid_sample`` per batch, then flips and intensity.

Each random function draws from an explicit ``torch.Generator`` and returns the parameters it drew, so a view is
reproducible and later methods can derive targets from the parameters.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from frugalseg.config import AugmentConfig


def _rotation(angles: torch.Tensor, dims: int) -> torch.Tensor:
    """``(B, dims, dims)`` rotation matrices; 2D uses ``angles[:, 0]``, 3D composes rotations about each axis."""
    b = angles.shape[0]
    c, s = torch.cos(angles), torch.sin(angles)
    if dims == 2:
        return torch.stack([torch.stack([c[:, 0], -s[:, 0]], -1), torch.stack([s[:, 0], c[:, 0]], -1)], 1)
    one, zero = torch.ones(b), torch.zeros(b)
    rx = torch.stack([torch.stack([one, zero, zero], -1), torch.stack([zero, c[:, 0], -s[:, 0]], -1),
                      torch.stack([zero, s[:, 0], c[:, 0]], -1)], 1)
    ry = torch.stack([torch.stack([c[:, 1], zero, s[:, 1]], -1), torch.stack([zero, one, zero], -1),
                      torch.stack([-s[:, 1], zero, c[:, 1]], -1)], 1)
    rz = torch.stack([torch.stack([c[:, 2], -s[:, 2], zero], -1), torch.stack([s[:, 2], c[:, 2], zero], -1),
                      torch.stack([zero, zero, one], -1)], 1)
    return rz @ ry @ rx


def draw_spatial(batch: int, dims: int, cfg: AugmentConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Draw per-sample rotation angles (radians), isotropic scale and flip masks."""
    apply = torch.rand(batch, generator=gen) < cfg.probability
    max_angle = math.radians(cfg.rotate_degrees)
    angles = (torch.rand(batch, 3, generator=gen) * 2 - 1) * max_angle * apply[:, None]
    lo, hi = cfg.scale
    scale = torch.where(apply, lo + (hi - lo) * torch.rand(batch, generator=gen), torch.ones(batch))
    flips = (torch.rand(batch, dims, generator=gen) < 0.5) & cfg.flip
    return {"angles": angles, "scale": scale, "flips": flips}


def apply_spatial(
    image: torch.Tensor,
    label: torch.Tensor | None,
    params: dict[str, torch.Tensor],
    out_size: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resample a window batch ``(B, C, *W)`` to ``(B, C, *out_size)`` with the drawn rotation/scale, then flip.

    The output is centred in the window; with scale 1 and no rotation it is the central ``out_size`` crop.
    A scale ``s > 1`` zooms in (the patch covers ``1/s`` of the nominal field of view).
    """
    b, dims = image.shape[0], image.dim() - 2
    window = image.shape[2:]
    # affine_grid works in (x, y[, z]) order, i.e. reversed spatial axes
    ratio = torch.tensor([o / w for o, w in zip(out_size, window)][::-1], dtype=torch.float32)
    theta = _rotation(params["angles"], dims) @ torch.diag_embed(ratio.expand(b, dims) / params["scale"][:, None])
    theta = torch.cat([theta, torch.zeros(b, dims, 1)], dim=2)
    grid = F.affine_grid(theta, [b, 1, *out_size], align_corners=False)
    out_img = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out_lab = None
    if label is not None:
        # nearest neighbours of whole numbers are whole numbers (or the 0 of the padding): no rounding needed
        out_lab = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                                align_corners=False)[:, 0].long()
    flips = params["flips"]
    for axis in range(dims):
        m = flips[:, axis]
        if m.any():
            out_img[m] = out_img[m].flip(axis + 2)
            if out_lab is not None:
                out_lab[m] = out_lab[m].flip(axis + 1)
    return out_img, out_lab


def sample_mean(image: torch.Tensor) -> torch.Tensor:
    """The mean of each sample of ``(B, ...)``, shaped ``(B,)``: summed in float64 by numpy, in one thread.

    A multi-threaded float32 mean splits a sample between threads when there are fewer samples than threads, and
    its last bits then depend on the thread count; a batch must come out the same in a background worker (one
    thread) as in the training process (``data.workers``)."""
    if image.device.type != "cpu":
        return image.reshape(image.shape[0], -1).mean(1)
    flat = image.detach().reshape(image.shape[0], -1).numpy()
    return torch.from_numpy(flat.mean(1, dtype=np.float64)).to(image.dtype)


def draw_intensity(batch: int, cfg: AugmentConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(batch, generator=gen)

    apply = torch.rand(batch, 4, generator=gen) < cfg.probability
    return {
        "contrast": torch.where(apply[:, 0], uniform(*cfg.contrast), torch.ones(batch)),
        "brightness": torch.where(apply[:, 1], uniform(-cfg.brightness, cfg.brightness), torch.zeros(batch)),
        "gamma": torch.where(apply[:, 2], uniform(*cfg.gamma), torch.ones(batch)),
        "noise_std": torch.where(apply[:, 3], uniform(0.0, cfg.noise_std), torch.zeros(batch)),
    }


def apply_intensity(image: torch.Tensor, params: dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """Contrast around the sample mean, gamma on the sample's [min, max] range, brightness shift, Gaussian noise."""
    b = image.shape[0]
    shape = (b,) + (1,) * (image.dim() - 1)
    flat = image.reshape(b, -1)
    mean = sample_mean(image).view(shape)
    lo, hi = flat.amin(1).view(shape), flat.amax(1).view(shape)  # the range before the contrast change
    rng = (hi - lo).clamp_min(1e-6)
    # in place on one new tensor (``image`` is left as it is): the same operations in the same order
    out = (image - mean).mul_(params["contrast"].view(shape)).add_(mean)
    out.sub_(lo).div_(rng).clamp_(0, 1).pow_(params["gamma"].view(shape)).mul_(rng).add_(lo)
    out.add_(params["brightness"].view(shape))
    noise = torch.randn(image.shape, generator=gen).mul_(params["noise_std"].view(shape))
    return out.add_(noise)


def draw_strong(batch: int, cfg: AugmentConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Parameters of a strong view (UniMatch: colour jitter with p 0.8, Gaussian blur with p 0.5): brightness and
    contrast factors in ``1 ± strength`` and a blur sigma in pixels (0 = no blur)."""
    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(batch, generator=gen)

    jitter = torch.rand(batch, generator=gen) < cfg.strong_probability
    blur = torch.rand(batch, generator=gen) < cfg.blur_probability
    b, c = cfg.strong_brightness, cfg.strong_contrast
    return {
        "brightness": torch.where(jitter, uniform(1 - b, 1 + b), torch.ones(batch)),
        "contrast": torch.where(jitter, uniform(1 - c, 1 + c), torch.ones(batch)),
        "sigma": torch.where(blur, uniform(*cfg.blur_sigma), torch.zeros(batch)),
    }


def apply_strong(image: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Brightness (a factor on the intensity above the sample's minimum, as colour jitter scales a [0, 1] image
    whose background is black), then contrast around the sample mean, then a Gaussian blur of per-sample sigma."""
    b = image.shape[0]
    shape = (b,) + (1,) * (image.dim() - 1)
    lo = image.reshape(b, -1).amin(1).view(shape)
    image = (image - lo) * params["brightness"].view(shape) + lo
    mean = sample_mean(image).view(shape)
    image = (image - mean) * params["contrast"].view(shape) + mean
    return gaussian_blur(image, params["sigma"])


def gaussian_blur(image: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, *S)`` with one sigma (pixels) per sample; sigma 0 leaves a sample
    unchanged. Borders replicate.

    Written as a weighted sum of shifted copies (one multiply and one add per tap, in a fixed order) rather than as
    a convolution: oneDNN's grouped convolution rounds differently with another number of threads, and a batch
    must come out the same in a background worker (one thread) as in the training process (data.workers)."""
    if not bool((sigma > 0).any()):
        return image
    radius = blur_radius(sigma)
    return blur_with(image, gaussian_kernels(sigma, radius, image.dtype), radius)


def blur_radius(sigma: torch.Tensor | float) -> int:
    """The kernel radius :func:`gaussian_blur` uses for a batch of ``sigma`` (or one sigma): ceil(2 max sigma), at
    least 1."""
    top = float(sigma.max()) if isinstance(sigma, torch.Tensor) else float(sigma)
    return max(1, int(math.ceil(2 * top)))


def gaussian_kernels(sigma: torch.Tensor, radius: int, dtype: torch.dtype) -> torch.Tensor:
    """``(B, 2·radius + 1)`` normalised 1-D Gaussian kernels, one per sigma (the identity kernel for sigma 0)."""
    x = torch.arange(-radius, radius + 1, dtype=dtype)
    safe = sigma.clamp_min(1e-3).to(dtype)[:, None]
    kernel = torch.exp(-x[None] ** 2 / (2 * safe**2))
    kernel = torch.where((sigma > 0)[:, None], kernel, (x[None] == 0).to(dtype))  # identity when sigma 0
    return kernel / kernel.sum(1, keepdim=True)


def blur_with(image: torch.Tensor, kernel: torch.Tensor, radius: int) -> torch.Tensor:
    """``(B, C, *S)`` convolved along every spatial axis with sample b's kernel ``kernel[b]`` (replicated borders):
    per voxel the same multiplies and adds in the same order whatever the batch, so a sample comes out the same
    alone or batched with others."""
    b = image.shape[0]
    dims = image.dim() - 2
    taps = kernel.view(b, -1, *([1] * (dims + 1)))  # (B, K, 1, ...): tap k of sample b, broadcast over C and S
    out = image
    for d in range(dims):
        axis = 2 + d
        n = out.shape[axis]
        lo = out.narrow(axis, 0, 1).expand(*out.shape[:axis], radius, *out.shape[axis + 1:])
        hi = out.narrow(axis, n - 1, 1).expand(*out.shape[:axis], radius, *out.shape[axis + 1:])
        padded = torch.cat([lo, out, hi], dim=axis)
        acc = padded.narrow(axis, 0, n) * taps[:, 0]
        term = torch.empty_like(acc)
        for k in range(1, 2 * radius + 1):
            acc.add_(torch.mul(padded.narrow(axis, k, n), taps[:, k], out=term))
        out = acc
    return out.contiguous()
