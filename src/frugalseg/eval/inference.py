"""Whole-volume inference: slice-wise for 2-D models, sliding window for 3-D models; at the native grid."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from frugalseg.config import Config, config_from_dict
from frugalseg.data.preprocess import Preprocessor
from frugalseg.data.volume import Volume, slice_axis
from frugalseg.errors import UserError
from frugalseg.files import load_checkpoint
from frugalseg.nn.fold import fold_batchnorm

MODEL_FILE = "model.pt"


@dataclass
class TrainedModel:
    """A network with what is needed to apply it: its config and the dataset facts it was trained on."""

    net: nn.Module
    cfg: Config
    class_names: list[str]
    in_channels: int
    device: torch.device
    spacing: list[float] | None = None  # the training volumes' median voxel spacing (RAS axis order), if recorded

    @property
    def spatial_dims(self) -> int:
        return self.cfg.data.spatial_dims

    @property
    def preprocessor(self) -> Preprocessor:
        d = self.cfg.data
        return Preprocessor(d.normalisation, tuple(d.percentiles), tuple(d.spacing) if d.spacing else None,
                            d.spatial_dims)


def prepare_for_inference(net: nn.Module) -> nn.Module:
    """``net`` as ``evaluate`` / ``predict`` run it, in place: evaluation mode, every BatchNorm that follows a
    convolution folded into it (one memory-bound pass fewer per convolution; the same outputs to rounding)."""
    net.eval()
    fold_batchnorm(net)
    return net


def load_model(run_dir: Path, device: torch.device | None = None) -> TrainedModel:
    """Load ``RUN_DIR/model.pt`` (weights + config + class names), refusing anything else in one line."""
    from frugalseg.registry import build_network

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run directory not found")
    path = run_dir / MODEL_FILE
    if not path.is_file():
        hint = " (training did not finish: resume it with --resume)" if (run_dir / "run.json").exists() else ""
        raise UserError(f"{path}: no trained model in this run directory{hint}")
    state = load_checkpoint(path)
    try:
        meta = json.loads(state["meta"])
        cfg = config_from_dict(meta["config"], str(path))
        net = build_network(cfg.model, cfg.data.spatial_dims, meta["in_channels"], len(meta["class_names"]))
        net.load_state_dict(state["network"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: corrupt or incompatible model file ({str(exc).splitlines()[0][:160]})") from None
    if device is None:
        from frugalseg.hardware import pick_device

        device = pick_device()
    prepare_for_inference(net.to(device))
    return TrainedModel(net, cfg, list(meta["class_names"]), int(meta["in_channels"]), device, meta.get("spacing"))


def _autocast(model: TrainedModel):
    from frugalseg.hardware import resolve_precision

    if resolve_precision(model.cfg.train.precision, model.device) == "bf16":
        return torch.autocast(model.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def flip_sets(dims: int) -> list[tuple[int, ...]]:
    """Every subset of the last ``dims`` axes of a ``(B, C, *spatial)`` batch: the mirrorings of test-time
    augmentation (4 in 2-D, 8 in 3-D), the identity first."""
    axes = list(range(2, 2 + dims))
    return [tuple(a for i, a in enumerate(axes) if mask >> i & 1) for mask in range(2**dims)]


def _mirrored(net, tta: bool):
    """``net`` itself, or (``tta``) a function giving the log of the mean softmax of ``net`` over every mirroring
    of its input (flipped back): averaged probabilities, kept as logits so that stitching and the final softmax
    treat them as they treat a plain prediction (one window: exactly the averaged probabilities)."""
    if not tta:
        return lambda t: net(t).float()

    def predict(t: torch.Tensor) -> torch.Tensor:
        total = None
        for axes in flip_sets(t.dim() - 2):
            x = t.flip(axes) if axes else t
            p = torch.softmax(net(x).float(), dim=1)
            p = p.flip(axes) if axes else p
            total = p if total is None else total + p
        return torch.log((total / len(flip_sets(t.dim() - 2))).clamp_min(1e-12))

    return predict


@torch.no_grad()
def predict_probabilities(model: TrainedModel, image: np.ndarray, spacing: tuple[float, ...],
                          tta: bool = False) -> np.ndarray:
    """Softmax probabilities ``(K, *spatial)`` for a preprocessed ``(C, *spatial)`` image; with ``tta`` averaged
    over the mirrorings of the network's input axes (in-plane for a 2-D model, every axis for a 3-D one)."""
    dims = model.spatial_dims
    net = _mirrored(model.net, tta)
    x = torch.from_numpy(np.ascontiguousarray(image)).float()
    if dims == 2:
        if x.dim() == 3:  # a single 2-D image
            x = x[:, None]
            axis = 0
        else:
            axis = slice_axis(spacing, tuple(image.shape[1:]))
        slices = x.movedim(axis + 1, 1).transpose(0, 1)  # (S, C, H, W)
        outs = []
        bs = model.cfg.eval.slice_batch_size
        for i in range(0, slices.shape[0], bs):
            chunk = slices[i: i + bs].to(model.device).contiguous(memory_format=torch.channels_last)
            with _autocast(model):
                outs.append(torch.softmax(net(chunk), dim=1).cpu())
        probs = torch.cat(outs).transpose(0, 1).movedim(1, axis + 1)  # (K, *spatial)
        if image.ndim == 3:
            probs = probs[:, 0]
        return probs.numpy()
    from monai.inferers import sliding_window_inference

    roi = tuple(model.cfg.data.patch_size)
    with _autocast(model):
        logits = sliding_window_inference(
            x[None].to(model.device), roi_size=roi, sw_batch_size=model.cfg.eval.sw_batch_size,
            predictor=net, overlap=model.cfg.eval.sw_overlap, mode="gaussian",
        )
    return torch.softmax(logits.float(), dim=1)[0].cpu().numpy()


def probabilities(model: TrainedModel, vol: Volume, tta: bool = False) -> np.ndarray:
    """Class probabilities ``(K, *spatial)`` of ``vol`` at its native shape (preprocess, predict, resample back)."""
    if vol.image.shape[0] != model.in_channels:
        raise UserError(f"{vol.case_id}: image has {vol.image.shape[0]} channel(s), the model expects "
                        f"{model.in_channels}")
    if model.spatial_dims == 3 and vol.image.ndim != 4:
        raise UserError(f"{vol.case_id}: a 2-D image was given to a 3-D model")
    pre = model.preprocessor(vol)
    probs = predict_probabilities(model, pre.image, pre.spacing, tta)
    return Preprocessor.restore_shape(probs, vol.spatial_shape)


def segment(model: TrainedModel, vol: Volume, tta: bool = False) -> np.ndarray:
    """Label map of ``vol`` at its native shape (the argmax of :func:`probabilities`)."""
    return probabilities(model, vol, tta).argmax(0).astype(np.uint8)
