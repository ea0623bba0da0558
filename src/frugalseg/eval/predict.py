"""``frugalseg predict``: one NIfTI in, a label map with the input's shape and affine out."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from frugalseg.data.checks import check_image
from frugalseg.data.nifti import from_ras, permuted_spacing, read_nifti, to_ras, write_nifti_atomic
from frugalseg.data.volume import Volume
from frugalseg.errors import UserError
from frugalseg.eval.inference import load_model, segment

SPACING_TOLERANCE = 1.5  # an input voxel this many times larger or smaller than training's along an axis is noted


def predict_file(run_dir: Path, input: Path, output: Path, force: bool = False, report=None) -> np.ndarray:
    """Segment ``input`` into ``output`` (a label map on the input's grid, with its affine and orientation).

    The scan is turned to the orientation the network was trained in (RAS: flips and axis permutations, no
    resampling) and the label map turned back, so the same scan stored flipped or with permuted axes gets the same
    segmentation in world space. ``report`` (a callable) hears of a voxel spacing clearly unlike training's.
    """
    output = Path(output)
    if not str(output).endswith((".nii", ".nii.gz")):
        raise UserError(f"{output}: output must end in .nii or .nii.gz")
    if Path(input).exists() and output.exists() and Path(input).resolve() == output.resolve():
        raise UserError(f"{output}: is the input scan itself; choose another output (--force never overwrites "
                        "an input)")
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
    ornt = None
    if image.ndim == 4:  # to the training orientation, and back for the label map
        ras, ras_affine, ornt = to_ras(np.moveaxis(image, 0, -1), affine)
        image, spacing = np.ascontiguousarray(np.moveaxis(ras, -1, 0)), permuted_spacing(spacing, ornt)
    _note_spacing(model, spacing, input, report)
    label = segment(model, Volume(Path(input).name, image, None, affine, spacing))
    if ornt is not None:
        label = from_ras(label, ornt)
    write_nifti_atomic(label, affine, output)
    return label


def _note_spacing(model, spacing: tuple[float, ...], input: Path, report) -> None:
    trained = model.spacing
    if report is None or not trained or model.cfg.data.spacing or len(trained) != len(spacing):
        return  # nothing recorded, or the model resamples every input to its own spacing anyway
    ratios = [s / t for s, t in zip(spacing, trained) if t > 0]
    if any(r > SPACING_TOLERANCE or r < 1 / SPACING_TOLERANCE for r in ratios):
        report(f"note: {input} has voxel spacing {tuple(round(s, 3) for s in spacing)} mm, training's was "
               f"{tuple(round(t, 3) for t in trained)}: the segmentation may suffer (set data.spacing to resample)")
