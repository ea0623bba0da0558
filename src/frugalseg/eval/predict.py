"""``frugalseg predict``: a scan or a folder of scans in, label maps (and optionally probabilities) out.

Each output keeps its input's grid, affine and orientation. The model is loaded once for a folder; scans already
segmented are skipped unless ``--force``; one scan that fails is named and the others go on.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from frugalseg.data.checks import check_image
from frugalseg.data.nifti import from_ras, permuted_spacing, read_nifti, to_ras, write_nifti_atomic
from frugalseg.data.readers import group_channels
from frugalseg.data.volume import Volume
from frugalseg.errors import UserError
from frugalseg.eval.inference import TrainedModel, load_model, probabilities

SPACING_TOLERANCE = 1.5  # an input voxel this many times larger or smaller than training's along an axis is noted
NIFTI = (".nii.gz", ".nii")
PROBABILITIES_SUFFIX = "_probabilities"


@dataclass
class PredictSummary:
    """What a ``predict`` call did."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (case, one-line reason)
    voxels: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        rate = f", {self.voxels / self.seconds / 1e6:.2f} M voxels/s" if self.seconds > 0 and self.voxels else ""
        text = f"{len(self.written)} segmented in {self.seconds:.1f} s{rate}"
        if self.skipped:
            text += f", {len(self.skipped)} already done (skipped; --force redoes them)"
        if self.failed:
            text += f", {len(self.failed)} failed: " + ", ".join(name for name, _ in self.failed)
        return text


def _stem(path: Path) -> str:
    name = path.name
    for ext in NIFTI:
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def load_any(model_path: Path | str, device: str = "auto") -> TrainedModel:
    """A run folder's model, or an ONNX file exported by ``frugalseg export``."""
    from frugalseg.hardware import pick_device

    if Path(model_path).suffix == ".onnx" and Path(model_path).is_file():
        from frugalseg.eval.export import load_onnx_model

        return load_onnx_model(model_path)
    return load_model(model_path, pick_device(device))


def predict(model_path: Path | str, input: Path | str, output: Path | str, force: bool = False, tta: bool = False,
            save_probabilities: bool = False, report=None, show_progress: bool = True,
            device: str = "auto") -> PredictSummary:
    """Segment ``input`` (a NIfTI scan, or a folder of them) into ``output`` (a file, or a folder created if needed).

    In a folder, nnU-Net's channel files ``case_0000.nii.gz``, ``case_0001.nii.gz``... are one case, written
    ``case.nii.gz``; any other scan keeps its file name. ``tta`` averages the class probabilities over the
    mirrorings of every spatial axis the network sees; ``save_probabilities`` also writes them, one 4-D float NIfTI
    per case (``<case>_probabilities.nii.gz``, classes along the last axis).
    """
    input, output = Path(input), Path(output)
    if not input.exists():
        raise UserError(f"{input}: file or folder not found")
    if input.is_dir():
        jobs = _folder_jobs(input, output, force)
    else:
        if output.is_dir():
            output = output / input.name
        target = _checked_output(input, output, force)
        if target is None:
            raise UserError(f"{output}: already exists (pass --force to overwrite)")
        jobs = [(input.name, [input], target)]
    model = load_any(model_path, device)
    summary = PredictSummary(skipped=[out for _, _, out in jobs if out is None])
    todo = [(name, files, out) for name, files, out in jobs if out is not None]
    plain = show_progress and report is not None and not sys.stderr.isatty()
    t0 = time.perf_counter()
    bar = tqdm(todo, desc="predict", unit="scan", disable=None if show_progress else True, leave=False)
    for i, (name, files, out) in enumerate(bar):
        t_case = time.perf_counter()
        try:
            voxels = predict_case(model, files, out, tta, save_probabilities, report)
        except UserError as exc:
            if len(jobs) == 1:
                raise
            summary.failed.append((name, str(exc)))
            if report is not None:
                report(f"failed: {exc}")
            continue
        summary.written.append(out)
        summary.voxels += voxels
        if plain:
            report(f"predict: {i + 1}/{len(todo)} {name} -> {out} ({time.perf_counter() - t_case:.1f} s)")
    bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def _checked_output(input_file: Path, output: Path, force: bool) -> Path | None:
    """``output`` for one scan: refused when it is no NIfTI name, when it is the input itself, or when its folder is
    not writable; ``None`` (skip) when it exists and ``force`` is not given."""
    if not output.name.endswith(NIFTI):
        raise UserError(f"{output}: output must end in .nii or .nii.gz")
    if input_file.exists() and output.exists() and input_file.resolve() == output.resolve():
        raise UserError(f"{output}: is the input scan itself; choose another output (--force never overwrites "
                        "an input)")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"{output}: folder {parent} does not exist or is not writable")
    if output.exists() and not force:
        return None
    return output


def _folder_jobs(input: Path, output: Path, force: bool) -> list[tuple[str, list[Path], Path | None]]:
    files = sorted(p for p in input.iterdir() if p.is_file() and p.name.endswith(NIFTI))
    if not files:
        raise UserError(f"{input}: no NIfTI scan (.nii or .nii.gz) in the folder")
    if output.exists() and not output.is_dir():
        raise UserError(f"{output}: a folder of scans needs an output folder, and this is a file")
    if output.resolve() == input.resolve():
        raise UserError(f"{output}: is the input folder; choose another output folder (--force never overwrites "
                        "an input)")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{output}: cannot create the output folder ({exc.strerror or exc})") from None
    jobs = []
    for case, paths in group_channels(files).items():
        ending = next(ext for ext in NIFTI if paths[0].name.endswith(ext))
        jobs.append((case, paths, _checked_output(paths[0], output / f"{case}{ending}", force)))
    return jobs


def predict_case(model: TrainedModel, files: list[Path], output: Path, tta: bool = False,
                 save_probabilities: bool = False, report=None) -> int:
    """Segment one case (its channel files) into ``output``; returns its number of voxels.

    The scan is turned to the orientation the network was trained in (RAS: flips and axis permutations, no
    resampling) and the label map turned back, so the same scan stored flipped or with permuted axes gets the same
    segmentation in world space. ``report`` hears of a voxel spacing clearly unlike training's.
    """
    channels, affine, zooms = [], None, None
    for path in files:
        data, aff, z = read_nifti(path)
        data = check_image(data, path)
        if data.ndim == 4:
            channels.extend(np.moveaxis(data, -1, 0))
        elif data.ndim in (2, 3):
            channels.append(data)
        else:
            raise UserError(f"{path}: unsupported image shape {data.shape}")
        if affine is None:
            affine, zooms = aff, z
        elif channels[-1].shape != channels[0].shape:
            raise UserError(f"{path}: channel shape {channels[-1].shape} differs from {channels[0].shape}")
    image = np.stack(channels).astype(np.float32)
    first = files[0]
    spacing = tuple(float(z) for z in zooms[: image.ndim - 1])
    if any(s <= 0 for s in spacing):
        raise UserError(f"{first}: voxel spacing {spacing} is missing or not positive")
    if image.shape[0] != model.in_channels:
        raise UserError(f"{first}: image has {image.shape[0]} channel(s), the model expects {model.in_channels}")
    if model.spatial_dims == 3 and image.ndim != 4:
        raise UserError(f"{first}: a 2-D image was given to a 3-D model")
    ornt = None
    if image.ndim == 4:  # to the training orientation, and back for the outputs
        ras, _, ornt = to_ras(np.moveaxis(image, 0, -1), affine)
        image, spacing = np.ascontiguousarray(np.moveaxis(ras, -1, 0)), permuted_spacing(spacing, ornt)
    _note_spacing(model, spacing, first, report)
    probs = probabilities(model, Volume(_stem(first), image, None, affine, spacing), tta)
    label = probs.argmax(0).astype(np.uint8)
    if ornt is not None:
        label = from_ras(label, ornt)
        probs = np.stack([from_ras(p, ornt) for p in probs])
    write_nifti_atomic(label, affine, output)
    if save_probabilities:
        ending = next(ext for ext in NIFTI if output.name.endswith(ext))
        target = output.with_name(output.name[: -len(ending)] + PROBABILITIES_SUFFIX + ending)
        write_nifti_atomic(np.moveaxis(probs, 0, -1), affine, target, dtype=np.float32)
    return int(np.prod(label.shape))


def predict_file(run_dir: Path, input: Path, output: Path, force: bool = False, report=None) -> np.ndarray:
    """One scan into one label map (see :func:`predict`); returns the label map."""
    import nibabel as nib

    summary = predict(run_dir, input, output, force=force, report=report, show_progress=False)
    return np.asarray(nib.load(str(summary.written[0])).dataobj)


def _note_spacing(model, spacing: tuple[float, ...], input: Path, report) -> None:
    trained = model.spacing
    if report is None or not trained or model.cfg.data.spacing or len(trained) != len(spacing):
        return  # nothing recorded, or the model resamples every input to its own spacing anyway
    ratios = [s / t for s, t in zip(spacing, trained) if t > 0]
    if any(r > SPACING_TOLERANCE or r < 1 / SPACING_TOLERANCE for r in ratios):
        report(f"note: {input} has voxel spacing {tuple(round(s, 3) for s in spacing)} mm, training's was "
               f"{tuple(round(t, 3) for t in trained)}: the segmentation may suffer (set data.spacing to resample)")
