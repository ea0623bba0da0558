"""Bad input across every command: the exact one-line message, exit code 2, and no output file created or changed.

One table, at least one row per kind of mistake a user makes; each row builds its own broken input.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
from pathlib import Path
from unittest import mock

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from frugalseg.cli import app
from frugalseg.recipes import available
from frugalseg.registry import METHODS

TINY = ["train.steps=4", "train.log_every=2", "train.checkpoint_every=2", "data.batch_size=4",
        "model.channels=[8,16,32]"]


def _invoke(args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def _sets(values):
    return [x for s in values for x in ("--set", s)]


@pytest.fixture(scope="module")
def models(phantoms_2d, phantoms_3d, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, data, extra in (("m2d", phantoms_2d, ["data.spatial_dims=2", "data.patch_size=[32,32]"]),
                              ("m3d", phantoms_3d, ["data.patch_size=[16,16,16]"])):
        code, out = _invoke(["train", "--data", data, "--labeled", 1, "--out", root / name, "--quiet",
                             *_sets(TINY + extra)])
        assert code == 0, out
    return root


def _nifti(path: Path, shape, spacing=(1.0, 1.0, 1.0)) -> Path:
    img = nib.Nifti1Image(np.random.default_rng(0).normal(size=shape).astype(np.float32), np.eye(4))
    img.header["pixdim"][1:1 + len(spacing)] = spacing
    nib.save(img, path)
    return path


def _copy(data: Path, dest: Path) -> Path:
    shutil.copytree(data, dest)
    return dest


def _cases(phantoms_2d, models, tmp: Path):
    """(name, args, exact message) rows; building a row may write broken inputs into ``tmp/inputs``."""
    inp = tmp / "inputs"
    inp.mkdir()
    out = tmp / "out"
    m2d, m3d = models / "m2d", models / "m3d"
    train = ["train", "--data", phantoms_2d, "--labeled", 1, "--quiet", "--out", out]

    leaving = _copy(phantoms_2d, inp / "leaving")
    meta = json.loads((leaving / "dataset.json").read_text())
    meta["training"][0]["image"] = "../elsewhere/case.nii.gz"
    (leaving / "dataset.json").write_text(json.dumps(meta))

    other_shape = _copy(phantoms_2d, inp / "other_shape")
    first, second = sorted((other_shape / "labelsTr").iterdir())[:2]
    lab = nib.load(second)
    arr = np.zeros(np.asarray(lab.dataobj).shape[:2] + (np.asarray(lab.dataobj).shape[2] + 3,), np.uint8)
    nib.save(nib.Nifti1Image(arr, lab.affine), first)  # the label of another case's shape

    channels = _copy(phantoms_2d, inp / "channels")
    img_path = sorted((channels / "imagesTr").iterdir())[0]
    img = nib.load(img_path)
    two = np.stack([np.asarray(img.dataobj)] * 2, -1)
    nib.save(nib.Nifti1Image(two, img.affine), img_path)

    zero = _copy(phantoms_2d, inp / "zero_spacing")
    zimg = sorted((zero / "imagesTr").iterdir())[0]
    z = nib.load(zimg)
    zi = nib.Nifti1Image(np.asarray(z.dataobj), z.affine, z.header)
    zi.header["pixdim"][2] = 0.0
    nib.save(zi, zimg)

    ns = inp / "unsafe.pt"  # a checkpoint that would call a function when unpickled
    torch.save({"opt": os.system, "state_dict": {"w": torch.zeros(2)}}, ns)
    pcrl = inp / "pcrlv2.pt"  # a PCRLv2-style checkpoint (argparse.Namespace) without PCRLv2 tensors
    torch.save({"opt": argparse.Namespace(lr=0.1), "state_dict": {"w": torch.zeros(2)}}, pcrl)
    garbage = inp / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(1).bytes(300))
    two_ch = _nifti(inp / "two_channels.nii.gz", (20, 20, 6, 2))
    flat = _nifti(inp / "flat.nii.gz", (20, 20), spacing=(1.0, 1.0))
    nospacing = _nifti(inp / "nospacing.nii.gz", (20, 20, 6), spacing=(1.0, 0.0, 1.0))
    good = _nifti(inp / "good.nii.gz", (20, 20, 6), spacing=(1.5, 1.5, 6.0))  # the training phantoms' spacing
    existing = inp / "existing.pt"
    existing.write_bytes(b"user file")

    return [
        ("data folder missing", ["train", "--data", inp / "nope", "--labeled", 1, "--out", out],
         f"--data {inp / 'nope'}: folder not found"),
        ("unknown method", [*train, "--method", "magic"],
         f"--method: unknown name 'magic' (choose from {', '.join(sorted(METHODS))})"),
        ("pre-training with a training method", ["pretrain", "--data", phantoms_2d, "--method", "supervised",
                                                 "--out", out],
         "--method supervised: not a pre-training method (use `frugalseg train`)"),
        ("bad config value", [*train, "--set", "optim.lr=fast"],
         "--set: config key 'optim.lr' expects float, got 'fast'"),
        ("too many labelled volumes", ["train", "--data", phantoms_2d, "--labeled", 99, "--out", out],
         "--labelled 99: only 5 labelled training volume(s) in " + str(phantoms_2d)),
        ("dataset.json path leaving the folder", ["train", "--data", leaving, "--labeled", 1, "--out", out],
         f"{leaving / 'dataset.json'}: path '../elsewhere/case.nii.gz' leaves the dataset folder"),
        ("label of another case's shape", ["train", "--data", other_shape, "--labeled", 5, "--out", out],
         None),
        ("wrong number of image channels (data)", ["train", "--data", channels, "--labeled", 5, "--out", out],
         f"{img_path}: image has 2 channel(s), dataset.json declares 1"),
        ("spacing zero (data)", ["train", "--data", zero, "--labeled", 5, "--out", out], None),
        ("unsafe pickle as --init", [*train, "--init", ns], None),
        ("random bytes as --init", [*train, "--init", garbage], None),
        ("corrupt model", ["evaluate", inp, "--data", phantoms_2d], f"{inp}/model.pt: no trained model in this "
                                                                     "run directory"),
        ("unknown split", ["evaluate", m2d, "--data", phantoms_2d, "--split", "nonsense"],
         "--split: unknown split 'nonsense' (choose from train, val, test, all)"),
        ("wrong number of image channels (predict)", ["predict", m2d, two_ch, inp / "p.nii.gz"],
         f"{two_ch}: image has 2 channel(s), the model expects 1"),
        ("2-D file to a 3-D model", ["predict", m3d, flat, inp / "p.nii.gz"],
         f"{flat}: a 2-D image was given to a 3-D model"),
        ("spacing zero (predict)", ["predict", m2d, nospacing, inp / "p.nii.gz"],
         f"{nospacing}: voxel spacing (1.0, 0.0, 1.0) is missing or not positive"),
        ("not a NIfTI file", ["predict", m2d, garbage, inp / "p.nii.gz"], None),
        ("benchmark: unknown recipe", ["benchmark", "--data", phantoms_2d, "--recipes", "nonsense", "--labeled", 1,
                                       "--seeds", 0, "--out", out],
         f"--recipes: unknown recipe 'nonsense' (available: {', '.join(available())})"),
        ("import-weights: missing file", ["import-weights", inp / "none.pt", out / "w.pt", "--format", "voco"],
         f"{inp / 'none.pt'}: weights file not found"),
        ("import-weights: pickled objects", ["import-weights", ns, inp / "w.pt", "--format", "voco"], None),
        ("import-weights: existing output", ["import-weights", ns, existing, "--format", "voco"],
         f"{existing}: already exists (add --force to overwrite)"),
        ("import-weights: unknown format", ["import-weights", ns, inp / "w.pt", "--format", "pcrl"],
         "--format: unknown format 'pcrl' (choose from voco, monai-ssl, pcrlv2)"),
        ("import-weights: not PCRLv2 tensors", ["import-weights", pcrl, inp / "w.pt", "--format", "pcrlv2"],
         f"{pcrl}: neither 'down_tr64.*' (3-D) nor ResNet-18 'conv1.weight' (2-D) tensors: not PCRLv2 weights"),
        ("import-weights: bad --in-channels", ["import-weights", pcrl, inp / "w.pt", "--format", "pcrlv2",
                                               "--in-channels", 0], "--in-channels: must be at least 1, got 0"),
        ("seed below 0", [*train, "--seed", -1], "--seed -1: a seed must be between 0 and 4294967295"),
        ("seed above 2^32-1", [*train, "--seed", 2**64],
         f"--seed {2**64}: a seed must be between 0 and 4294967295"),
        ("benchmark: seed below 0", ["benchmark", "--data", phantoms_2d, "--recipes", "random", "--labelled", 1,
                                     "--seeds", "0,-1", "--out", out], "--seeds -1: a seed must be between 0 and "
                                                                        "4294967295"),
        ("predict onto its own input", ["predict", m2d, good, good, "--force"],
         f"{good}: is the input scan itself; choose another output (--force never overwrites an input)"),
        ("disk full writing a prediction", ["predict", m2d, good, inp / "p.nii.gz"],
         f"{inp / 'p.nii.gz'}: No space left on device"),
        ("disk full writing an evaluation", ["evaluate", m2d, "--data", phantoms_2d, "--split", "val", "--quiet"],
         f"{m2d / 'eval_val.json'}: No space left on device"),
    ]


PATTERNS = {  # rows whose message embeds a library-dependent reason: the part we own must match exactly
    "label of another case's shape": r".*labelsTr/phantom_000\.nii\.gz: label shape \(\d+, \d+, \d+\) does not match "
                                     r"image shape \(\d+, \d+, \d+\)",
    "spacing zero (data)": r".*imagesTr/phantom_000\.nii\.gz: voxel spacing \(.*\) is missing or not positive",
    "unsafe pickle as --init": r".*unsafe\.pt: not a loadable PyTorch checkpoint \(.*\)",
    "random bytes as --init": r".*garbage\.pt: not a loadable PyTorch checkpoint \(.*\)",
    "not a NIfTI file": r".*garbage\.pt: cannot read NIfTI \(.*\)",
    "import-weights: pickled objects": r".*unsafe\.pt: not a loadable PyTorch checkpoint \(.*\)",
}


def _snapshot(*roots: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for r in roots if r.exists() for p in r.rglob("*")
            if p.is_file()}


def test_bad_input_table(phantoms_2d, models, tmp_path):
    rows = _cases(phantoms_2d, models, tmp_path)
    assert len(rows) >= 15
    problems = []
    for name, args, message in rows:
        before = _snapshot(tmp_path, models, phantoms_2d)
        disk_full = name.startswith("disk full")
        with mock.patch("frugalseg.files.os.fsync", side_effect=OSError(errno.ENOSPC, "No space left on device")) \
                if disk_full else mock.MagicMock():
            code, output = _invoke(args)
        lines = [ln for ln in output.strip().splitlines() if ln.strip()]
        text = lines[0][len("error: "):] if lines else ""
        if code != 2 or len(lines) != 1 or not lines[0].startswith("error: "):
            problems.append(f"{name}: exit {code}, output {output!r}")
        elif message is not None and text != message:
            problems.append(f"{name}: {text!r} != {message!r}")
        elif message is None and not re.fullmatch(PATTERNS[name], text):
            problems.append(f"{name}: {text!r} !~ {PATTERNS[name]!r}")
        if _snapshot(tmp_path, models, phantoms_2d) != before:
            problems.append(f"{name}: a file was created or changed")
    assert not problems, "\n".join(problems)
