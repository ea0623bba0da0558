"""The CLI end to end on synthetic phantoms, and bad input: one line, exit 2, nothing written."""

import json
import re

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from frugalseg.cli import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


TRAINED_SETS = [x for s in ["train.steps=6", "train.log_every=2", "train.checkpoint_every=3", "data.batch_size=4",
                             "model.channels=[8,16,32]", "data.spatial_dims=2", "data.patch_size=[32,32]"]
                for x in ("--set", s)]


@pytest.fixture(scope="module")
def trained(phantoms_2d, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    args = ["train", "--data", phantoms_2d, "--labeled", 2, "--seed", 1, "--out", out, "--quiet", *TRAINED_SETS]
    code, output = run(*args)
    assert code == 0, output
    return out


def test_train_writes_a_complete_run_dir(trained):
    for name in ("config.yaml", "split.json", "run.json", "log.jsonl", "model.pt", "learning_curve.png"):
        assert (trained / name).exists(), name
    # the full training state is removed once model.pt is written (--keep-checkpoint keeps it)
    assert not (trained / "checkpoint.pt").exists() and not (trained / "checkpoint.prev.pt").exists()
    split = json.loads((trained / "split.json").read_text())
    assert len(split["labelled_cases"]) == 2 and split["seed"] == 1
    meta = json.loads((trained / "run.json").read_text())
    assert meta["status"] == "finished" and meta["git"]


def test_evaluate_writes_json_with_the_contract(trained, phantoms_2d):
    code, output = run("evaluate", trained, "--data", phantoms_2d, "--split", "val", "--quiet")
    assert code == 0, output
    res = json.loads((trained / "eval_val.json").read_text())
    assert set(res["per_class_dice"]) == {"crescent", "wall", "cavity"}
    assert len(res["cases"]) == 2
    per_case = [np.mean(list(c["dice"].values())) for c in res["cases"]]
    assert res["mean_dice"] == pytest.approx(np.mean(per_case))
    assert "mean Dice" in output


def test_predict_keeps_shape_and_affine(trained, phantoms_2d, tmp_path):
    src = phantoms_2d / "imagesTr" / "phantom_000.nii.gz"
    out = tmp_path / "pred.nii.gz"
    code, output = run("predict", trained, src, out)
    assert code == 0, output
    a, b = nib.load(src), nib.load(out)
    assert a.shape == b.shape and np.allclose(a.affine, b.affine)
    assert set(np.unique(np.asarray(b.dataobj))) <= {0, 1, 2, 3}
    code, output = run("predict", trained, src, out)
    assert code == 2 and "already exists (pass --force" in output


def test_methods_lists_every_method_with_a_whole_first_sentence():
    code, output = run("methods")
    assert code == 0 and output.startswith("supervised")
    lines = output.strip().splitlines()
    from frugalseg.registry import METHODS

    assert [ln.split()[0] for ln in lines] == list(METHODS)
    assert all(ln.rstrip().endswith(".") for ln in lines), output  # no line cut mid-sentence
    pcrl = next(ln for ln in lines if ln.startswith("pcrlv2"))
    assert "pre-train" in pcrl and "with global and local (sub-crop) views." in pcrl


def test_labeled_is_an_alias_of_labelled(phantoms_2d, tmp_path):
    sets = ["--set", "train.steps=1", "--set", "data.batch_size=2", "--set", "model.channels=[4,8]",
            "--set", "data.spatial_dims=2", "--set", "data.patch_size=[32,32]"]
    for flag in ("--labelled", "--labeled"):
        code, output = run("train", "--data", phantoms_2d, flag, 1, "--out", tmp_path / flag, "--quiet", *sets)
        assert code == 0, output
        assert json.loads((tmp_path / flag / "split.json").read_text())["labelled"] == 1


def _snapshot(path):
    return {p: p.stat().st_mtime_ns for p in path.rglob("*")} if path.exists() else {}


def _bad_cases(phantoms_2d, trained, tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.pt").write_bytes(b"garbage")
    badpred = tmp_path / "x.nii.gz"
    badpred.write_bytes(b"\x1f\x8b not nifti")
    base = ["train", "--data", phantoms_2d, "--labeled", 1, "--quiet"]
    return [
        (["train", "--data", tmp_path / "nope", "--labeled", 1, "--out", tmp_path / "o"],
         r"--data .*nope: folder not found"),
        (base + ["--method", "magic", "--out", tmp_path / "o"], r"--method: unknown name 'magic'"),
        (base + ["--set", "train.stepz=1", "--out", tmp_path / "o"], r"unknown config key 'train.stepz'"),
        (base + ["--set", "optim.lr=fast", "--out", tmp_path / "o"],
         r"config key 'optim.lr' expects float, got 'fast'"),
        (["train", "--data", phantoms_2d, "--labeled", 99, "--out", tmp_path / "o"], r"--labelled 99: only 5 labelled"),
        (base + ["--out", trained], r"already exists; pass --resume to continue it or --force"),
        (base + ["--out", tmp_path / "o", "--init", tmp_path / "missing.pt"],
         r"--init .*missing.pt: weights file not found"),
        (["evaluate", corrupt, "--data", phantoms_2d], r"model.pt: not a readable checkpoint"),
        (["evaluate", trained, "--data", phantoms_2d, "--split", "nonsense"], r"--split: unknown split 'nonsense'"),
        (["predict", trained, badpred, tmp_path / "p.nii.gz"], r"x.nii.gz: cannot read NIfTI"),
        (["predict", trained, phantoms_2d / "dataset.json", tmp_path / "p.nii.gz"], r"dataset.json: cannot read NIfTI"),
    ]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(phantoms_2d, trained, tmp_path):
    for args, pattern in _bad_cases(phantoms_2d, trained, tmp_path):
        before_trained, before_tmp = _snapshot(trained), _snapshot(tmp_path)
        code, output = run(*args)
        lines = [ln for ln in output.strip().splitlines() if ln.strip()]
        assert code == 2, (args, output)
        assert len(lines) == 1 and lines[0].startswith("error: "), output
        assert re.search(pattern, lines[0]), (pattern, lines[0])
        assert "Traceback" not in output
        assert _snapshot(trained) == before_trained
        assert _snapshot(tmp_path) == before_tmp, args


def test_unwritable_output_path(phantoms_2d, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, output = run("train", "--data", phantoms_2d, "--labeled", 1, "--out", blocker / "run", "--quiet")
    assert code == 2 and "cannot write" in output and not (blocker.parent / "run").exists()


def test_force_refuses_a_folder_that_is_not_a_run(phantoms_2d, tmp_path):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    code, output = run("train", "--data", phantoms_2d, "--labeled", 1, "--out", precious, "--force")
    assert code == 2 and "not one" in output and (precious / "notes.txt").read_text() == "keep"


def test_resume_of_a_finished_run_is_refused(trained, phantoms_2d):
    code, output = run("train", "--data", phantoms_2d, "--labeled", 2, "--seed", 1, "--out", trained, "--resume")
    assert code == 2 and "already finished" in output
    code, output = run("train", "--data", phantoms_2d, "--labeled", 3, "--seed", 1, "--out", trained, "--resume")
    assert code == 2 and "started with labelled=2" in output


def test_resume_with_a_corrupt_checkpoint_is_one_line(trained, phantoms_2d, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    meta = json.loads((copy / "run.json").read_text())
    meta["status"] = "running"
    (copy / "run.json").write_text(json.dumps(meta))
    (copy / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    (copy / "checkpoint.prev.pt").unlink(missing_ok=True)  # no earlier checkpoint to fall back to
    before = _snapshot(copy)
    code, output = run("train", "--data", phantoms_2d, "--labeled", 2, "--seed", 1, "--out", copy, "--resume",
                       "--quiet", *TRAINED_SETS)
    assert code == 2 and "checkpoint.pt: not a readable checkpoint (damaged, or not a PyTorch file)" in output, output
    assert _snapshot(copy) == before


def test_corrupt_case_in_the_data_folder_names_the_file(phantoms_2d, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(phantoms_2d, data)
    img = nib.load(data / "imagesTr" / "phantom_000.nii.gz")
    arr = np.asarray(img.dataobj).astype(np.float32)
    arr[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(arr, img.affine), data / "imagesTr" / "phantom_000.nii.gz")
    code, output = run("train", "--data", data, "--labeled", 5, "--out", tmp_path / "o", "--quiet")
    assert code == 2 and "phantom_000.nii.gz: image contains NaN or Inf values" in output, output
    assert not (tmp_path / "o").exists()


def test_outputs_are_readable_by_others(trained):
    for name in ("run.json", "split.json", "model.pt"):
        assert (trained / name).stat().st_mode & 0o044 == 0o044, name


def test_demo_writes_its_figures_and_table(tmp_path):
    out = tmp_path / "demo"
    code, output = run("demo", "--out", out, "--steps", 3, "--quiet")
    assert code == 0, output
    for name in ("learning_curve.png", "prediction_overlay.png", "run/eval_test.json", "run/model.pt"):
        assert (out / name).is_file(), name
    res = json.loads((out / "run" / "eval_test.json").read_text())
    assert res["split"] == "test" and res["n_cases"] == 6  # unseen phantoms, not the training ones
    assert f"{res['mean_dice']:.3f}" in output
    code, output = run("demo", "--out", out, "--steps", 3, "--quiet")
    assert code == 2 and "already exists" in output


def test_learning_curve_is_log_scaled_only_for_positive_losses(tmp_path):
    import warnings

    from frugalseg.eval import plots

    plt = plots.pyplot()
    scales = []
    original = plt.Figure.savefig

    def spy(fig, *args, **kwargs):
        scales.append(fig.axes[0].get_yscale())
        return original(fig, *args, **kwargs)

    log_pos = [{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in range(1, 6)]
    log_neg = [{"step": s, "loss": -0.2 * s, "lr": 1e-3} for s in range(1, 6)]  # negative cosine (BYOL, PCRLv2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plt.Figure.savefig = spy
        try:
            plots.learning_curve(log_pos, tmp_path / "pos.png")
            plots.learning_curve(log_neg, tmp_path / "neg.png")
        finally:
            plt.Figure.savefig = original
    assert scales == ["log", "linear"] and (tmp_path / "neg.png").stat().st_size > 0


def test_every_help_page_shows_flags_as_flags():
    import typer.main

    commands = typer.main.get_command(app).commands
    assert {"train", "predict", "benchmark", "profile", "curve"} <= set(commands)
    for name in [None, *commands]:
        result = CliRunner().invoke(app, ([name] if name else []) + ["--help"], env={"COLUMNS": "160"})
        assert result.exit_code == 0, (name, result.output)
        assert "--help" in result.output and "<bool>" not in result.output, (name, result.output)


def test_a_sigterm_that_lands_in_a_finaliser_still_stops_the_command_in_one_line(capsys):
    """Python swallows an exception raised in a finaliser or weakref callback (prints it and goes on): a SIGTERM
    whose handler runs there must not be lost - it is delivered again, and the command stops cleanly."""
    import signal as sig

    import typer

    from frugalseg import cli

    class DiesUnderSigterm:
        def __del__(self):
            cli._terminated(sig.SIGTERM, None)  # as if the signal arrived while this finaliser ran

    @cli._guard
    def train():
        import time

        DiesUnderSigterm()  # collected at once: its finaliser gets the "signal"
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 5:  # the work goes on: the signal, sent again, must stop it
            sum(range(10))
        return "finished"

    before = sig.getsignal(sig.SIGTERM)
    try:
        with pytest.raises(typer.Exit) as stopped:
            train()
    finally:
        sig.signal(sig.SIGTERM, before)
    assert stopped.value.exit_code == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM" in err and "Traceback" not in err and "Exception ignored" not in err
