"""The written-out Dice + CE equals MONAI's DiceCELoss (the formula the project used before)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
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


def test_masked_dice_on_hand_computed_values():
    from frugalseg.losses.segmentation import masked_dice_loss

    # 1 sample, 2 classes, 4 voxels; the mask keeps voxels 0..2
    prob = torch.tensor([[[0.9, 0.2, 0.5, 0.0], [0.1, 0.8, 0.5, 1.0]]]).view(1, 2, 1, 4)
    label = torch.tensor([[0, 1, 1, 0]]).view(1, 1, 4)
    mask = torch.tensor([[True, True, True, False]]).view(1, 1, 4)
    s = 1e-5
    # class 0: inter 0.9, sum g 1, sum p^2 0.81+0.04+0.25 = 1.10; class 1: inter 0.8+0.5, g 2, p^2 0.01+0.64+0.25
    d0 = (2 * 0.9 + s) / (1 + 1.10 + s)
    d1 = (2 * 1.3 + s) / (2 + 0.90 + s)
    assert masked_dice_loss(prob, label, mask).item() == pytest.approx(1 - (d0 + d1) / 2, abs=1e-6)
    # without a mask the last voxel counts: class 0 gains g 1, class 1 gains p^2 1
    d0 = (2 * 0.9 + s) / (2 + 1.10 + s)
    d1 = (2 * 1.3 + s) / (2 + 1.90 + s)
    assert masked_dice_loss(prob, label).item() == pytest.approx(1 - (d0 + d1) / 2, abs=1e-6)
    # nothing kept: every class is s/s = 1, the loss 0, and no gradient flows
    p = prob.clone().requires_grad_()
    loss = masked_dice_loss(p, label, torch.zeros_like(mask))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and p.grad.abs().max() == 0


def test_masked_cross_entropy_averages_over_the_kept_voxels_only():
    from frugalseg.losses.segmentation import masked_cross_entropy

    logits = torch.tensor([[[0.0, 2.0], [1.0, 0.0]]]).view(1, 2, 1, 2)  # voxel 0: (0, 1); voxel 1: (2, 0)
    label = torch.tensor([[1, 1]]).view(1, 1, 2)
    ce0 = -torch.log_softmax(torch.tensor([0.0, 1.0]), 0)[1]
    ce1 = -torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[1]
    mask = torch.tensor([[True, False]]).view(1, 1, 2)
    assert masked_cross_entropy(logits, label, mask).item() == pytest.approx(ce0.item(), abs=1e-6)
    assert masked_cross_entropy(logits, label).item() == pytest.approx((ce0 + ce1).item() / 2, abs=1e-6)
    assert masked_cross_entropy(logits, label, torch.zeros_like(mask)).item() == 0.0


def test_mixed_region_loss_weights_each_region_against_its_own_labels():
    from frugalseg.losses.segmentation import masked_cross_entropy, masked_dice_loss, mixed_region_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    outside, inside = torch.randint(0, 3, (2, 8, 8)), torch.randint(0, 3, (2, 8, 8))
    box = torch.zeros(2, 8, 8, dtype=torch.bool)
    box[:, 2:6, 1:5] = True
    dice, ce = mixed_region_loss(logits, outside, inside, box, 0.5, 1.0)
    prob = logits.softmax(1)
    assert dice.item() == pytest.approx(0.5 * masked_dice_loss(prob, outside, ~box).item()
                                        + masked_dice_loss(prob, inside, box).item(), abs=1e-6)
    assert ce.item() == pytest.approx(0.5 * masked_cross_entropy(logits, outside, ~box).item()
                                      + masked_cross_entropy(logits, inside, box).item(), abs=1e-6)
    # labels that agree everywhere with the prediction inside the box: only the outside region costs
    inside = logits.argmax(1)
    perfect = torch.full_like(logits, -20.0).scatter(1, inside[:, None], 20.0)
    dice, ce = mixed_region_loss(perfect, outside, inside, box, 0.0, 1.0)
    assert dice.item() == pytest.approx(0.0, abs=1e-4) and ce.item() == pytest.approx(0.0, abs=1e-6)


def test_largest_component_and_confident_hard_labels():
    from frugalseg.losses.pseudo_labels import hard_labels, largest_components

    label = torch.zeros(1, 6, 6, dtype=torch.long)
    label[0, 0:2, 0:2] = 1  # 4 voxels
    label[0, 4:6, 3:6] = 1  # 6 voxels: the largest class-1 component
    label[0, 3, 0] = 2  # a lone class-2 voxel: its own largest component
    kept = largest_components(label, 3)
    assert (kept[0, 0:2, 0:2] == 0).all() and (kept[0, 4:6, 3:6] == 1).all() and kept[0, 3, 0] == 2
    assert (kept == 1).sum() == 6
    logits = torch.tensor([[[[3.0, 0.0]], [[0.0, 0.1]]]])  # (1, 2 classes, 1, 2)
    lab, conf = hard_labels(logits)
    assert lab.tolist() == [[[0, 1]]]
    assert conf[0, 0, 0].item() == pytest.approx(torch.softmax(torch.tensor([3.0, 0.0]), 0)[0].item())
    assert conf[0, 0, 1].item() == pytest.approx(torch.softmax(torch.tensor([0.0, 0.1]), 0)[1].item())


@pytest.mark.parametrize("shape", [(3, 5, 6), (2, 4, 5, 3)])
def test_the_one_hot_by_comparison_is_f_one_hot_value_for_value_and_stride_for_stride(shape):
    from frugalseg.losses.segmentation import one_hot_channels
    target = torch.randint(0, 4, shape, generator=torch.Generator().manual_seed(0))
    ours = one_hot_channels(target, 4, torch.float32)
    theirs = F.one_hot(target, 4).movedim(-1, 1).to(torch.float32)
    assert torch.equal(ours, theirs) and ours.stride() == theirs.stride()
    logits = torch.randn(shape[0], 4, *shape[1:], generator=torch.Generator().manual_seed(1))
    logits = logits.contiguous(memory_format=torch.channels_last if len(shape) == 3 else torch.channels_last_3d)
    prob = logits.softmax(1)  # the Dice sums come out bit for bit as with F.one_hot
    dims = [0, *range(2, logits.dim())]
    assert torch.equal((prob * ours).sum(dims), (prob * theirs).sum(dims))
