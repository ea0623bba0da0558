"""``frugalseg benchmark``: the few-label protocol as one resumable command.

For every (recipe, N, seed) cell: train with the N labelled volumes chosen by the seed, evaluate on a split, keep
per-case metrics. A finished cell (``cell.json``) is never recomputed; an interrupted cell resumes from its
checkpoint. Outputs: ``results.csv``, ``report.md``, ``dice_vs_labels.png``, ``per_class_dice.png``,
``overlays.png``.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from frugalseg.engine.trainer import has_checkpoint
from frugalseg.errors import UserError
from frugalseg.eval.plots import pyplot
from frugalseg.files import LOCK_FILE, FolderLock, write_json_atomic, write_text_atomic
from frugalseg.recipes import load_recipe, stage_key
from frugalseg.run import RunRequest, check_seed, run_stage

MANIFEST = "benchmark.json"

# Chaitanya et al. (NeurIPS 2020), Table 1, ACDC mean foreground Dice at |X_tr| = 1, 2, 8 (their test split).
# Keys are our recipe names; G^D + L^D is not in the table.
PUBLISHED_ACDC = {
    "random": {1: 0.614, 2: 0.702, 8: 0.844},
    "gcl-gr": {1: 0.631, 2: 0.729, 8: 0.847},
    "gcl-gd-": {1: 0.683, 2: 0.774, 8: 0.864},
    "gcl-gd": {1: 0.691, 2: 0.784, 8: 0.870},
    "gcl-gr+lcl-lr": {1: 0.668, 2: 0.760, 8: 0.850},
    "gcl-gr+lcl-ld": {1: 0.638, 2: 0.740, 8: 0.855},
    "gcl-gd+lcl-lr": {1: 0.725, 2: 0.789, 8: 0.872},
}
# what a pre-training + semi-supervised recipe is compared with: the paper's best combination row
PUBLISHED_ACDC_COMBINATION = ("paper's best combination, proposed init + Mixup", {1: 0.757, 2: 0.826, 8: 0.886})


def is_combination(name: str) -> bool:
    """Whether recipe ``name`` pre-trains, then ends with a semi-supervised method (one reading unlabelled images)."""
    from frugalseg.methods.base import PRETRAIN
    from frugalseg.registry import method_spec

    try:
        recipe = load_recipe(name)
    except UserError:  # no longer defined: nothing to compare it with
        return False
    pretrains = any(method_spec(st.method, st.overrides.get("method")).kind == PRETRAIN for st in recipe.stages)
    return pretrains and method_spec(recipe.final.method, recipe.final.overrides.get("method")).unlabelled is not None


def _published_row(name: str, values: dict[int, float], ns: list[int]) -> str:
    return f"| {name} (published) | " + " | ".join(f"{values[n]:.3f}" if n in values else "—" for n in ns) + " |"


PROTOCOL_NOTE_ACDC = (
    "Published numbers are Chaitanya et al. (NeurIPS 2020), Table 1, on that paper's own 20 ACDC test patients "
    "with images resampled to 1.367 mm and cropped around the heart; ours are on the SSL4MIS validation patients "
    "(the 20 test patients are held out), with N = the end-diastolic frames of N training patients and every "
    "training frame available unlabelled, evaluated in 3-D over RV, Myo and LV on both frames of each patient."
)

SEMI_SOTA_NOTE_ACDC = (
    "Strong semi-supervised methods, published on ACDC (not rows of the table above: other budgets and protocols): "
    "UniMatch (CVPR 2023) 0.854 with one labelled patient (its two frames, i.e. two labelled volumes) on these same "
    "SSL4MIS validation patients; BCP (CVPR 2023) 0.876 with 3 labelled patients on the 20 test patients. Both are "
    "the best of many checkpoints chosen on the split they report, after ~30,000 GPU iterations on whole 256 x 256 "
    "slices; ours are each run's last checkpoint, nothing selected on the evaluation split."
)
STRONG_SEMI_SUPERVISED = ("unimatch", "bcp")


def _strong_semi_supervised(recipe: str) -> bool:
    """Whether a recipe ends with a weak-to-strong / copy-paste method (the ones the published state of the art
    uses)."""
    try:
        return load_recipe(recipe).final.method in STRONG_SEMI_SUPERVISED
    except UserError:
        return False


def parse_list(text: str, option: str, cast=str) -> list:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise UserError(f"{option}: empty list")
    try:
        return [cast(t) for t in items]
    except ValueError:
        raise UserError(f"{option}: cannot read {text!r} as a comma-separated list of {cast.__name__}") from None


def run_benchmark(data: Path, recipes: list[str], labelled: list[int], seeds: list[int], out: Path,
                  split: str = "val", eval_data: Path | None = None, sets: list[str] | None = None,
                  show_progress: bool = True, report=print, unlabelled: Path | None = None,
                  device: str = "auto") -> list[dict[str, Any]]:
    from frugalseg.assemble import assemble, declared
    from frugalseg.config import build_config
    from frugalseg.data.readers import open_source
    from frugalseg.engine import distributed as dist
    from frugalseg.methods.base import TRAIN

    dist.setup(device)  # under torchrun every rank trains each stage; rank 0 alone evaluates and writes
    main = dist.is_main()
    sets = list(sets or [])
    # check everything before writing anything
    loaded = [load_recipe(r) for r in recipes]
    if len(set(recipes)) != len(recipes):
        raise UserError(f"--recipes: a recipe is listed twice ({','.join(recipes)})")
    if len(set(labelled)) != len(labelled) or len(set(seeds)) != len(seeds):
        raise UserError("--labelled/--seeds: a value is listed twice")
    for s in seeds:
        check_seed(s, "--seeds")
    source = open_source(data, unlabelled)
    eval_source = open_source(eval_data) if eval_data is not None else source
    if not eval_source.cases(split):
        raise UserError(f"--split {split}: no labelled case in {eval_source.root}")
    source.check_cases(source.cases("all"))  # a damaged case of either folder is found before any training
    eval_source.check_cases(eval_source.cases(split))
    pool = len(source.labelled_pool)
    for n in labelled:
        if n < 1 or n > pool:
            raise UserError(f"--labelled {n}: must be between 1 and the {pool} labelled training volume(s)")
    stage_cfgs: dict[str, list] = {}
    reads_labels: dict[str, list[bool]] = {}
    for recipe in loaded:  # every stage's config under --set, and its stage assembled once, before any work
        for st in recipe.stages:
            cfg = build_config(source.default_spatial_dims, None, sets, [st.overrides], source.format, st.method)
            stage_cfgs.setdefault(recipe.name, []).append(cfg)
            reads_labels.setdefault(recipe.name, []).append(declared(st.method, cfg)[2].kind == TRAIN)
            try:
                assemble(st.method, cfg, source)
            except UserError as exc:
                raise UserError(f"recipe {recipe.name}, stage {st.method}: {exc}") from None
    out = Path(out)
    if out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()) and not (out / MANIFEST).is_file():
        raise UserError(f"--out {out}: exists and is not a benchmark folder")
    # folders compared as the places they are, however they were named (relative paths, links)
    manifest = {"data": str(source.root.resolve()), "eval_data": str(eval_source.root.resolve()), "split": split,
                "set": sets, "unlabelled": str(Path(unlabelled).resolve()) if unlabelled is not None else None}
    if (out / MANIFEST).is_file():  # continuing (or extending) a benchmark: the fixed settings must agree
        before = json.loads((out / MANIFEST).read_text())
        for key, option in (("data", "--data"), ("eval_data", "--eval-data"), ("split", "--split"), ("set", "--set"),
                            ("unlabelled", "--unlabelled")):
            was, now = before.get(key), manifest[key]
            paths = key in ("data", "eval_data", "unlabelled") and was is not None and now is not None
            same = (Path(str(was)).resolve() == Path(now).resolve()) if paths else was == now
            if not same:
                raise UserError(f"--out {out}: this benchmark was started with {option} {was!r}, not {now!r} "
                                "(use another --out)")
    cells = [(r, n, s) for r in loaded for n in labelled for s in seeds]
    keys = {r.name: stage_key(r.stages, sets) for r in loaded}

    def where(recipe, i: int, n: int, s: int) -> Path:
        return stage_dir(out, recipe, i, n, s, sets, reads_labels[recipe.name])

    for recipe, n, s in cells:  # a run made under another definition of its recipe is never reused silently
        for i in range(len(recipe.stages)):  # each stage's run: its configuration and the weights it started from
            run_dir = where(recipe, i, n, s)
            init = where(recipe, i - 1, n, s) / "model.pt" if i else None
            changed = _started_otherwise(run_dir, stage_cfgs[recipe.name][i], init)
            done = run_dir / "cell.json"
            if done.is_file():
                changed |= json.loads(done.read_text()).get("recipe_key", keys[recipe.name]) != keys[recipe.name]
            if changed:
                raise UserError(f"{run_dir}: made by another definition of recipe {recipe.name} (its stages, their "
                                f"settings or the defaults changed since); use another --out")
    dist.barrier()  # every rank has checked --out before rank 0 writes into it
    lock = FolderLock(out) if main else None  # one benchmark process per folder
    try:
        if main:
            write_text_atomic(out / MANIFEST, json.dumps({**manifest, "recipes": recipes, "labelled": labelled,
                                                          "seeds": seeds}, indent=1))
        dist.barrier()
        common = {"unlabelled": unlabelled, "device": device}  # what every stage's run takes besides its own
        return _run_cells(loaded, cells, labelled, seeds, out, split, sets, source, eval_source, keys, where,
                          reads_labels, show_progress, report, common)
    finally:
        if lock is not None:
            lock.release()


def _run_cells(loaded, cells, labelled, seeds, out, split, sets, source, eval_source, keys, where, reads_labels,
               show_progress, report, common) -> list[dict[str, Any]]:
    from frugalseg.engine import distributed as dist
    from frugalseg.eval.evaluate import evaluate_model
    from frugalseg.eval.inference import load_model

    main = dist.is_main()

    earlier = {where(r, i, n, s) for r, n, s in cells for i in range(len(r.stages) - 1)}
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(cells) + len(earlier), desc="benchmark",
               disable=None if show_progress and main else True, unit="job")
    jobs_done = 0  # counted here: a disabled bar (off a terminal) counts nothing

    def advance() -> None:
        nonlocal jobs_done
        jobs_done += 1
        bar.update(1)

    visited: set[Path] = set()
    for recipe, n, s in cells:
        cell_dir = where(recipe, len(recipe.stages) - 1, n, s)
        done = cell_dir / "cell.json"
        init, pre_seconds = None, 0.0
        for i, st in enumerate(recipe.stages[:-1]):  # a chain of pre-trainings runs once per seed, shared
            run_dir = where(recipe, i, n, s)
            if not done.is_file() and _finished(run_dir) is None:
                bar.set_postfix(job=f"{st.method} seed={s}" + (f" N={n}" if reads_labels[recipe.name][i] else ""))
                _run_stage(run_dir, RunRequest(source.root, st.method, s, run_dir,
                                               n if reads_labels[recipe.name][i] else None, init, None, sets,
                                               [st.overrides] if st.overrides else [], **common), report, show_progress)
            if run_dir not in visited:
                visited.add(run_dir)
                advance()
            init = run_dir / "model.pt"
            pre_seconds += _finished(run_dir) or 0.0
        bar.set_postfix(job=f"{recipe.name} N={n} seed={s}")
        if done.is_file():
            rows.append(_cell_row(done))
            advance()
            continue
        t0 = time.perf_counter()
        final = recipe.final
        _run_stage(cell_dir, RunRequest(source.root, final.method, s, cell_dir, n, init, None, sets,
                                        [final.overrides] if final.overrides else [], **common), report, show_progress)
        if not main:  # evaluation is rank 0's; the others wait for its result (no collective: no time limit)
            while not done.is_file():
                time.sleep(1.0)
            rows.append(_cell_row(done))
            continue
        results, _ = evaluate_model(load_model(cell_dir), eval_source.root, split, show_progress=False)
        write_json_atomic(results, cell_dir / f"eval_{split}.json")
        wall = time.perf_counter() - t0  # this invocation's training (or its resumed part) and evaluation
        row = {"recipe": recipe.name, "labelled": n, "seed": s, "split": split,
               "mean_dice": results["mean_dice"], **{f"dice_{k}": v for k, v in results["per_class_dice"].items()},
               "mean_hd95": results["mean_hd95"], "hd95_unit": results["hd95_unit"],
               "precision": json.loads((cell_dir / "run.json").read_text()).get("precision", "fp32"),
               "train_seconds": _finished(cell_dir),
               "pretrain_seconds": pre_seconds, "wall_seconds": wall}
        write_json_atomic({**row, "recipe_key": keys[recipe.name]}, done)
        rows.append(row)
        advance()
        if show_progress and not sys.stderr.isatty():  # a log file: one line per cell
            report(f"benchmark: {recipe.name} N={n} seed={s}: mean Dice {row['mean_dice']:.4f} "
                   f"({row['train_seconds']:.0f} s training; {jobs_done}/{bar.total} jobs)")
    bar.close()
    if not main:
        return rows
    write_outputs(rows, out, eval_source.format, eval_source.class_names)
    plot_overlays(out, loaded, labelled, seeds, eval_source, split)
    return rows


def stage_dir(out: Path, recipe, i: int, n: int, seed: int, sets: list[str], reads_labels: list[bool]) -> Path:
    """Where stage ``i`` of ``recipe`` runs for N = ``n`` and ``seed``.

    The last stage is the benchmark cell (``runs/<recipe>/n<N>_s<seed>``). An earlier stage is shared by every
    recipe that starts with the same stages: by every N too while no stage up to it reads labels
    (``pretrain/<chain>/s<seed>``), else per N (``chain/<chain>/n<N>_s<seed>``).
    """
    if i == len(recipe.stages) - 1:
        return out / "runs" / recipe.name / f"n{n}_s{seed}"
    key = stage_key(recipe.stages[: i + 1], sets)
    if any(reads_labels[: i + 1]):
        return out / "chain" / key / f"n{n}_s{seed}"
    return out / "pretrain" / key / f"s{seed}"


def _cell_row(done: Path) -> dict[str, Any]:
    """A finished cell's results row (its recipe's definition hash stays in the cell, not in the table); cells
    written before ``labelled`` was spelled so are read under the new key."""
    row = {k: v for k, v in json.loads(done.read_text()).items() if k != "recipe_key"}
    if "labeled" in row:
        row = {("labelled" if k == "labeled" else k): v for k, v in row.items()}
    return row


def _started_otherwise(cell_dir: Path, cfg, init: Path | None) -> bool:
    """Whether a run that would be resumed or reused in ``cell_dir`` has another resolved configuration or initial
    weights than ``cfg`` and ``init`` (``init`` compared by its place in the benchmark folder, which may have been
    named differently then)."""
    from frugalseg.config import config_from_dict, read_yaml

    if not has_checkpoint(cell_dir) and _finished(cell_dir) is None:
        return False  # nothing to resume: the cell is started afresh under the current definition
    try:
        meta = json.loads((cell_dir / "run.json").read_text())
        started = config_from_dict(read_yaml(cell_dir / "config.yaml"), str(cell_dir / "config.yaml"))
    except (OSError, ValueError, UserError):
        return False  # nothing started there (or nothing readable): the cell is rebuilt from scratch
    recorded = meta.get("init")
    if (recorded is None) != (init is None):
        return True
    if init is not None and Path(recorded).parts[-4:] != init.parts[-4:]:
        return True
    return started != cfg


def _finished(run_dir: Path) -> float | None:
    """The training seconds of a finished run in ``run_dir``, ``None`` when it has not finished."""
    try:
        meta = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("status") == "finished" and (run_dir / "model.pt").is_file():
        return float(meta.get("train_seconds", 0.0))
    return None


def _run_stage(run_dir: Path, req: RunRequest, report, show_progress: bool) -> None:
    """Run ``req`` unless it already finished; resumed when it checkpointed. Its progress shows as a bar under the
    benchmark's on a terminal, as a line per log interval in a log file."""
    if _finished(run_dir) is not None:
        return
    from frugalseg.engine import distributed as dist

    req.resume = (run_dir / "run.json").is_file() and has_checkpoint(run_dir)
    dist.barrier()  # every rank has decided before rank 0 touches the folder
    if not req.resume and run_dir.exists() and dist.is_main():
        shutil.rmtree(run_dir)  # an unfinished run of this benchmark that never checkpointed
    dist.barrier()
    run_stage(req, show_progress=show_progress, report=report)


def plot_overlays(out: Path, recipes, labelled: list[int], seeds: list[int], eval_source, split: str) -> None:
    """One validation case, predicted by each recipe's model at the largest N and first seed."""
    from frugalseg.eval.inference import load_model, segment
    from frugalseg.eval.plots import overlay

    vol = eval_source.load(eval_source.cases(split)[0])
    items = []
    for recipe in recipes:
        model = load_model(out / "runs" / recipe.name / f"n{max(labelled)}_s{seeds[0]}")
        items.append((f"{recipe.name}, N={max(labelled)}", vol, segment(model, vol)))
    overlay(items, out / "overlays.png", eval_source.class_names)


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and sd (n - 1); the sd of a single value is undefined (nan), not 0."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else float("nan")


def _cell(values: list[float], signed: bool = False) -> str:
    """``mean ± sd``, or ``mean (1 seed)`` when there is nothing to spread."""
    if not values:
        return "—"
    m, sd = _stats(values)
    mean = f"{m:+.3f}" if signed else f"{m:.3f}"
    return f"{mean} ± {sd:.3f}" if len(values) > 1 else f"{mean} (1 seed)"


def write_outputs(rows: list[dict[str, Any]], out: Path, data_format: str, class_names: list[str]) -> None:
    """``results.csv``, ``report.md`` and the plots, all derived from ``rows``."""
    fields = list(rows[0].keys())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "results.csv", buf.getvalue())
    write_text_atomic(out / "report.md", report_markdown(rows, data_format, class_names))
    plot_dice_vs_labels(rows, out / "dice_vs_labels.png")
    plot_per_class(rows, out / "per_class_dice.png", class_names)


def report_markdown(rows: list[dict[str, Any]], data_format: str, class_names: list[str]) -> str:
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    ns = sorted({r["labelled"] for r in rows})
    by: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["recipe"], r["labelled"]), []).append(r)
    lines = [f"# Few-label benchmark ({rows[0]['split']} split)", "",
             "Mean foreground Dice, mean ± sd over seeds (sd with n − 1).", "",
             "| recipe | " + " | ".join(f"N = {n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for rec in recipes:
        cells = []
        for n in ns:
            cells.append(_cell([x["mean_dice"] for x in by.get((rec, n), [])]))
        lines.append(f"| {rec} | " + " | ".join(cells) + " |")
    if "random" in recipes and len(recipes) > 1:
        lines += ["", "Difference to `random` (paired by seed), mean ± sd:", "",
                  "| recipe | " + " | ".join(f"N = {n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
        for rec in recipes:
            if rec == "random":
                continue
            cells = []
            for n in ns:
                base = {x["seed"]: x["mean_dice"] for x in by.get(("random", n), [])}
                diffs = [x["mean_dice"] - base[x["seed"]] for x in by.get((rec, n), []) if x["seed"] in base]
                cells.append(_cell(diffs, signed=True))
            lines.append(f"| {rec} | " + " | ".join(cells) + " |")
    fg = class_names[1:]
    units = {r.get("hd95_unit", "mm") for r in rows}  # cells written before units were recorded: mm
    unit = units.pop() if len(units) == 1 else "mixed units"
    lines += ["", "Per-class Dice (mean over seeds):", "",
              "| recipe | N | " + " | ".join(fg) + f" | HD95 ({unit}) |", "|---|---|" + "---|" * (len(fg) + 1)]
    for rec in recipes:
        for n in ns:
            if (rec, n) not in by:
                continue
            xs = by[(rec, n)]
            lines.append(f"| {rec} | {n} | " + " | ".join(f"{np.mean([x[f'dice_{k}'] for x in xs]):.3f}" for k in fg)
                         + f" | {np.mean([x['mean_hd95'] for x in xs]):.1f} |")
    if unit == "voxel":
        lines += ["", "HD95 is in voxels: the data's files store no voxel spacing."]
    lines += ["", "Compute per run on this machine (seconds, mean over cells; a chain of pre-training stages is "
              "shared by every N of a seed):", "",
              "| recipe | stages before the last | last stage | precision |", "|---|---|---|---|"]
    for rec in recipes:
        xs = [x for x in rows if x["recipe"] == rec]
        ran = ", ".join(dict.fromkeys(str(x.get("precision", "fp32")) for x in xs))  # cells made before: fp32
        lines.append(f"| {rec} | {np.mean([float(x.get('pretrain_seconds') or 0.0) for x in xs]):.0f} | "
                     f"{np.mean([float(x['train_seconds'] or 0.0) for x in xs]):.0f} | {ran} |")
    if data_format == "ssl4mis_h5":
        published = [_published_row(rec, PUBLISHED_ACDC[rec], ns) for rec in recipes if rec in PUBLISHED_ACDC]
        if any(is_combination(rec) for rec in recipes):
            published.append(_published_row(*PUBLISHED_ACDC_COMBINATION, ns))
        if published:
            lines += ["", "Published (ACDC, mean foreground Dice):", "",
                      "| recipe | " + " | ".join(f"N = {n}" for n in ns) + " |", "|---|" + "---|" * len(ns),
                      *published, "", PROTOCOL_NOTE_ACDC]
        if any(_strong_semi_supervised(rec) for rec in recipes):
            lines += ["", SEMI_SOTA_NOTE_ACDC]
    return "\n".join(lines) + "\n"


def plot_dice_vs_labels(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for rec in dict.fromkeys(r["recipe"] for r in rows):
        ns = sorted({r["labelled"] for r in rows if r["recipe"] == rec})
        stats = [_stats([r["mean_dice"] for r in rows if r["recipe"] == rec and r["labelled"] == n]) for n in ns]
        ax.errorbar(ns, [m for m, _ in stats], yerr=[0.0 if np.isnan(s) else s for _, s in stats], marker="o",
                    capsize=3, label=rec)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("labelled volumes")
    ax.set_ylabel("mean foreground Dice")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_per_class(rows: list[dict[str, Any]], path: Path, class_names: list[str]) -> None:
    plt = pyplot()
    fg = class_names[1:]
    keys = list(dict.fromkeys((r["recipe"], r["labelled"]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(5.5, 1.2 * len(keys)), 3.8))
    width = 0.8 / len(fg)
    for j, k in enumerate(fg):
        vals = [np.mean([r[f"dice_{k}"] for r in rows if (r["recipe"], r["labelled"]) == key]) for key in keys]
        ax.bar(np.arange(len(keys)) + j * width, vals, width, label=k)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, [f"{r}\nN={n}" for r, n in keys])
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
