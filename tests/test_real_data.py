"""Readers and a short end-to-end run on the real data in ../shared/data (skipped when absent)."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from frugalseg.cli import app
from frugalseg.data.readers import open_source
from frugalseg.data.splits import few_label_split

from .conftest import TINY, shared

pytestmark = pytest.mark.slow


def test_acdc_layout_and_frame_rebuild():
    root = shared("acdc")
    src = open_source(root)
    assert src.format == "ssl4mis_h5" and src.class_names == ["background", "RV", "Myo", "LV"]
    assert len(src.cases("train")) == 140 and len(src.cases("val")) == 20 and src.cases("test") == []
    assert len(src.labelled_pool) == 70 and all(c.endswith("frame01") for c in src.labelled_pool)
    slices = [ln.strip() for ln in (root / "train_slices.list").read_text().splitlines() if ln.strip()]
    frame = src.cases("train")[0]
    n = sum(1 for s in slices if s.startswith(frame + "_slice_"))
    vol = src.load(frame)
    assert vol.image.shape[:2] == (1, n) and vol.label.shape == vol.image.shape[1:]
    assert set(np.unique(vol.label)) <= {0, 1, 2, 3}
    val = src.load(src.cases("val")[0])
    assert 7 <= val.image.shape[1] <= 18
    split = few_label_split(src, 8, 0)
    assert len(set(split["labelled_cases"])) == 8 and all(c.endswith("frame01") for c in split["labelled_cases"])


def test_hippocampus_mixed_dtypes_and_float_labels():
    src = open_source(shared("hippocampus"))
    assert src.format == "decathlon" and src.class_names == ["background", "Anterior", "Posterior"]
    assert len(src.cases("all")) == 208
    assert len(src.cases("val")) == round(0.2 * 208)
    maxima = []
    for case in src.cases("all")[:40]:
        vol = src.load(case)
        assert vol.image.dtype == np.float32 and vol.label.dtype == np.int64
        assert set(np.unique(vol.label)) <= {0, 1, 2}
        maxima.append(float(vol.image.max()))
    assert max(maxima) / min(maxima) > 10  # intensity ranges differ by orders of magnitude


def test_hippocampus_train_and_evaluate_end_to_end(tmp_path):
    root = shared("hippocampus")
    out = tmp_path / "run"
    args = ["train", "--data", str(root), "--labeled", "1", "--seed", "0", "--out", str(out), "--quiet"]
    for s in TINY + ["data.patch_size=[32,32,32]"]:
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["evaluate", str(out), "--data", str(root), "--split", "val", "--quiet"])
    assert result.exit_code == 0, result.output
    res = json.loads((out / "eval_val.json").read_text())
    assert res["n_cases"] == 42 and 0.0 <= res["mean_dice"] <= 1.0
