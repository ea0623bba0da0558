"""Which cases a stage reads: the few labelled volumes of a training run, or every image of a pre-training run."""

from __future__ import annotations

import numpy as np

from frugalseg.data.readers import DataSource
from frugalseg.errors import UserError


def few_label_split(source: DataSource, labelled: int, seed: int) -> dict:
    """Pick ``labelled`` volumes from the labelled pool with a seeded permutation.

    The same seed gives nested sets (the 1-volume set is inside the 2-volume set, inside the 8-volume set), so
    a learning curve over N compares like with like. Every training case stays available as unlabelled data.
    ACDC: the pool is the end-diastolic frame of each training patient.
    """
    pool = sorted(source.labelled_pool)
    if labelled < 1:
        raise UserError(f"--labelled must be at least 1, got {labelled}")
    if not pool:
        raise UserError(f"--data {source.root}: no labelled training case")
    if labelled > len(pool):
        raise UserError(f"--labelled {labelled}: only {len(pool)} labelled training volume(s) in {source.root}")
    order = np.random.default_rng(seed).permutation(len(pool))
    chosen = [pool[i] for i in order[:labelled]]
    return {
        "labelled": labelled,
        "seed": seed,
        "format": source.format,
        "data": str(source.root),
        "labelled_cases": chosen,
        "unlabelled_cases": list(source.cases("train")),
        "val_cases": source.cases("val"),
    }


def pretrain_split(source: DataSource) -> dict:
    """What a pre-training run sees: every training case, as images only."""
    return {"labelled": None, "format": source.format, "data": str(source.root), "labelled_cases": [],
            "unlabelled_cases": list(source.cases("train")), "val_cases": source.cases("val")}
