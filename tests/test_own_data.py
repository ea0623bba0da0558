"""The user's own data: a plain folder of scans of which two are labelled, trained on and predicted in one call."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from frugalseg.cli import app

SETS = ["train.steps=4", "data.batch_size=2", "model.channels=[4,8]", "data.spatial_dims=2",
        "data.patch_size=[32,32]", "optim.warmup_steps=1"]


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def _sets(values=SETS):
    return [x for s in values for x in ("--set", s)]


@pytest.fixture(scope="module")
def folder(phantoms_2d, tmp_path_factory) -> Path:
    """imagesTr/ with 6 scans, labelsTr/ with the label maps of 2 of them; no dataset.json."""
    root = tmp_path_factory.mktemp("mine") / "data"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    scans = sorted((phantoms_2d / "imagesTr").iterdir())[:6]
    for i, scan in enumerate(scans):
        shutil.copy(scan, root / "imagesTr" / f"scan{i}.nii.gz")
        if i < 2:
            shutil.copy(phantoms_2d / "labelsTr" / scan.name, root / "labelsTr" / f"scan{i}.nii.gz")
    return root


def test_a_plain_folder_with_two_labels_trains_and_predicts_a_folder(folder, tmp_path):
    from frugalseg.data.readers import open_source

    src = open_source(folder)
    assert src.labelled_pool == ["scan0", "scan1"] and len(src.cases("train")) == 6 and src.cases("val") == []
    assert src.class_names == ["background", "class 1", "class 2", "class 3"] and src.notes  # said so
    run_dir = tmp_path / "run"
    code, output = run("train", "--data", folder, "--labelled", 2, "--method", "mean_teacher", "--out", run_dir,
                       "--quiet", *_sets())
    assert code == 0, output
    assert "no validation split is set aside automatically" in output
    split = json.loads((run_dir / "split.json").read_text())
    assert split["labelled_cases"] == ["scan0", "scan1"] and len(split["unlabelled_cases"]) == 6
    code, output = run("predict", run_dir, folder / "imagesTr", tmp_path / "seg", "--quiet")
    assert code == 0 and "6 segmented" in output, output
    for scan in sorted((folder / "imagesTr").iterdir()):
        seg, img = nib.load(tmp_path / "seg" / scan.name), nib.load(scan)
        assert seg.shape == img.shape and np.allclose(seg.affine, img.affine)
    code, output = run("predict", run_dir, folder / "imagesTr", tmp_path / "seg", "--quiet")  # again: all done
    assert code == 0 and "0 segmented" in output and "6 already done" in output
    code, output = run("predict", run_dir, folder / "imagesTr", tmp_path / "tta", "--tta", "flip", "--probabilities",
                       "--quiet")
    assert code == 0, output
    probs = nib.load(tmp_path / "tta" / "scan3_probabilities.nii.gz")
    assert probs.shape == (*nib.load(folder / "imagesTr" / "scan3.nii.gz").shape, 4)
    np.testing.assert_allclose(np.asarray(probs.dataobj).sum(-1), 1.0, atol=1e-4)
    assert np.array_equal(np.asarray(probs.dataobj).argmax(-1), np.asarray(nib.load(tmp_path / "tta" /
                                                                                   "scan3.nii.gz").dataobj))


def test_tta_differs_from_plain_prediction_only_where_the_flips_disagree(folder, tmp_path):
    from frugalseg.eval.inference import flip_sets, load_model, probabilities

    run_dir = tmp_path / "run"
    longer = _sets([*SETS, "train.steps=40", "model.channels=[8,16]"])  # a model whose mirrorings mostly agree
    assert run("train", "--data", folder, "--labelled", 2, "--out", run_dir, "--quiet", *longer)[0] == 0
    model = load_model(run_dir, torch.device("cpu"))
    from frugalseg.data.readers import open_source

    vol = open_source(folder).load("scan4", with_label=False)
    plain = probabilities(model, vol).argmax(0)
    tta = probabilities(model, vol, tta=True).argmax(0)
    net = model.net
    labels = []
    for axes in flip_sets(2):  # each mirroring alone, as TTA sees it

        def flipped(x, axes=axes):
            return net(x.flip(axes)).flip(axes) if axes else net(x)

        model.net = flipped
        labels.append(probabilities(model, vol).argmax(0))
    model.net = net
    agree = np.all([lab == labels[0] for lab in labels], axis=0)
    assert agree.mean() > 0.3 and not agree.all()
    np.testing.assert_array_equal(tta[agree], plain[agree])
    assert np.array_equal(labels[0], plain)


def test_init_dataset_and_an_explicit_empty_validation_list(folder, tmp_path):
    data = shutil.copytree(folder, tmp_path / "data")
    code, output = run("init-dataset", data / "imagesTr", data / "labelsTr", "--out", data, "--labels",
                       "1=crescent,2=wall,3=cavity")
    assert code == 0 and "6 scans, 2 labelled, classes 1=crescent, 2=wall, 3=cavity" in output, output
    meta = json.loads((data / "dataset.json").read_text())
    assert sum("label" in e for e in meta["training"]) == 2
    again = run("init-dataset", data / "imagesTr", data / "labelsTr", "--out", data)
    assert again[0] == 2 and "already exists" in again[1]
    outside = run("init-dataset", folder / "imagesTr", "--out", data, "--force")
    assert outside[0] == 2 and "must be inside --out" in outside[1]
    from frugalseg.data.readers import open_source

    src = open_source(data)
    assert src.class_names[1:] == ["crescent", "wall", "cavity"] and src.labelled_pool == ["scan0", "scan1"]
    meta["validation"] = []
    (data / "dataset.json").write_text(json.dumps(meta))
    assert open_source(data).cases("val") == [] and not open_source(data).notes  # the user's choice, said nothing


def test_an_extra_folder_of_unlabelled_scans(folder, phantoms_2d, tmp_path):
    extra = tmp_path / "more"
    extra.mkdir()
    for i, scan in enumerate(sorted((phantoms_2d / "imagesTr").iterdir())[6:8]):
        shutil.copy(scan, extra / f"extra{i}.nii.gz")
    run_dir = tmp_path / "pre"
    code, output = run("pretrain", "--data", folder, "--method", "byol", "--unlabelled", extra, "--out", run_dir,
                       "--quiet", *_sets())
    assert code == 0, output
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["unlabelled_cases"]) == 8 and {"extra0", "extra1"} <= set(split["unlabelled_cases"])
    assert json.loads((run_dir / "run.json").read_text())["unlabelled"] == str(extra)
    clash = tmp_path / "clash"
    clash.mkdir()
    shutil.copy(folder / "imagesTr" / "scan0.nii.gz", clash / "scan0.nii.gz")
    code, output = run("pretrain", "--data", folder, "--method", "byol", "--unlabelled", clash, "--out",
                       tmp_path / "p2", "--quiet", *_sets())
    assert code == 2 and "case id 'scan0' is also a case of --data" in output


def test_train_runs_a_whole_recipe_into_one_folder_and_resumes_it(folder, tmp_path):
    out = tmp_path / "bcp"
    quick = _sets([*SETS, "train.steps=2"])
    code, output = run("train", "--data", folder, "--labelled", 2, "--recipe", "bcp", "--out", out, "--quiet",
                       *quick)
    assert code == 0, output
    first = out / "stages" / "1-copy_paste"
    assert json.loads((first / "run.json").read_text())["status"] == "finished"
    meta = json.loads((out / "run.json").read_text())
    assert meta["method"] == "bcp" and meta["init"] == str(first / "model.pt")
    import yaml

    # --set reaches every stage and comes last (above the recipe's own 1,500 steps for bcp)
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["steps"] == 2
    assert yaml.safe_load((first / "config.yaml").read_text())["train"]["steps"] == 2
    code, output = run("train", "--data", folder, "--labelled", 2, "--recipe", "bcp", "--out", out, "--quiet",
                       "--resume", *quick)
    assert code == 2 and "every stage of recipe bcp already finished" in output
    code, output = run("train", "--data", folder, "--labelled", 2, "--recipe", "bcp", "--method", "bcp", "--out",
                       tmp_path / "x", "--quiet")
    assert code == 2 and "give one" in output
    code, output = run("train", "--data", folder, "--labelled", 2, "--recipe", "bcp", "--out", out, "--force",
                       "--quiet", *quick)
    assert code == 0, output


@pytest.mark.parametrize("text", ["\u00b2=LV", "1=LV,\u00b3=RV", "x=LV", "1=", "0=bg"])
def test_labels_option_refuses_non_ascii_digits_and_bad_pairs_with_a_user_error(text):
    from frugalseg.data.layout import parse_labels
    from frugalseg.errors import UserError

    with pytest.raises(UserError, match="--labels"):
        parse_labels(text)
    assert parse_labels("1=LV, 2=RV") == {1: "LV", 2: "RV"}


@pytest.mark.parametrize("choice", ["cuda:\u00b9", "cuda:", "gpu"])
def test_device_option_refuses_malformed_choices_with_a_user_error(choice):
    from frugalseg.errors import UserError
    from frugalseg.hardware import pick_device

    with pytest.raises(UserError, match="--device"):
        pick_device(choice)
