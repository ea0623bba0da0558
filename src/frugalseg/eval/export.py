"""``frugalseg export``: a trained network as ONNX, with what inference needs stored in the file's metadata.

``frugalseg predict model.onnx in.nii.gz out.nii.gz`` then runs it with ONNX Runtime, with the same
preprocessing, windowing and resampling as the PyTorch model. Needs the ``onnx`` extra.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from frugalseg.errors import UserError
from frugalseg.eval.inference import TrainedModel, load_model
from frugalseg.files import write_atomic

META_KEY = "frugalseg"
OPSET = 17
TOLERANCE = 1e-4


def _need_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise UserError("ONNX support needs the onnx extra: pip install 'frugalseg[onnx]'") from None
    return onnx, onnxruntime


def export_onnx(run_dir: Path, output: Path, force: bool = False) -> float:
    """Write ``output`` (atomically); returns the largest |ONNX − PyTorch| logit difference on a random input."""
    onnx, ort = _need_onnx()
    output = Path(output)
    if output.suffix != ".onnx":
        raise UserError(f"{output}: output must end in .onnx")
    if output.exists() and not force:
        raise UserError(f"{output}: already exists (pass --force to overwrite)")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"{output}: folder {parent} does not exist or is not writable")
    model = load_model(run_dir, torch.device("cpu"))
    net = model.net.float().eval().to(memory_format=torch.contiguous_format)
    patch = tuple(model.cfg.data.patch_size)
    example = torch.randn(2, model.in_channels, *patch, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (example,), buffer, dynamo=False, opset_version=OPSET, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load_from_string(buffer.getvalue())
    meta = {"config": model.cfg.to_dict(), "class_names": model.class_names, "in_channels": model.in_channels,
            "source": str(run_dir), "spacing": model.spacing}
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    data = proto.SerializeToString()
    got = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"image": example.numpy()})[0]
    with torch.no_grad():
        want = net(example).numpy()
    diff = float(np.abs(got - want).max())
    if diff > TOLERANCE * max(1.0, float(np.abs(want).max())):
        raise UserError(f"{output}: the ONNX model differs from PyTorch by {diff:.2e}; not written")
    write_atomic(output, lambda f: f.write(data))
    return diff


class OnnxNet:
    """An ONNX Runtime session that behaves like the network for inference: any spatial size is handled by
    Gaussian sliding windows of the training patch size (the exported graph has a fixed spatial shape)."""

    def __init__(self, session, patch: tuple[int, ...], overlap: float) -> None:
        self.session, self.patch, self.overlap = session, patch, overlap

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"image": x.float().contiguous().numpy()})[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) == self.patch:
            return self._run(x)
        from monai.inferers import sliding_window_inference

        return sliding_window_inference(x, self.patch, 4, self._run, overlap=self.overlap, mode="gaussian")

    def eval(self):
        return self


def load_onnx_model(path: Path) -> TrainedModel:
    """A :class:`TrainedModel` backed by ONNX Runtime, from a file written by :func:`export_onnx`."""
    from frugalseg.config import config_from_dict

    onnx, ort = _need_onnx()
    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
        meta = json.loads({p.key: p.value for p in proto.metadata_props}[META_KEY])
        cfg = config_from_dict(meta["config"], str(path))
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    except (KeyError, ValueError, TypeError, OSError) as exc:
        raise UserError(f"{path}: not an ONNX model exported by frugalseg ({str(exc).splitlines()[0][:120]})"
                        ) from None
    except Exception as exc:  # onnx / onnxruntime parse errors have their own types
        raise UserError(f"{path}: unreadable ONNX model ({type(exc).__name__})") from None
    cfg.train.precision = "fp32"
    net = OnnxNet(session, tuple(cfg.data.patch_size), cfg.eval.sw_overlap)
    return TrainedModel(net, cfg, list(meta["class_names"]), int(meta["in_channels"]), torch.device("cpu"),
                        meta.get("spacing"))
