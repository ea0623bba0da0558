"""The benchmark end to end on synthetic phantoms: files, cells, report means, resume, bad input."""

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from frugalseg import benchmark as bm
from frugalseg.cli import app
from frugalseg.recipes import load_recipe

TINY = ["train.steps=4", "train.log_every=2", "train.checkpoint_every=2", "data.batch_size=2",
        "model.channels=[4,8,16]", "data.patch_size=[32,32]", "data.spatial_dims=2"]


def _args(data, out, recipes="random,no-augment", labelled="1,2"):
    args = ["benchmark", "--data", str(data), "--recipes", recipes, "--labelled", labelled, "--seeds", "0",
            "--out", str(out), "--quiet"]
    for s in TINY:
        args += ["--set", s]
    return args


def test_benchmark_end_to_end_and_resume(phantoms_2d, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, _args(phantoms_2d, out))
    assert result.exit_code == 0, result.output
    for name in ("results.csv", "report.md", "dice_vs_labels.png", "per_class_dice.png", "overlays.png"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted((r["recipe"], r["labelled"]) for r in rows) == [
        ("no-augment", "1"), ("no-augment", "2"), ("random", "1"), ("random", "2")]
    report = (out / "report.md").read_text()
    for r in rows:  # one seed: the report's mean equals the csv value, and no spread is claimed
        assert f"{float(r['mean_dice']):.3f} (1 seed)" in report
    assert "± 0.000" not in report
    delta = float(rows[[r["recipe"] for r in rows].index("no-augment")]["mean_dice"]) - float(
        rows[[r["recipe"] for r in rows].index("random")]["mean_dice"])
    assert f"{delta:+.3f}" in report

    # a second run recomputes nothing
    calls = []
    monkeypatch.setattr("frugalseg.run.train", lambda *a, **k: calls.append(a))
    result = CliRunner().invoke(app, _args(phantoms_2d, out))
    assert result.exit_code == 0, result.output
    assert calls == []


def test_pretraining_stage_runs_once_per_seed_and_is_shared(phantoms_2d, tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "byol.yaml").write_text("stages:\n  - method: byol\n  - method: supervised\n")
    (recipes / "byol-twin.yaml").write_text(  # same pre-training, different fine-tuning: shares the chain
        "stages:\n  - method: byol\n  - method: supervised\n    set: {optim: {lr: 0.001}}\n")
    monkeypatch.setattr("frugalseg.recipes.recipes_dir", lambda: recipes)
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, _args(phantoms_2d, out, recipes="byol,byol-twin"))
    assert result.exit_code == 0, result.output
    chains = sorted((out / "pretrain").glob("*/s0"))
    assert len(chains) == 1 and chains[0].parent.name.startswith("byol-")
    pre = json.loads((chains[0] / "run.json").read_text())
    assert pre["method"] == "byol" and pre["labelled"] is None and pre["status"] == "finished"
    assert json.loads((chains[0] / "split.json").read_text())["labelled_cases"] == []
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4
    for r in rows:
        run = json.loads((out / "runs" / r["recipe"] / f"n{r['labelled']}_s0" / "run.json").read_text())
        assert run["init"] == str(chains[0] / "model.pt")
        assert float(r["pretrain_seconds"]) == pytest.approx(pre["train_seconds"])
    init = json.loads((out / "runs" / "byol" / "n1_s0" / "init_report.json").read_text())
    assert init["missing"] == [] and len(init["loaded"]) > 0


def test_a_labelled_stage_before_the_last_runs_once_per_n_and_seed(phantoms_2d, tmp_path, monkeypatch):
    """A recipe may start with a training stage (e.g. a supervised warm start): it reads the same N labelled
    volumes as the last stage, runs once per (N, seed), is shared by recipes that start with it, and its weights
    start the next stage."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "warm.yaml").write_text("stages:\n  - method: supervised\n  - method: mean_teacher\n")
    (recipes / "warm-twin.yaml").write_text(
        "stages:\n  - method: supervised\n  - method: mean_teacher\n    set: {optim: {lr: 0.001}}\n")
    monkeypatch.setattr("frugalseg.recipes.recipes_dir", lambda: recipes)
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, _args(phantoms_2d, out, recipes="warm,warm-twin", labelled="1,2"))
    assert result.exit_code == 0, result.output
    assert not (out / "pretrain").exists()
    chains = sorted((out / "chain").glob("*/*"))
    assert [c.name for c in chains] == ["n1_s0", "n2_s0"] and chains[0].parent.name.startswith("supervised-")
    for chain in chains:
        n = int(chain.name[1])
        first = json.loads((chain / "split.json").read_text())
        assert first["labelled"] == n and len(first["labelled_cases"]) == n
        for recipe in ("warm", "warm-twin"):
            cell = out / "runs" / recipe / f"n{n}_s0"
            assert json.loads((cell / "run.json").read_text())["init"] == str(chain / "model.pt")
            assert json.loads((cell / "split.json").read_text())["labelled_cases"] == first["labelled_cases"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4 and all(float(r["pretrain_seconds"]) > 0 for r in rows)


def test_a_recipe_is_any_chain_of_stages_ending_in_a_training_method(tmp_path, monkeypatch):
    from frugalseg.errors import UserError
    from frugalseg.recipes import load_recipe

    (tmp_path / "wrong.yaml").write_text("stages:\n  - method: supervised\n  - method: byol\n")
    (tmp_path / "twice.yaml").write_text("stages:\n  - method: supervised\n  - method: mean_teacher\n")
    monkeypatch.setattr("frugalseg.recipes.recipes_dir", lambda: tmp_path)
    assert [st.method for st in load_recipe("twice").stages] == ["supervised", "mean_teacher"]
    with pytest.raises(UserError, match="stage 2 \\(byol\\): the last stage must be a training method"):
        load_recipe("wrong")


def test_killed_benchmark_resumes_the_unfinished_cell(phantoms_2d, tmp_path, monkeypatch):
    from frugalseg.data.sampling import PatchSampler

    ref = tmp_path / "uninterrupted"
    assert CliRunner().invoke(app, _args(phantoms_2d, ref, recipes="random", labelled="1")).exit_code == 0
    expected = json.loads((ref / "runs" / "random" / "n1_s0" / "cell.json").read_text())

    out = tmp_path / "bench"
    real_batch = PatchSampler.batch

    def dies_at_step_3(self, step):
        if step == 3:
            raise KeyboardInterrupt  # killed after the checkpoint at step 2
        return real_batch(self, step)

    monkeypatch.setattr(PatchSampler, "batch", dies_at_step_3)
    result = CliRunner().invoke(app, _args(phantoms_2d, out, recipes="random", labelled="1"))
    assert result.exit_code == 130 and "interrupted" in result.output
    cell = out / "runs" / "random" / "n1_s0"
    assert not (cell / "cell.json").exists()
    monkeypatch.setattr(PatchSampler, "batch", real_batch)
    result = CliRunner().invoke(app, _args(phantoms_2d, out, recipes="random", labelled="1"))
    assert result.exit_code == 0, result.output
    steps = [json.loads(ln)["step"] for ln in (cell / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4]  # resumed from step 2, not restarted
    got = json.loads((cell / "cell.json").read_text())
    assert got["mean_dice"] == pytest.approx(expected["mean_dice"], abs=1e-6)


@pytest.mark.parametrize("override, message", [
    ({"recipes": "nonsense"}, "--recipes: unknown recipe 'nonsense'"),
    ({"labelled": "1,99"}, "--labelled 99: must be between 1 and the 5"),
    ({"labelled": ","}, "--labelled: empty list"),
    ({"labelled": "one"}, "--labelled: cannot read 'one'"),
    ({"recipes": "random,random"}, "--recipes: a recipe is listed twice"),
    # a later stage's bad option is found before the first stage runs (TINY nets have 2 decoder blocks)
    ({"recipes": "gcl-gd+lcl-lr", "extra": ["--set", "data.batch_size=4"]},
     "recipe gcl-gd+lcl-lr, stage lcl: --method lcl: method.decoder_blocks must be in 1..2 for model.channels "
     "[4, 8, 16], got 3"),
    ({"recipes": "gcl-gd", "extra": ["--set", "data.batch_size=6"]},
     "recipe gcl-gd, stage gcl: --method gcl: data.batch_size (6) must be a multiple of the 4 partitions"),
])
def test_benchmark_bad_input(phantoms_2d, tmp_path, override, message):
    out = tmp_path / "bench"
    args = _args(phantoms_2d, out, **{k: v for k, v in override.items() if k != "extra"}) + override.get("extra", [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()


def test_report_delta_is_paired_by_seed():
    rows = [{"recipe": r, "labelled": 1, "seed": s, "split": "val", "mean_dice": d, "dice_a": d, "mean_hd95": 1.0,
             "train_seconds": 100.0 + 20 * s, "pretrain_seconds": 0.0 if r == "random" else 300.0 + 100 * s}
            for r, s, d in [("random", 0, 0.5), ("random", 1, 0.7), ("x", 0, 0.6), ("x", 1, 0.9)]]
    rows[1]["precision"] = "bf16"  # random's seed 1 ran in bf16, seed 0 before precision was recorded (fp32)
    rows[2]["precision"] = rows[3]["precision"] = "bf16"
    text = bm.report_markdown(rows, "decathlon", ["bg", "a"])
    # compute per seed / per cell, and the precisions the cells ran in
    assert "| x | 350 | 110 | bf16 |" in text and "| random | 0 | 110 | fp32, bf16 |" in text
    assert "0.600 ± 0.141" in text  # random: mean 0.6, sd (n-1) 0.1414
    diffs = np.array([0.1, 0.2])
    assert f"+{diffs.mean():.3f} ± {diffs.std(ddof=1):.3f}" in text


def test_acdc_report_sets_the_papers_row_of_each_recipe_beside_ours():
    rows = [{"recipe": r, "labelled": n, "seed": 0, "split": "val", "mean_dice": 0.5, "dice_a": 0.5, "mean_hd95": 1.0,
             "train_seconds": 1.0, "pretrain_seconds": 0.0}
            for r in ("random", "gcl-gd+lcl-lr", "byol") for n in (1, 4)]
    text = bm.report_markdown(rows, "ssl4mis_h5", ["bg", "a"])
    published = text[text.index("Published (ACDC"):]
    assert "| random (published) | 0.614 | — |" in published
    assert "| gcl-gd+lcl-lr (published) | 0.725 | — |" in published  # Chaitanya et al., Table 1, proposed row
    assert "byol (published)" not in published and "nan" not in text
    assert "Published" not in bm.report_markdown(rows, "decathlon", ["bg", "a"])
    assert "best combination" not in published  # no pre-training + semi-supervised recipe here


def test_acdc_report_sets_the_papers_best_combination_beside_a_pretrained_semi_supervised_recipe(tmp_path,
                                                                                                  monkeypatch):
    assert bm.is_combination("gcl-gd+lcl-lr+patchcl")
    assert not any(bm.is_combination(r) for r in ("patchcl", "patchcl+selfreg", "mean-teacher", "gcl-gd+lcl-lr",
                                                  "supervised+selfreg", "random", "no-such-recipe"))
    shipped = load_recipe("gcl-gd+lcl-lr+patchcl")
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "byol+mean-teacher.yaml").write_text("stages:\n  - method: byol\n  - method: mean_teacher\n")
    (recipes / "mine.yaml").write_text("stages:\n  - method: gcl\n  - method: patchcl\n")  # the name says nothing
    (recipes / "byol+supervised.yaml").write_text("stages:\n  - method: byol\n  - method: supervised\n")
    monkeypatch.setattr("frugalseg.recipes.recipes_dir", lambda: recipes)
    assert bm.is_combination("byol+mean-teacher") and bm.is_combination("mine")
    assert not bm.is_combination("byol+supervised") and len(shipped.stages) > 1
    monkeypatch.undo()  # the report below reads the shipped recipes again
    rows = [{"recipe": r, "labelled": n, "seed": 0, "split": "val", "mean_dice": 0.5, "dice_a": 0.5, "mean_hd95": 1.0,
             "train_seconds": 1.0, "pretrain_seconds": 0.0}
            for r in ("random", "patchcl+selfreg", "gcl-gd+lcl-lr+patchcl") for n in (2, 8, 16)]
    published = bm.report_markdown(rows, "ssl4mis_h5", ["bg", "a"]).split("Published (ACDC")[1]
    assert "| paper's best combination, proposed init + Mixup (published) | 0.826 | 0.886 | — |" in published


def test_a_cell_of_a_changed_recipe_is_refused_not_reused(phantoms_2d, tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "mine.yaml").write_text("stages:\n  - method: supervised\n")
    monkeypatch.setattr("frugalseg.recipes.recipes_dir", lambda: recipes)
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, _args(phantoms_2d, out, recipes="mine", labelled="1"))
    assert result.exit_code == 0, result.output
    cell = out / "runs" / "mine" / "n1_s0" / "cell.json"
    assert "recipe_key" in json.loads(cell.read_text())
    assert "recipe_key" not in (out / "results.csv").read_text().splitlines()[0]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    (recipes / "mine.yaml").write_text("stages:\n  - method: supervised\n    set: {optim: {lr: 1.0e-4}}\n")
    result = CliRunner().invoke(app, _args(phantoms_2d, out, recipes="mine", labelled="1"))
    assert result.exit_code == 2
    assert (f"{cell.parent}: made by another definition of recipe mine (its stages, their settings or the "
            f"defaults changed since); use another --out") in result.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing rewritten


def test_a_started_cell_resumes_only_under_the_definition_that_started_it(phantoms_2d, tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "mine.yaml").write_text("stages:\n  - method: supervised\n")
    (recipes / "pre.yaml").write_text("stages:\n  - method: byol\n  - method: supervised\n")
    monkeypatch.setattr("frugalseg.recipes.recipes_dir", lambda: recipes)
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, _args(phantoms_2d, out, recipes="mine,pre", labelled="1"))
    assert result.exit_code == 0, result.output
    for name in ("mine", "pre"):  # trained, then stopped before the evaluation was written
        (out / "runs" / name / "n1_s0" / "cell.json").unlink()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    (recipes / "mine.yaml").write_text("stages:\n  - method: supervised\n    set: {optim: {lr: 1.0e-4}}\n")
    result = CliRunner().invoke(app, _args(phantoms_2d, out, recipes="mine", labelled="1"))
    assert result.exit_code == 2
    assert f"{out / 'runs' / 'mine' / 'n1_s0'}: made by another definition of recipe mine" in result.output
    (recipes / "pre.yaml").write_text(  # another pre-training: the trained cell started from other weights
        "stages:\n  - method: byol\n    set: {optim: {lr: 1.0e-4}}\n  - method: supervised\n")
    result = CliRunner().invoke(app, _args(phantoms_2d, out, recipes="pre", labelled="1"))
    assert result.exit_code == 2
    assert f"{out / 'runs' / 'pre' / 'n1_s0'}: made by another definition of recipe pre" in result.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written
    (recipes / "pre.yaml").write_text("stages:\n  - method: byol\n  - method: supervised\n")
    chain = next((out / "pretrain").glob("*/s0"))  # a pre-training made under other defaults (simulated)
    saved = (chain / "config.yaml").read_text()
    (chain / "config.yaml").write_text(saved.replace("weight_decay:", "weight_decay: 0.5 #", 1))
    result = CliRunner().invoke(app, _args(phantoms_2d, out, recipes="pre", labelled="1"))
    assert result.exit_code == 2
    assert f"{chain}: made by another definition of recipe pre (its stages, their settings or the defaults" \
        in result.output
    (chain / "config.yaml").write_text(saved)

    # under the definition that started them, the trained cells are evaluated, not trained again
    (recipes / "mine.yaml").write_text("stages:\n  - method: supervised\n")
    (recipes / "pre.yaml").write_text("stages:\n  - method: byol\n  - method: supervised\n")
    calls = []
    monkeypatch.setattr("frugalseg.run.train", lambda *a, **k: calls.append(a))
    result = CliRunner().invoke(app, _args(phantoms_2d, out.parent / "." / out.name, recipes="mine,pre",
                                           labelled="1"))
    assert result.exit_code == 0, result.output
    assert calls == [] and (out / "runs" / "pre" / "n1_s0" / "cell.json").is_file()


def test_pcrlv2_recipe_fine_tunes_from_the_encoder_only(phantoms_2d, tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, _args(phantoms_2d, out, recipes="pcrlv2", labelled="1"))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "runs" / "pcrlv2" / "n1_s0" / "init_report.json").read_text())
    assert report["loaded"] and all(k.startswith("encoder.") for k in report["loaded"])
    assert any(k.startswith("decoder.") for k in report["skipped"])  # the skip-less decoder is left out


def test_acdc_report_names_the_strong_semi_supervised_state_of_the_art_beside_bcp_and_nothing_empty():
    rows = [{"recipe": r, "labelled": 1, "seed": 0, "split": "val", "mean_dice": 0.5, "dice_a": 0.5, "mean_hd95": 1.0,
             "train_seconds": 1.0, "pretrain_seconds": 0.0} for r in ("bcp", "mean-teacher")]
    text = bm.report_markdown(rows, "ssl4mis_h5", ["bg", "a"])
    assert "Published (ACDC" not in text  # neither recipe has a published row: no empty table
    assert "UniMatch (CVPR 2023) 0.854" in text and "last checkpoint" in text
    plain = bm.report_markdown([r for r in rows if r["recipe"] == "mean-teacher"], "ssl4mis_h5", ["bg", "a"])
    assert "UniMatch" not in plain
    assert "UniMatch" not in bm.report_markdown(rows, "decathlon", ["bg", "a"])


def test_off_a_terminal_every_cell_and_every_log_interval_is_one_line_with_its_count(phantoms_2d, tmp_path):
    args = [a for a in _args(phantoms_2d, tmp_path / "bench", recipes="random") if a != "--quiet"]
    result = CliRunner().invoke(app, args)  # the runner's stderr is no terminal
    assert result.exit_code == 0, result.output
    cells = [line for line in result.output.splitlines() if line.startswith("benchmark: random")]
    assert [c.split("; ")[-1] for c in cells] == ["1/2 jobs)", "2/2 jobs)"], cells
    steps = [line.split(", loss")[0] for line in result.output.splitlines() if "s/step, ETA" in line]
    assert steps == [f"supervised N={n} seed=0: step {k}/4" for n in (1, 2) for k in (2, 4)], result.output
    lines = result.output.splitlines()  # a cell's training lines come before its result line
    assert lines.index(cells[0]) > lines.index(next(x for x in lines if x.startswith("supervised N=1 seed=0: step 4")))
    train = ["train", "--data", str(phantoms_2d), "--labelled", "1", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, train + [x for s in TINY for x in ("--set", s)])
    assert result.exit_code == 0, result.output
    steps = [line for line in result.output.splitlines() if "s/step, ETA" in line]
    assert [line.split(",")[0].split(": ")[-1] for line in steps] == ["step 2/4", "step 4/4"], result.output
