import math

import numpy as np

from frugalseg.eval.evaluate import summarise
from frugalseg.eval.metrics import case_metrics, class_metrics


def test_empty_mask_rule():
    z = np.zeros((4, 5, 6), bool)
    one = z.copy()
    one[1, 1, 1] = True
    assert class_metrics(z, z, (1, 1, 1)) == (1.0, 0.0)
    dice, hd = class_metrics(one, z, (1.0, 2.0, 3.0))
    assert dice == 0.0 and math.isclose(hd, math.sqrt(16 + 100 + 324))
    assert class_metrics(z, one, (1, 1, 1))[0] == 0.0


def test_dice_and_hd95_known_values():
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros((10, 10, 10), bool)
    a[2:6, 2:6, 2:6] = True  # 64 voxels
    b[3:7, 2:6, 2:6] = True  # shifted by one along axis 0: overlap 48
    dice, hd = class_metrics(a, b, (1, 1, 1))
    assert math.isclose(dice, 2 * 48 / 128, rel_tol=1e-6)
    assert math.isclose(hd, 1.0, rel_tol=1e-6)
    _, hd_mm = class_metrics(a, b, (2.5, 1, 1))
    assert math.isclose(hd_mm, 2.5, rel_tol=1e-6)


def test_case_metrics_and_summary():
    ref = np.zeros((6, 6, 6), np.int64)
    ref[1:3] = 1
    ref[4:6] = 2
    pred = ref.copy()
    pred[4:6] = 0  # class 2 missed entirely
    m = case_metrics(pred, ref, ["bg", "a", "b"], (1, 1, 1))
    assert m["dice"] == {"a": 1.0, "b": 0.0}
    s = summarise([{"case": "x", **m}, {"case": "y", **case_metrics(ref, ref, ["bg", "a", "b"], (1, 1, 1))}],
                  ["bg", "a", "b"])
    assert math.isclose(s["mean_dice"], (0.5 + 1.0) / 2)
    assert s["per_class_dice"] == {"a": 1.0, "b": 0.5}
