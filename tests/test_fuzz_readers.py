"""Fuzzing the readers with random bytes and random JSON: a clean one-line UserError, never another exception."""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from frugalseg.data.nifti import read_nifti
from frugalseg.data.readers import open_source
from frugalseg.errors import UserError
from frugalseg.nn.weights import read_state_dict

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)


def _clean(fn) -> None:
    try:
        fn()
    except UserError as exc:
        assert "\n" not in str(exc) and str(exc)


def _nifti_bytes() -> bytes:
    import nibabel as nib

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.nii"
        nib.save(nib.Nifti1Image(np.arange(120, dtype=np.float32).reshape(4, 5, 6), np.eye(4)), p)
        return p.read_bytes()


VALID_NIFTI = _nifti_bytes()


@FUZZ
@given(st.binary(max_size=2048), st.booleans())
def test_nifti_reader_random_bytes(blob, gz):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("x.nii.gz" if gz else "x.nii")
        path.write_bytes(gzip.compress(blob) if gz else blob)
        _clean(lambda: read_nifti(path))


@FUZZ
@given(st.integers(0, len(VALID_NIFTI) - 1), st.binary(min_size=1, max_size=64), st.booleans())
def test_nifti_reader_damaged_header_or_truncation(offset, patch, truncate):
    data = VALID_NIFTI[:offset] if truncate else VALID_NIFTI[:offset] + patch + VALID_NIFTI[offset + len(patch):]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.nii"
        path.write_bytes(data)
        _clean(lambda: read_nifti(path))


@FUZZ
@given(st.binary(max_size=4096))
def test_weights_reader_random_bytes(blob):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "w.pt"
        path.write_bytes(blob)
        _clean(lambda: read_state_dict(path))


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12),
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                   max_size=4), max_leaves=12)


@FUZZ
@given(st.one_of(st.dictionaries(st.sampled_from(["labels", "modality", "training", "validation", "test",
                                                    "channel_names", "file_ending", "numTraining"]), JSONISH,
                                 max_size=6),
                 JSONISH))
@example(content={"labels": {"\u00b2": None}})  # "²".isdigit() is True but int("²") raises: found by this test
@example(content={"labels": {"0": "background", "\u00b9": "LV"}})
def test_dataset_json_random_content(phantoms_2d, content):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "data"
        shutil.copytree(phantoms_2d, root)
        (root / "dataset.json").write_text(json.dumps(content))

        def load():
            src = open_source(root)
            for split in ("train", "val"):
                for case in src.cases(split)[:1]:
                    src.load(case)

        _clean(load)


@FUZZ
@given(st.binary(max_size=2048), st.sampled_from(["image", "label", "other"]))
def test_hdf5_slices_random_bytes_or_content(blob, key):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "data").mkdir()
        (root / "train.list").write_text("patient001_frame01\n")
        good = root / "data" / "patient001_frame01_slice_1.h5"
        with h5py.File(good, "w") as f:
            f["image"] = np.zeros((8, 8), np.float32)
            f["label"] = np.zeros((8, 8), np.uint8)
        bad = root / "data" / "patient001_frame01_slice_2.h5"
        if key == "other":
            bad.write_bytes(blob)
        else:
            with h5py.File(bad, "w") as f:
                arr = np.frombuffer(blob[: len(blob) // 4 * 4], dtype=np.float32)
                f[key] = arr.reshape(-1, 1) if arr.size else arr
                if key == "label":
                    f["image"] = np.zeros((8, 8), np.float32)
        _clean(lambda: open_source(root).load("patient001_frame01"))
