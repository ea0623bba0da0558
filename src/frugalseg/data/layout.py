"""``frugalseg init-dataset``: a ``dataset.json`` (Decathlon layout) for a folder of the user's scans."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from frugalseg.data.checks import check_label
from frugalseg.data.nifti import read_nifti
from frugalseg.data.readers import group_channels
from frugalseg.errors import UserError
from frugalseg.files import write_text_atomic

NIFTI = (".nii.gz", ".nii")


def parse_labels(text: str) -> dict[int, str]:
    """``"1=LV,2=RV"`` -> ``{1: "LV", 2: "RV"}`` (background 0 is implicit)."""
    out: dict[int, str] = {}
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        key, sep, name = item.partition("=")
        if not sep or not re.fullmatch(r"[0-9]+", key.strip()) or not name.strip():
            raise UserError(f"--labels {text!r}: expected index=name pairs, e.g. \"1=LV,2=RV\"")
        index = int(key)
        if index == 0 or index in out:
            raise UserError(f"--labels {text!r}: class {index} is {'background' if index == 0 else 'given twice'}")
        out[index] = name.strip()
    if sorted(out) != list(range(1, len(out) + 1)):
        raise UserError(f"--labels {text!r}: classes must be 1..K, got {sorted(out)}")
    return out


def _relative(path: Path, root: Path, option: str) -> str:
    try:
        return "./" + str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        raise UserError(f"{option} {path}: must be inside --out {root} (dataset.json lists paths relative to it; "
                        "put the scans in OUT/imagesTr and OUT/labelsTr)") from None


def init_dataset(images: Path, labels: Path | None, out: Path, class_labels: str | None = None,
                 modality: str = "MRI", force: bool = False) -> dict:
    """Write ``out/dataset.json`` for the scans in ``images`` (with the label maps of some of them in ``labels``,
    named like their image); returns the written mapping. Images without a label map are listed without one:
    training reads them as unlabelled scans."""
    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise UserError(f"{images}: folder not found")
    if labels is not None and not Path(labels).is_dir():
        raise UserError(f"{labels}: folder not found")
    target = out / "dataset.json"
    if target.exists() and not force:
        raise UserError(f"{target}: already exists (pass --force to overwrite)")
    files = sorted(p for p in images.iterdir() if p.is_file() and p.name.endswith(NIFTI))
    if not files:
        raise UserError(f"{images}: no NIfTI scan (.nii or .nii.gz)")
    groups = group_channels(files)
    if any(len(paths) > 1 for paths in groups.values()):
        raise UserError(f"{images}: several channel files per case (case_0000, case_0001...): that is nnU-Net's raw "
                        "layout, which frugalseg reads without a dataset.json listing the images")
    training, values = [], set()
    for case, (path,) in groups.items():
        entry = {"image": _relative(path, out, "IMAGES")}
        if labels is not None:
            lab = next((Path(labels) / f"{case}{ext}" for ext in NIFTI if (Path(labels) / f"{case}{ext}").is_file()),
                       None)
            if lab is not None:
                entry["label"] = _relative(lab, out, "LABELS")
                if class_labels is None:
                    data, _, _ = read_nifti(lab)
                    values |= {int(v) for v in np.unique(check_label(data, lab, 2**31))}
        training.append(entry)
    if not any("label" in e for e in training):
        raise UserError(f"{labels or images}: no label map named like an image (case.nii.gz for case.nii.gz)")
    names = parse_labels(class_labels) if class_labels else {k: f"class {k}" for k in range(1, max(values | {1}) + 1)}
    meta = {
        "name": out.resolve().name,
        "description": "written by frugalseg init-dataset",
        "tensorImageSize": "3D",
        "modality": {"0": modality},
        "labels": {"0": "background", **{str(k): v for k, v in sorted(names.items())}},
        "numTraining": len(training),
        "training": training,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, json.dumps(meta, indent=1) + "\n")
    return meta
