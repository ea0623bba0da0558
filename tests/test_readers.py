import json

import h5py
import nibabel as nib
import numpy as np
import pytest

from frugalseg.data.readers import open_source
from frugalseg.errors import UserError


def _nifti(path, array, spacing=(1.0, 1.0, 1.0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), path)


def _decathlon(root, n=5, labels=None, with_validation=False):
    entries = []
    for i in range(n):
        img = np.random.default_rng(i).random((6, 7, 5)).astype(np.float32)
        lab = (img > 0.5).astype(np.uint8)
        _nifti(root / "imagesTr" / f"c{i}.nii.gz", img)
        _nifti(root / "labelsTr" / f"c{i}.nii.gz", lab)
        entries.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    meta = {"labels": labels or {"0": "background", "1": "fg"}, "modality": {"0": "MRI"}, "training": entries}
    if with_validation:
        meta["validation"] = ["c0"]
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_decathlon_default_validation_is_fixed_20_percent(tmp_path):
    src = open_source(_decathlon(tmp_path / "d", n=10))
    assert len(src.cases("val")) == 2 and len(src.cases("train")) == 8
    assert set(src.cases("val")).isdisjoint(src.cases("train"))
    again = open_source(tmp_path / "d")
    assert again.cases("val") == src.cases("val")  # deterministic, independent of any run seed
    assert sorted(src.cases("all")) == [f"c{i}" for i in range(10)]
    vol = src.load("c3")
    assert vol.image.shape == (1, 6, 7, 5) and vol.label.dtype == np.int64
    assert vol.label.sum() == (vol.image[0] > 0.5).sum()


def test_decathlon_own_validation_split_is_used(tmp_path):
    src = open_source(_decathlon(tmp_path / "d", n=4, with_validation=True))
    assert src.cases("val") == ["c0"] and "c0" not in src.cases("train")


def test_nnunet_raw_layout(tmp_path):
    root = tmp_path / "nn"
    for case in ("a", "b"):
        _nifti(root / "imagesTr" / f"{case}_0000.nii.gz", np.ones((4, 4, 4), np.float32))
        _nifti(root / "labelsTr" / f"{case}.nii.gz", np.ones((4, 4, 4), np.uint8))
    (root / "dataset.json").write_text(json.dumps(
        {"labels": {"background": 0, "organ": 1}, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}))
    src = open_source(root)
    assert src.class_names == ["background", "organ"]
    assert sorted(src.cases("all")) == ["a", "b"]
    assert src.load("a").label.sum() == 64


def test_float_labels_are_cast(tmp_path):
    root = _decathlon(tmp_path / "d", n=2)
    _nifti(root / "labelsTr" / "c0.nii.gz", np.ones((6, 7, 5), np.float32))
    assert open_source(root).load("c0").label.dtype == np.int64


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda r: (r / "imagesTr" / "c0.nii.gz").write_bytes(b"\x1f\x8b garbage"), "c0.nii.gz: cannot read NIfTI"),
        (lambda r: _nifti(r / "labelsTr" / "c0.nii.gz", np.zeros((6, 7, 4), np.uint8)),
         "label shape (6, 7, 4) does not match image shape (6, 7, 5)"),
        (lambda r: _nifti(r / "labelsTr" / "c0.nii.gz", np.zeros((6, 7, 5), np.uint8), (2.0, 1.0, 1.0)),
         "label affine differs from the image affine"),
        (lambda r: _nifti(r / "labelsTr" / "c0.nii.gz", np.full((6, 7, 5), 5, np.uint8)),
         "label values [5] outside the declared classes 0..1"),
        (lambda r: _nifti(r / "imagesTr" / "c0.nii.gz", np.full((6, 7, 5), np.nan, np.float32)),
         "image contains NaN or Inf"),
        (lambda r: _nifti(r / "imagesTr" / "c0.nii.gz", np.zeros((6, 7, 5, 2), np.float32)),
         "image has 2 channel(s), dataset.json declares 1"),
    ],
)
def test_bad_case_files_name_the_file(tmp_path, corrupt, message):
    root = _decathlon(tmp_path / "d", n=2)
    corrupt(root)
    with pytest.raises(UserError) as info:
        open_source(root).load("c0")
    assert message in str(info.value)


def test_dataset_json_problems(tmp_path):
    with pytest.raises(UserError, match="folder not found"):
        open_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="unrecognised layout"):
        open_source(tmp_path / "empty")
    root = _decathlon(tmp_path / "d", n=2)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][0]["image"] = "../../etc/passwd"
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="leaves the dataset folder"):
        open_source(root)
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "fg"}, "training": []}))
    with pytest.raises(UserError, match="no labelled training case"):
        open_source(root)


def _ssl4mis(root, frames=("p001_frame01", "p001_frame02", "p002_frame01"), n_slices=11):
    (root / "data").mkdir(parents=True)
    for frame in frames:
        for k in range(1, n_slices + 1):
            with h5py.File(root / "data" / f"{frame}_slice_{k}.h5", "w") as f:
                f["image"] = np.full((8, 9), k / 100, np.float32)
                f["label"] = np.full((8, 9), k % 4, np.uint8)
    with h5py.File(root / "data" / "p009_frame01.h5", "w") as f:
        f["image"] = np.zeros((3, 8, 9), np.float32)
        f["label"] = np.zeros((3, 8, 9), np.uint8)
    (root / "train.list").write_text("\n".join(frames) + "\n")
    (root / "val.list").write_text("p009_frame01\n")
    return root


def test_ssl4mis_rebuilds_frames_in_slice_order(tmp_path):
    src = open_source(_ssl4mis(tmp_path / "acdc"))
    assert src.format == "ssl4mis_h5"
    assert src.labelled_pool == ["p001_frame01", "p002_frame01"]  # end-diastolic frames only
    vol = src.load("p001_frame02")
    assert vol.image.shape == (1, 11, 8, 9)
    # slice 10 must follow slice 9 (numeric, not lexicographic order)
    np.testing.assert_allclose(vol.image[0, :, 0, 0], np.arange(1, 12) / 100, rtol=1e-6)
    np.testing.assert_array_equal(vol.label[:, 0, 0], np.arange(1, 12) % 4)
    assert src.load("p009_frame01").image.shape == (1, 3, 8, 9)


def test_ssl4mis_truncated_h5_and_missing_slice(tmp_path):
    root = _ssl4mis(tmp_path / "acdc")
    (root / "data" / "p001_frame01_slice_3.h5").write_bytes(b"\x89HDF\r\n truncated")
    with pytest.raises(UserError, match="p001_frame01_slice_3.h5: cannot read HDF5"):
        open_source(root).load("p001_frame01")
    (root / "data" / "p002_frame01_slice_5.h5").unlink()
    with pytest.raises(UserError, match=r"frame p002_frame01 is missing slice file\(s\) \[5\]"):
        open_source(root)
