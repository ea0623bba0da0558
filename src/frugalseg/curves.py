"""``frugalseg curve``: validation Dice against training time for runs validated along the way."""

from __future__ import annotations

import json
from pathlib import Path

from frugalseg.errors import UserError


def _init_run(run_dir: Path) -> Path | None:
    """The frugalseg run folder whose ``model.pt`` started ``run_dir`` (``--init``), if there is one."""
    try:
        init = json.loads((Path(run_dir) / "run.json").read_text()).get("init")
    except (OSError, ValueError):
        return None
    parent = Path(init).parent if init else None
    return parent if parent is not None and (parent / "run.json").is_file() else None


def earlier_seconds(run_dir: Path) -> float:
    """Training seconds of the stages a run started from: its ``--init`` chain of frugalseg run folders (weights
    from elsewhere, such as a released checkpoint, add no time of ours)."""
    total, seen = 0.0, set()
    parent = _init_run(run_dir)
    while parent is not None and parent not in seen:
        seen.add(parent)
        try:
            total += float(json.loads((parent / "run.json").read_text()).get("train_seconds") or 0.0)
        except (OSError, ValueError, TypeError):
            break
        parent = _init_run(parent)
    return total


def validation_points(run_dir: Path, include_earlier: bool = True) -> list[tuple[float, float]]:
    """``[(training minutes, validation mean Dice)]`` of a run, after the points of the stages it started from
    (those validated along the way too), the minutes counted from the first stage's start."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no log.jsonl (not a frugalseg run folder)")
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    seconds = {e["step"]: e["seconds"] for e in entries if "seconds" in e and "loss" in e}
    offset = earlier_seconds(run_dir) if include_earlier else 0.0
    points = []
    before = _init_run(run_dir) if include_earlier else None
    if before is not None:
        try:
            points = validation_points(before)
        except UserError:
            points = []  # an earlier stage without validation: its time counts, its curve is not drawn
    for e in entries:
        if "val_dice" in e:
            known = [s for s in seconds if s <= e["step"]]
            if known:
                points.append(((offset + seconds[max(known)]) / 60.0, float(e["val_dice"])))
    if not points:
        raise UserError(f"{run_dir}: no validation along the way (train with --set train.val_every=K)")
    return points


def plot_runs(run_dirs: list[Path], labels: list[str] | None, out: Path, force: bool = False) -> list:
    from frugalseg.eval.plots import compute_curve

    if labels is not None and len(labels) != len(run_dirs):
        raise UserError(f"--labels: {len(labels)} label(s) for {len(run_dirs)} run(s)")
    if Path(out).exists() and not force:
        raise UserError(f"{out}: already exists (pass --force to overwrite)")
    if Path(out).suffix.lower() != ".png":
        raise UserError(f"{out}: the curve is written as a .png file")
    runs = [(labels[i] if labels else Path(r).name, validation_points(r)) for i, r in enumerate(run_dirs)]
    compute_curve(runs, Path(out))
    return runs
