"""The written-out Dice + CE equals MONAI's DiceCELoss (the formula the project used before)."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss

from frugalseg.losses.segmentation import DiceCE


@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("dims", [2, 3])
def test_dice_ce_equals_monai(batch, dims):
    torch.manual_seed(dims)
    logits = torch.randn(3, 4, *([7] * dims), requires_grad=True)
    label = torch.randint(0, 4, (3, 1, *([7] * dims)))
    label[1] = 0  # a sample with background only
    ref = DiceCELoss(to_onehot_y=True, softmax=True, include_background=True, batch=batch, smooth_nr=1e-5,
                     smooth_dr=1e-5)(logits, label)
    (g_ref,) = torch.autograd.grad(ref, logits)
    ours = DiceCE(batch=batch)(logits, label)
    (g_ours,) = torch.autograd.grad(ours, logits)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-7, rtol=1e-5)


def test_dice_ce_known_value():
    logits = torch.tensor([[[[10.0, -10.0]], [[-10.0, 10.0]]]])  # (1, 2, 1, 2): confident and right
    label = torch.tensor([[[[0, 1]]]])
    assert DiceCE()(logits, label).item() == pytest.approx(0.0, abs=1e-6)
    wrong = torch.tensor([[[[0, 0]]]])  # class 1 absent, predicted on one pixel; class 0 half covered
    # Dice_0 = 2*1/(2+1), Dice_1 = (0 + s)/(0 + 1 + s) ~ 0; CE = (0 + 20)/2 = 10
    assert DiceCE()(logits, wrong).item() == pytest.approx(1 - (2 / 3 + 0) / 2 + 10.0, abs=1e-4)
