"""Per-class 3-D Dice and HD95 of one volume, with an explicit empty-mask rule.

MONAI's metrics return NaN when a structure is empty in the prediction or the reference, and NaN is silently
dropped by the usual reductions. We decide instead:

* both empty: Dice 1, HD95 0 (nothing to find, nothing found);
* exactly one empty: Dice 0, HD95 = the volume's diagonal in mm (the worst possible distance);
* otherwise: MONAI ``compute_dice`` and ``compute_hausdorff_distance(percentile=95)`` with the voxel spacing.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance


def diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def class_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """Dice and HD95 (mm) of two boolean masks of the same shape."""
    p_any, r_any = bool(pred.any()), bool(ref.any())
    if not p_any and not r_any:
        return 1.0, 0.0
    if not p_any or not r_any:
        return 0.0, diagonal_mm(pred.shape, spacing)
    p = torch.from_numpy(pred)[None, None].float()
    r = torch.from_numpy(ref)[None, None].float()
    dice = float(compute_dice(p, r, include_background=True)[0, 0])
    with warnings.catch_warnings():  # MONAI 1.5+ warns about its own deprecated internal argument
        warnings.simplefilter("ignore", FutureWarning)
        hd = float(compute_hausdorff_distance(p, r, include_background=True, percentile=95,
                                              spacing=[float(s) for s in spacing])[0, 0])
    return dice, hd


def case_metrics(pred: np.ndarray, ref: np.ndarray, class_names: Sequence[str],
                 spacing: Sequence[float]) -> dict[str, dict[str, float]]:
    """Dice and HD95 for every foreground class (``class_names[1:]``) of a label map pair."""
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference {ref.shape}")
    dice, hd95 = {}, {}
    for k, name in enumerate(class_names):
        if k == 0:
            continue
        dice[name], hd95[name] = class_metrics(pred == k, ref == k, spacing)
    return {"dice": dice, "hd95": hd95}


def mean_foreground_dice(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> float:
    """Mean Dice over the foreground classes of one label map pair (the empty-mask rule above; no HD95): the
    quantity ``mean_dice`` averages over volumes, cheap enough to track during training."""
    values = []
    for k in range(1, num_classes):
        p, r = pred == k, ref == k
        total = int(p.sum()) + int(r.sum())
        values.append(1.0 if total == 0 else 2.0 * int((p & r).sum()) / total)
    return float(np.mean(values))
