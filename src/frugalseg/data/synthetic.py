"""Deterministic synthetic phantoms: the embedded default dataset for the demo and the tests.

Each subject is a heart-like structure: a cavity (class 3) inside a wall (class 2), with a crescent-shaped
neighbour (class 1) on one side, plus distractor blobs with overlapping intensities. Subjects differ in position,
size, orientation, wall thickness, class intensities, a smooth multiplicative bias field and noise, so one
labelled subject does not already give Dice close to 1. Phantoms are written in the Decathlon layout the readers
accept (NIfTI with a spacing in the affine, ``dataset.json`` with training/validation/test lists).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CLASS_NAMES = ["background", "crescent", "wall", "cavity"]
SHAPE_2D = (64, 64, 10)  # slice-wise data: in-plane 64x64, 10 thick slices along the last axis
SPACING_2D = (1.5, 1.5, 6.0)
SHAPE_3D = (40, 48, 40)
SPACING_3D = (1.0, 1.0, 1.0)


def _bias_field(rng: np.random.Generator, coords: list[np.ndarray], strength: float) -> np.ndarray:
    field = np.zeros_like(coords[0])
    for c in coords:
        field += rng.uniform(-1, 1) * c + rng.uniform(-0.5, 0.5) * c**2
    return np.exp(strength * field)


def phantom(seed: int, shape: tuple[int, ...], spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One subject: ``(image float32, label uint8)`` of ``shape``; fully determined by ``seed``."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1, 1, n) * n * s / 2 for n, s in zip(shape, spacing)]
    coords = np.meshgrid(*axes, indexing="ij")
    extent = min(n * s for n, s in zip(shape[:2], spacing[:2])) / 2
    centre = [rng.uniform(-0.2, 0.2) * extent for _ in range(2)]
    centre.append(rng.uniform(-0.15, 0.15) * shape[2] * spacing[2] / 2)
    theta = rng.uniform(0, np.pi)
    x0, y0, z0 = (c - m for c, m in zip(coords, centre))
    x = np.cos(theta) * x0 + np.sin(theta) * y0
    y = -np.sin(theta) * x0 + np.cos(theta) * y0
    z = z0
    r_a, r_b = extent * rng.uniform(0.22, 0.34), extent * rng.uniform(0.18, 0.3)
    length = shape[2] * spacing[2] / 2 * rng.uniform(0.6, 0.95)
    taper = np.clip(1 - (z / length) ** 2, 0, None)  # the structure narrows towards its ends
    inner = (x / r_a) ** 2 + (y / r_b) ** 2
    thickness = rng.uniform(0.25, 0.5)
    label = np.zeros(shape, dtype=np.uint8)
    outer_r = taper * (1 + thickness) ** 2
    label[(inner < outer_r) & (taper > 0)] = 2
    label[(inner < taper) & (taper > 0.05)] = 3
    # crescent: an offset ellipse on one side, minus the wall
    side = rng.choice([-1, 1])
    cx = x - side * r_a * rng.uniform(1.1, 1.5)
    cres = (cx / (r_a * rng.uniform(0.8, 1.2))) ** 2 + (y / (r_b * rng.uniform(1.0, 1.5))) ** 2 < taper
    label[cres & (label == 0)] = 1

    means = {0: rng.uniform(0.1, 0.3), 1: rng.uniform(0.55, 0.95), 2: rng.uniform(0.3, 0.5), 3: rng.uniform(0.6, 1.0)}
    image = np.zeros(shape, dtype=np.float64)
    for k, m in means.items():
        image[label == k] = m
    # distractors: blobs of foreground-like intensity in the background
    for _ in range(rng.integers(2, 5)):
        bc = [rng.uniform(-0.8, 0.8) * n * s / 2 for n, s in zip(shape, spacing)]
        br = extent * rng.uniform(0.08, 0.2)
        blob = sum((c - m) ** 2 for c, m in zip(coords, bc)) < br**2
        image[blob & (label == 0)] = rng.uniform(0.4, 1.0)
    from scipy.ndimage import gaussian_filter

    image = gaussian_filter(image, sigma=[0.8 / s * min(spacing) for s in spacing])
    image *= _bias_field(rng, [c / (extent * 2) for c in coords], strength=rng.uniform(0.2, 0.5))
    image += rng.normal(0, rng.uniform(0.04, 0.1), shape)
    scale = rng.uniform(50, 2000)  # raw intensity ranges differ between subjects, as in real MRI
    return (image * scale).astype(np.float32), label


def write_phantoms(
    out: Path,
    spatial_dims: int = 2,
    n_train: int = 12,
    n_val: int = 4,
    n_test: int = 6,
    seed: int = 0,
) -> Path:
    """Write a Decathlon-layout phantom dataset to ``out`` and return it.

    Training, validation and test subjects come from disjoint seeds, so the test phantoms are unseen.
    """
    import nibabel as nib

    shape, spacing = (SHAPE_2D, SPACING_2D) if spatial_dims == 2 else (SHAPE_3D, SPACING_3D)
    out = Path(out)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    entries: dict[str, list[dict[str, str]]] = {"training": [], "validation": [], "test": []}
    counts = {"training": n_train, "validation": n_val, "test": n_test}
    index = 0
    for split, n in counts.items():
        for _ in range(n):
            case = f"phantom_{index:03d}"
            image, label = phantom(seed * 100_003 + index, shape, spacing)
            nib.save(nib.Nifti1Image(image, affine), out / "imagesTr" / f"{case}.nii.gz")
            nib.save(nib.Nifti1Image(label, affine), out / "labelsTr" / f"{case}.nii.gz")
            entries[split].append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
            index += 1
    meta = {
        "name": f"frugalseg-phantoms-{spatial_dims}d",
        "description": "Synthetic heart-like phantoms generated by frugalseg.data.synthetic",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {str(i): n for i, n in enumerate(CLASS_NAMES)},
        "numTraining": n_train + n_val,
        "training": entries["training"] + entries["validation"],
        "validation": [e["image"].split("/")[-1][: -len(".nii.gz")] for e in entries["validation"]],
        "test": entries["test"],
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))
    return out
