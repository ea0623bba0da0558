"""``frugalseg predict``: one NIfTI in, a label map with the input's shape and affine out."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from frugalseg.data.checks import check_image
from frugalseg.data.nifti import read_nifti, write_nifti_atomic
from frugalseg.data.volume import Volume
from frugalseg.errors import UserError
from frugalseg.eval.inference import load_model, segment


def predict_file(run_dir: Path, input: Path, output: Path, force: bool = False) -> np.ndarray:
    output = Path(output)
    if not str(output).endswith((".nii", ".nii.gz")):
        raise UserError(f"{output}: output must end in .nii or .nii.gz")
    if output.exists() and not force:
        raise UserError(f"{output}: already exists (pass --force to overwrite)")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"{output}: folder {parent} does not exist or is not writable")
    if Path(run_dir).suffix == ".onnx" and Path(run_dir).is_file():
        from frugalseg.eval.export import load_onnx_model

        model = load_onnx_model(run_dir)
    else:
        model = load_model(run_dir)
    data, affine, zooms = read_nifti(input)
    data = check_image(data, input)
    if data.ndim == 4:
        image = np.moveaxis(data, -1, 0)
    elif data.ndim in (2, 3):
        image = data[None]
    else:
        raise UserError(f"{input}: unsupported image shape {data.shape}")
    spacing = tuple(float(z) for z in zooms[: image.ndim - 1])
    if any(s <= 0 for s in spacing):
        raise UserError(f"{input}: voxel spacing {spacing} is missing or not positive")
    if image.shape[0] != model.in_channels:
        raise UserError(f"{input}: image has {image.shape[0]} channel(s), the model expects {model.in_channels}")
    if model.spatial_dims == 3 and image.ndim != 4:
        raise UserError(f"{input}: a 2-D image was given to a 3-D model")
    label = segment(model, Volume(Path(input).name, image, None, affine, spacing))
    write_nifti_atomic(label, affine, output)
    return label
