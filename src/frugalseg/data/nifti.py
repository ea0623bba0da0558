"""NIfTI input/output (nibabel), affine-aware, with one-line errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from frugalseg.errors import UserError
from frugalseg.files import write_atomic


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Read a NIfTI file fully. Returns ``(array, affine, spacing)``; any failure is a :class:`UserError`."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    quiet = logging.getLogger("nibabel.global")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # nibabel would print (and silently repair) header problems we report ourselves
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        if isinstance(img.header, nib.Nifti1Header):  # NIfTI-2 derives from it
            from nibabel.openers import ImageOpener

            with ImageOpener(str(path)) as f:
                raw = type(img.header).from_fileobj(f, check=False)
            zooms = tuple(float(z) for z in raw["pixdim"][1:1 + min(data.ndim, 3)])
    except Exception as exc:  # nibabel raises many types for corrupt/truncated files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: cannot read NIfTI ({reason})") from None
    finally:
        quiet.setLevel(level)
    if data.ndim < 2:
        raise UserError(f"{path}: expected an image with at least 2 dimensions, got shape {data.shape}")
    return data, affine, zooms


def write_nifti_atomic(array: np.ndarray, affine: np.ndarray, path: Path, dtype=np.uint8) -> None:
    """Write a NIfTI file through a temporary file in the same folder, then rename (never half-written)."""
    import nibabel as nib

    img = nib.Nifti1Image(array.astype(dtype), affine)
    img.header.set_data_dtype(dtype)
    write_atomic(path, lambda f: f.write(_nifti_bytes(img, Path(path).name.endswith(".gz"))))


def _nifti_bytes(img, compress: bool) -> bytes:
    raw = img.to_bytes()
    if not compress:
        return raw
    import gzip

    return gzip.compress(raw, compresslevel=6)
