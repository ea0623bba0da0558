"""``frugalseg evaluate``: per-case Dice/HD95 of a trained run on a split, written to ``eval_<split>.json``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from frugalseg.data.readers import open_source
from frugalseg.errors import UserError
from frugalseg.eval.inference import TrainedModel, load_model, segment
from frugalseg.eval.metrics import case_metrics
from frugalseg.files import write_json_atomic


def summarise(cases: list[dict], class_names: list[str]) -> dict:
    """``mean_dice`` = mean over volumes of the mean foreground Dice; per-class means over volumes."""
    fg = class_names[1:]
    per_case = [float(np.mean([c["dice"][k] for k in fg])) for c in cases]
    return {
        "mean_dice": float(np.mean(per_case)),
        "sd_dice": float(np.std(per_case)),
        "per_class_dice": {k: float(np.mean([c["dice"][k] for c in cases])) for k in fg},
        "mean_hd95": float(np.mean([np.mean([c["hd95"][k] for k in fg]) for c in cases])),
        "per_class_hd95": {k: float(np.mean([c["hd95"][k] for c in cases])) for k in fg},
    }


def evaluate_model(model: TrainedModel, data: Path | str, split: str, show_progress: bool = True,
                   keep_predictions: int = 0, report=None) -> tuple[dict, list]:
    """Evaluate ``model`` on ``split`` of the dataset at ``data``. Returns (results, kept (vol, pred) pairs).

    Off a terminal (a log file) ``report`` hears one line per case."""
    source = open_source(data)
    if len(source.class_names) != len(model.class_names):
        raise UserError(f"--data {source.root}: {len(source.class_names)} classes, the model was trained "
                        f"with {len(model.class_names)}")
    cases = source.cases(split)
    if not cases:
        raise UserError(f"--split {split}: no labelled case in {source.root}")
    source.check_cases(cases)  # a damaged case is found before the first prediction, not after the last
    results, kept, units = [], [], set()
    for case in tqdm(cases, desc=f"evaluate {split}", disable=None if show_progress else True, leave=False):
        vol = source.load(case)
        if vol.label is None:
            raise UserError(f"--split {split}: case {case} has no label")
        pred = segment(model, vol)
        # distances in mm where the file stores its spacing, in voxels where it does not (SSL4MIS)
        spacing = vol.spacing if vol.spacing_known else (1.0,) * len(vol.spacing)
        units.add("mm" if vol.spacing_known else "voxel")
        m = case_metrics(pred, vol.label, model.class_names, spacing)
        results.append({"case": case, **m})
        if show_progress and report is not None and not sys.stderr.isatty():
            fg = model.class_names[1:]
            report(f"evaluate {split}: {len(results)}/{len(cases)} {case}: mean Dice "
                   f"{np.mean([m['dice'][k] for k in fg]):.4f}")
        if len(kept) < keep_predictions:
            kept.append((vol, pred))
    summary = summarise(results, model.class_names)
    unit = units.pop() if len(units) == 1 else "mixed (mm where stored, else voxels)"
    return {**summary, "hd95_unit": unit, "split": split, "data": str(source.root), "n_cases": len(results),
            "cases": results}, kept


def validator(net, cfg, source, device, split: str = "val"):
    """A function that returns ``{"val_dice": mean foreground Dice}`` of ``net`` (as it is now) on ``split`` of
    ``source``; the volumes are read once. ``net`` is put in eval mode for the call and restored after. Draws no
    random number, so a run validated along the way trains exactly as one that is not."""
    from frugalseg.eval.metrics import mean_foreground_dice

    cases = source.cases(split)
    if not cases:
        raise UserError(f"train.val_every: no {split} case in {source.root} to validate on")
    volumes = [source.load(case) for case in cases]
    missing = [v.case_id for v in volumes if v.label is None]
    if missing:
        raise UserError(f"train.val_every: {split} case {missing[0]} has no label")
    model = TrainedModel(net, cfg, list(source.class_names), source.in_channels, device)

    def validate() -> dict[str, float]:
        was = net.training
        net.eval()
        try:
            scores = [mean_foreground_dice(segment(model, v), v.label, len(source.class_names)) for v in volumes]
        finally:
            net.train(was)
        return {"val_dice": float(np.mean(scores))}

    return validate


def evaluate_run(run_dir: Path, data: Path | str, split: str, show_progress: bool = True, report=None,
                 device: str = "auto") -> dict:
    from frugalseg.hardware import pick_device

    model = load_model(run_dir, pick_device(device))
    out = Path(run_dir) / f"eval_{split}.json"
    if not os.access(run_dir, os.W_OK):
        raise UserError(f"{run_dir}: run directory is not writable")
    results, _ = evaluate_model(model, data, split, show_progress, report=report)
    write_json_atomic(results, out)
    return results
