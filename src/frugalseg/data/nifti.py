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


def to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``data`` (first three axes spatial) and ``affine`` turned to the closest RAS orientation by flips and axis
    permutations (no resampling); returns ``(data, affine, ornt)``, ``ornt`` the nibabel orientation that undoes
    nothing by itself (see :func:`from_ras`). 2-D data is returned as it is."""
    from nibabel import orientations as o

    if data.ndim < 3:
        return data, affine, np.array([[0, 1], [1, 1]], dtype=float)
    ornt = o.io_orientation(affine)
    if np.array_equal(ornt, o.axcodes2ornt(("R", "A", "S"))):
        return data, affine, ornt
    ras = o.apply_orientation(data, ornt)
    new_affine = affine @ o.inv_ornt_aff(ornt, data.shape[:3])
    return np.ascontiguousarray(ras), new_affine, ornt


def from_ras(data: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Undo :func:`to_ras` on an array of the RAS grid (a label map): back to the file's own axis order."""
    from nibabel import orientations as o

    if data.ndim < 3 or np.array_equal(ornt, o.axcodes2ornt(("R", "A", "S"))):
        return data
    back = o.ornt_transform(o.axcodes2ornt(("R", "A", "S")), ornt)
    return np.ascontiguousarray(o.apply_orientation(data, back))


def permuted_spacing(zooms: tuple[float, ...], ornt: np.ndarray) -> tuple[float, ...]:
    """The voxel spacing along the axes of the RAS grid :func:`to_ras` made."""
    if len(zooms) < 3:
        return tuple(zooms)
    out = [0.0] * 3
    for axis, (target, _) in enumerate(ornt[:3]):
        out[int(target)] = zooms[axis]
    return tuple(out) + tuple(zooms[3:])
