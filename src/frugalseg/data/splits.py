"""Few-label splits: which training volumes are labelled for a given (N, seed)."""

from __future__ import annotations

import numpy as np

from frugalseg.data.readers import DataSource
from frugalseg.errors import UserError


def few_label_split(source: DataSource, labeled: int, seed: int) -> dict:
    """Pick ``labeled`` volumes from the labelled pool with a seeded permutation.

    The same seed gives nested sets (the 1-volume set is inside the 2-volume set, inside the 8-volume set), so
    a learning curve over N compares like with like. Every training case stays available as unlabelled data.
    ACDC: the pool is the end-diastolic frame of each training patient.
    """
    pool = sorted(source.labelled_pool)
    if labeled < 1:
        raise UserError(f"--labeled must be at least 1, got {labeled}")
    if not pool:
        raise UserError(f"--data {source.root}: no labelled training case")
    if labeled > len(pool):
        raise UserError(f"--labeled {labeled}: only {len(pool)} labelled training volume(s) in {source.root}")
    order = np.random.default_rng(seed).permutation(len(pool))
    chosen = [pool[i] for i in order[:labeled]]
    return {
        "labeled": labeled,
        "seed": seed,
        "format": source.format,
        "data": str(source.root),
        "labelled_cases": chosen,
        "unlabelled_cases": list(source.cases("train")),
        "val_cases": source.cases("val"),
    }
