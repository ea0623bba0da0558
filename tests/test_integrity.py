"""Run integrity and input validation: nothing silently wrong, nothing a user made is lost (one test per defect)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from frugalseg.cli import app
from frugalseg.files import FolderLock
from tests.test_readers import _ssl4mis

SETS = ["train.steps=4", "train.log_every=1", "train.checkpoint_every=2", "data.batch_size=2",
        "model.channels=[4,8]", "data.spatial_dims=2", "data.patch_size=[32,32]", "optim.warmup_steps=1"]


def _sets(values=SETS):
    return [x for s in values for x in ("--set", s)]


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def _files(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} if root.exists() else {}


def _train(data, out, *extra):
    return run("train", "--data", data, "--labelled", 1, "--out", out, "--quiet", *_sets(), *extra)


def test_force_removes_only_a_folder_frugalseg_made(phantoms_2d, tmp_path):
    # a folder with a run.json that is not ours
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "run.json").write_text(json.dumps({"experiment": "mine"}))
    (theirs / "results.csv").write_text("precious")
    code, out = _train(phantoms_2d, theirs, "--force")
    assert code == 2 and "not one (its run.json was not written by frugalseg)" in out
    assert (theirs / "results.csv").read_text() == "precious"
    # our run folder into which the user put files of their own
    ours = tmp_path / "ours"
    assert _train(phantoms_2d, ours)[0] == 0
    (ours / "results.csv").write_text("precious")
    (ours / "data").mkdir()
    code, out = _train(phantoms_2d, ours, "--force")
    assert code == 2 and "it holds 'data', which frugalseg did not write" in out, out
    assert (ours / "results.csv").read_text() == "precious" and (ours / "data").is_dir()
    # our own run folder, as it was left: --force replaces it
    shutil.rmtree(ours / "data")
    (ours / "results.csv").unlink()
    code, out = _train(phantoms_2d, ours, "--force", "--seed", 3)
    assert code == 0, out
    assert json.loads((ours / "run.json").read_text())["seed"] == 3 and not (ours / ".lock").exists()


def _hold(folder: str, ready, stop) -> None:
    FolderLock(folder)
    ready.set()
    stop.wait(60)


def test_two_processes_cannot_write_one_run_folder(phantoms_2d, tmp_path):
    out = tmp_path / "run"
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(out), ready, stop))
    holder.start()
    try:
        assert ready.wait(60)
        before = _files(out)
        code, output = _train(phantoms_2d, out)
        assert code == 2 and f"another frugalseg process (pid {holder.pid}) is writing this folder" in output
        assert _files(out) == before
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # dies holding the lock: the system releases it
        holder.join()
    code, output = _train(phantoms_2d, out, "--force")  # a stale lock of a dead process is no obstacle
    assert code == 0, output


def _killed_run(phantoms_2d, tmp_path) -> Path:
    """A run stopped at step 4 of 8, with its checkpoint at step 4 and status 'running'."""
    out = tmp_path / "run"
    assert run("train", "--data", phantoms_2d, "--labelled", 1, "--out", out, "--quiet",
               *_sets([*SETS, "train.steps=8", "train.checkpoint_every=4"]))[0] == 0
    meta = json.loads((out / "run.json").read_text())
    meta["status"] = "running"
    (out / "run.json").write_text(json.dumps(meta))
    return out


def test_resume_refuses_another_configuration_or_data(phantoms_2d, tmp_path):
    out = _killed_run(phantoms_2d, tmp_path)
    same = _sets([*SETS, "train.steps=8", "train.checkpoint_every=4"])
    before = _files(out)
    code, output = run("train", "--data", phantoms_2d, "--labelled", 1, "--out", out, "--quiet", "--resume",
                       *same, "--set", "optim.lr=0.1")
    assert code == 2 and "the run was started with config key 'optim.lr' = 0.003, not 0.1" in output, output
    other = shutil.copytree(phantoms_2d, tmp_path / "other")
    code, output = run("train", "--data", other, "--labelled", 1, "--out", out, "--quiet", "--resume", *same)
    assert code == 2 and f"the run was started on --data {phantoms_2d}, not {other}" in output, output
    assert _files(out) == before


def test_resume_refuses_when_the_checkpoints_are_gone(phantoms_2d, tmp_path):
    out = _killed_run(phantoms_2d, tmp_path)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (out / name).unlink(missing_ok=True)
    before = _files(out)
    code, output = run("train", "--data", phantoms_2d, "--labelled", 1, "--out", out, "--quiet", "--resume",
                       *_sets([*SETS, "train.steps=8", "train.checkpoint_every=4"]))
    assert code == 2 and "its checkpoints are gone (the run had reached step 8)" in output, output
    assert _files(out) == before


def test_a_run_resumed_on_hardware_of_another_precision_says_so_and_records_both(phantoms_2d, tmp_path,
                                                                                monkeypatch):
    from frugalseg import hardware

    monkeypatch.setattr(hardware, "native_bf16", lambda: False)  # started on a CPU without bf16: fp32
    out, sets = tmp_path / "run", _sets([*SETS, "train.steps=8", "train.checkpoint_every=4"])
    assert run("train", "--data", phantoms_2d, "--labelled", 1, "--out", out, "--quiet", "--keep-checkpoint",
               *sets)[0] == 0
    meta = json.loads((out / "run.json").read_text())
    assert meta["precision"] == "fp32"
    meta["status"] = "running"  # as if stopped after its last checkpoint
    (out / "run.json").write_text(json.dumps(meta))
    monkeypatch.setattr(hardware, "native_bf16", lambda: True)  # resumed where bf16 runs in hardware
    code, output = run("train", "--data", phantoms_2d, "--labelled", 1, "--out", out, "--quiet", "--resume", *sets)
    assert code == 0, output
    assert "the run started in fp32 and continues in bf16 on this machine" in output, output
    assert json.loads((out / "run.json").read_text())["precision"] == "fp32, then bf16"


def test_predict_never_overwrites_its_input(phantoms_2d, tmp_path):
    model = tmp_path / "run"
    assert _train(phantoms_2d, model)[0] == 0
    scan = shutil.copy(sorted((phantoms_2d / "imagesTr").iterdir())[0], tmp_path / "scan.nii.gz")
    before = Path(scan).read_bytes()
    code, output = run("predict", model, scan, scan, "--force")
    assert code == 2 and "is the input scan itself" in output
    assert Path(scan).read_bytes() == before


def test_duplicate_case_ids_are_refused(phantoms_2d, tmp_path):
    twice = shutil.copytree(phantoms_2d, tmp_path / "twice")
    meta = json.loads((twice / "dataset.json").read_text())
    meta["training"].append(meta["training"][0])
    (twice / "dataset.json").write_text(json.dumps(meta))
    code, output = _train(twice, tmp_path / "r1")
    assert code == 2 and "case 'phantom_000' is listed twice under 'training'" in output, output
    folders = shutil.copytree(phantoms_2d, tmp_path / "folders")
    (folders / "more").mkdir()
    shutil.copy(folders / "imagesTr" / "phantom_000.nii.gz", folders / "more" / "phantom_000.nii.gz")
    meta = json.loads((folders / "dataset.json").read_text())
    meta["training"].append({"image": "./more/phantom_000.nii.gz", "label": meta["training"][0]["label"]})
    (folders / "dataset.json").write_text(json.dumps(meta))
    code, output = _train(folders, tmp_path / "r2")
    assert code == 2 and "two images have the case id 'phantom_000'" in output, output
    acdc = _ssl4mis(tmp_path / "acdc")
    (acdc / "train.list").write_text("p001_frame01\np001_frame02\np001_frame01\n")
    code, output = run("train", "--data", acdc, "--labelled", 1, "--out", tmp_path / "r3", "--quiet")
    assert code == 2 and "train.list: case p001_frame01 is listed twice" in output, output
    assert not any((tmp_path / r).exists() for r in ("r1", "r2", "r3"))


def test_the_same_scan_stored_flipped_or_permuted_gets_the_same_segmentation(phantoms_3d, tmp_path):
    model = tmp_path / "run"
    sets = ["train.steps=3", "data.batch_size=2", "model.channels=[4,8]", "data.patch_size=[16,16,16]"]
    assert run("train", "--data", phantoms_3d, "--labelled", 1, "--out", model, "--quiet", *_sets(sets))[0] == 0
    src = sorted((phantoms_3d / "imagesTr").iterdir())[0]
    img = nib.load(src)
    data, affine = np.asarray(img.dataobj), img.affine
    # the same world: axis 0 flipped, then axes permuted (z, x, y), the affine adjusted to match
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, data.shape[0] - 1
    flipped = nib.Nifti1Image(np.ascontiguousarray(data[::-1]), affine @ flip)
    perm = np.zeros((4, 4))
    perm[0, 1] = perm[1, 2] = perm[2, 0] = perm[3, 3] = 1  # new voxel (k, i, j) is old voxel (i, j, k)
    permuted = nib.Nifti1Image(np.ascontiguousarray(np.transpose(data, (2, 0, 1))), affine @ perm)
    outs = {}
    for name, image in (("plain", img), ("flipped", flipped), ("permuted", permuted)):
        path = tmp_path / f"{name}.nii.gz"
        nib.save(image, path)
        assert run("predict", model, path, tmp_path / f"{name}_seg.nii.gz")[0] == 0
        seg = nib.load(tmp_path / f"{name}_seg.nii.gz")
        np.testing.assert_allclose(seg.affine, image.affine)  # written on the input's own grid
        outs[name] = nib.as_closest_canonical(seg).get_fdata()
    assert outs["plain"].any()
    np.testing.assert_array_equal(outs["flipped"], outs["plain"])
    np.testing.assert_array_equal(outs["permuted"], outs["plain"])


def test_one_extreme_voxel_does_not_zero_the_normalised_image():
    from frugalseg.data.preprocess import normalise

    x = np.random.default_rng(0).normal(size=(1, 16, 16, 4)).astype(np.float32)
    x[0, 0, 0, 0] = 3e38
    out = normalise(x, "zscore")
    assert np.isfinite(out).all() and (out != 0).mean() > 0.99 and out[0, 0, 0, 0] > 10


def test_hd95_of_files_without_spacing_is_in_voxels(tmp_path):
    from frugalseg.eval.evaluate import evaluate_model
    from frugalseg.eval.inference import load_model

    acdc = _ssl4mis(tmp_path / "acdc", n_slices=6)
    model = tmp_path / "run"
    sets = ["train.steps=2", "data.batch_size=2", "model.channels=[4,8]", "data.patch_size=[8,8]"]
    assert run("train", "--data", acdc, "--labelled", 1, "--out", model, "--quiet", *_sets(sets))[0] == 0
    results, _ = evaluate_model(load_model(model), acdc, "val", show_progress=False)
    assert results["hd95_unit"] == "voxel"
    code, output = run("evaluate", model, "--data", acdc)
    assert code == 0 and "voxels (the files store no spacing)" in output


@pytest.mark.parametrize("args, message", [
    (["--seed", -1], "--seed -1: a seed must be between 0 and 4294967295"),
    (["--seed", 99999999999999999999], "--seed 99999999999999999999: a seed must be between 0 and 4294967295"),
])
def test_seeds_out_of_range_are_refused_up_front(phantoms_2d, tmp_path, args, message):
    code, output = _train(phantoms_2d, tmp_path / "r", *args)
    assert code == 2 and output.strip() == f"error: {message}" and not (tmp_path / "r").exists()


def test_benchmark_seeds_out_of_range_write_nothing(phantoms_2d, tmp_path):
    out = tmp_path / "bench"
    code, output = run("benchmark", "--data", phantoms_2d, "--recipes", "random", "--labelled", 1, "--seeds", "0,-1",
                       "--out", out, "--quiet")
    assert code == 2 and "--seeds -1: a seed must be between 0 and 4294967295" in output and not out.exists()


def test_a_labelled_slice_without_its_label_is_one_line_before_anything_is_written(tmp_path):
    acdc = _ssl4mis(tmp_path / "acdc", n_slices=4)
    path = acdc / "data" / "p002_frame01_slice_2.h5"
    with h5py.File(path, "w") as f:
        f["image"] = np.zeros((8, 9), np.float32)
    code, output = run("train", "--data", acdc, "--labelled", 1, "--seed", 0, "--out", tmp_path / "r", "--quiet")
    assert code == 2 and output.strip() == f"error: {path}: no 'label' dataset", output
    assert not (tmp_path / "r").exists()


def test_a_damaged_validation_case_is_found_before_training(phantoms_2d, tmp_path):
    data = shutil.copytree(phantoms_2d, tmp_path / "data")
    val = json.loads((data / "dataset.json").read_text())["validation"][0]
    (data / "labelsTr" / f"{val}.nii.gz").write_bytes(b"\x1f\x8b damaged")
    code, output = _train(data, tmp_path / "r")
    assert code == 2 and f"labelsTr/{val}.nii.gz: cannot read NIfTI" in output, output
    assert not (tmp_path / "r").exists()


def test_a_file_that_is_not_a_checkpoint_is_named_as_such(phantoms_2d, tmp_path):
    garbage = tmp_path / "weights.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(200))
    code, output = _train(phantoms_2d, tmp_path / "r", "--init", garbage)
    assert code == 2 and output.strip() == (f"error: {garbage}: not a loadable PyTorch checkpoint (damaged, or not "
                                            "a PyTorch file)")
    assert "weights_only" not in output
    out = _killed_run(phantoms_2d, tmp_path)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (out / name).write_bytes(b"PK\x03\x04 torn")
    code, output = run("train", "--data", phantoms_2d, "--labelled", 1, "--out", out, "--quiet", "--resume",
                       *_sets([*SETS, "train.steps=8", "train.checkpoint_every=4"]))
    assert code == 2 and "checkpoint.prev.pt: not a readable checkpoint (damaged, or not a PyTorch file)" in output
    assert "weights_only" not in output
