"""Checks applied to every volume a reader loads; each failure is one line naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from frugalseg.errors import UserError


def check_image(image: np.ndarray, path: Path | str) -> np.ndarray:
    if image.size == 0:
        raise UserError(f"{path}: image is empty")
    if not np.issubdtype(image.dtype, np.number):
        raise UserError(f"{path}: image has non-numeric type {image.dtype}")
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise UserError(f"{path}: image contains NaN or Inf values")
    return image


def check_label(label: np.ndarray, path: Path | str, num_classes: int) -> np.ndarray:
    """Cast a label map to int64, refusing non-integral values and classes outside ``0..num_classes-1``."""
    if not np.issubdtype(label.dtype, np.number):
        raise UserError(f"{path}: label has non-numeric type {label.dtype}")
    if np.issubdtype(label.dtype, np.floating):
        if not np.isfinite(label).all():
            raise UserError(f"{path}: label contains NaN or Inf values")
        rounded = np.rint(label)
        if np.abs(rounded - label).max(initial=0.0) > 1e-3:
            raise UserError(f"{path}: label has non-integer values (a label map must hold class indices)")
        label = rounded
    label = label.astype(np.int64)
    values = np.unique(label)
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise UserError(
            f"{path}: label values {bad.tolist()} outside the declared classes 0..{num_classes - 1}"
        )
    return label


def check_pair(image_shape: tuple[int, ...], label_shape: tuple[int, ...], label_path: Path | str) -> None:
    if tuple(image_shape) != tuple(label_shape):
        raise UserError(
            f"{label_path}: label shape {tuple(label_shape)} does not match image shape {tuple(image_shape)}"
        )


def check_affines(a: np.ndarray, b: np.ndarray, label_path: Path | str, tol: float = 1e-3) -> None:
    if not np.allclose(a, b, atol=tol):
        raise UserError(f"{label_path}: label affine differs from the image affine")
