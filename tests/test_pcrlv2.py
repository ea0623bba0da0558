"""PCRLv2: sub-crop boxes, IoU constraint, corruption vs target, the siamese loss and its stop-gradient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from frugalseg.data.pcrl_crops import SubCropSampler, box_iou, crop_resize, sub_crop_boxes, swap_patches
from frugalseg.data.volume import Volume
from frugalseg.methods.pcrlv2 import PCRLv2, PCRLv2Options, restoration_weight, siamese_cosine
from frugalseg.nn.unet import UNet


def test_box_iou_known_values():
    a = np.array([[0, 4], [0, 4]])
    assert box_iou(a, a) == 1.0
    assert box_iou(a, np.array([[2, 6], [0, 4]])) == 8 / 24
    assert box_iou(a, np.array([[4, 8], [0, 4]])) == 0.0


def test_sub_crops_respect_the_volume_the_iou_and_the_bounding_box():
    rng = np.random.default_rng(0)
    for shape in [(40, 56, 24), (64, 48)]:
        for _ in range(200):
            globals_, local, bbox = sub_crop_boxes(rng, shape, 6)
            hi = np.asarray(shape)
            assert (globals_[..., 0] >= 0).all() and (globals_[..., 1] <= hi).all()
            assert (globals_[..., 1] - globals_[..., 0] >= 2).all()
            assert box_iou(globals_[0], globals_[1]) > 0.3
            np.testing.assert_array_equal(bbox[:, 0], globals_[:, :, 0].min(0))
            np.testing.assert_array_equal(bbox[:, 1], globals_[:, :, 1].max(0))
            assert (local[..., 0] >= bbox[:, 0]).all() and (local[..., 1] <= bbox[:, 1]).all()


def test_crop_resize_at_the_same_size_is_the_box():
    image = np.arange(2 * 10 * 12, dtype=np.float32).reshape(2, 10, 12)
    box = np.array([[3, 7], [2, 11]])
    torch.testing.assert_close(crop_resize(image, box, (4, 9)), torch.from_numpy(image[:, 3:7, 2:11]))


def test_patch_swaps_exchange_patches_and_overlaps_follow_the_stated_rule():
    x = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8)  # x[c, i, j] = 64 c + 8 i + j
    y = swap_patches(x, np.array([[[0, 0], [4, 4]]]), (2, 3))  # disjoint: a permutation of the two patches
    np.testing.assert_array_equal(y[:, 0:2, 0:3], x[:, 4:6, 4:7])
    np.testing.assert_array_equal(y[:, 4:6, 4:7], x[:, 0:2, 0:3])
    np.testing.assert_array_equal(np.sort(y.ravel()), np.sort(x.ravel()))
    assert x[0, 0, 0] == 0  # the input is not modified
    # overlapping 4x4 patches at (0, 0) and (2, 2): both read first, the second write (first patch's content) wins
    y = swap_patches(x, np.array([[[0, 0], [2, 2]]]), (4, 4))
    assert y[0, 2, 2] == x[0, 0, 0] == 0  # in both patches: the first patch's content
    assert y[0, 5, 5] == x[0, 3, 3] == 27  # in the second only: the first patch's content
    assert y[0, 0, 0] == x[0, 2, 2] == 18 and y[1, 1, 1] == x[1, 3, 3]  # in the first only: the second's content
    assert y[0, 0, 7] == x[0, 0, 7]  # outside both: untouched
    # pairs apply in order: swapping the same pair twice restores the image
    np.testing.assert_array_equal(swap_patches(x, np.array([[[1, 2], [5, 3]], [[1, 2], [5, 3]]]), (3, 3)), x)


@pytest.mark.parametrize("shape,size", [((1, 20, 24), (5, 6)), ((2, 20, 24), (5, 6)), ((1, 9, 10, 11), (3, 2, 4)),
                                        ((2, 9, 10, 11), (3, 2, 4)), ((1, 30), (7,))])
def test_patch_swaps_equal_the_rule_written_out_in_every_dimension(shape, size):
    rng = np.random.default_rng(1)
    x = rng.normal(size=shape).astype(np.float32)
    starts = rng.integers(0, [s - q + 1 for s, q in zip(shape[1:], size)], size=(60, 2, len(size)))
    want = x.copy()
    for a, b in starts:  # the rule written out: read both patches, then write the first, then the second
        ia = (slice(None), *[slice(u, u + q) for u, q in zip(a, size)])
        ib = (slice(None), *[slice(u, u + q) for u, q in zip(b, size)])
        pa, pb = want[ia].copy(), want[ib].copy()
        want[ia] = pb
        want[ib] = pa
    np.testing.assert_array_equal(swap_patches(x, starts, size), want)


def test_sampler_views_targets_and_determinism():
    vols = [Volume(f"v{i}", np.random.default_rng(i).normal(size=(1, 30, 40, 20)).astype(np.float32), None,
                   np.eye(4), (1.0, 1.0, 1.0)) for i in range(2)]
    s = SubCropSampler(vols, 3, (16, 16, 16), batch_size=3, seed=0, locals_per_sample=4)
    b = s.batch(2)
    assert b["image"].shape == b["view2"].shape == b["target"].shape == (3, 1, 16, 16, 16)
    assert b["local"].shape == (3, 4, 1, 8, 8, 8) and b["boxes"].shape == (3, 2, 3, 2)
    flat = b["target"].flatten(1)
    torch.testing.assert_close(flat.min(1).values, torch.zeros(3))  # restoration target in [0, 1]
    torch.testing.assert_close(flat.max(1).values, torch.ones(3))
    z = b["image"].flatten(1)  # the corrupted input is z-scored and differs from the target
    torch.testing.assert_close(z.mean(1), torch.zeros(3), atol=1e-4, rtol=0)
    assert not torch.allclose(b["image"], b["target"])
    torch.testing.assert_close(s.batch(2)["image"], b["image"])


def test_siamese_cosine_against_a_loop_and_stop_gradient():
    torch.manual_seed(0)
    pre_a, pro_a, pre_b, pro_b = (torch.randn(5, 7, requires_grad=True) for _ in range(4))
    loss = siamese_cosine(pre_a, pro_a, pre_b, pro_b)
    naive = -0.5 * (sum(F.cosine_similarity(pre_a[i], pro_b[i], dim=0) for i in range(5)) / 5
                     + sum(F.cosine_similarity(pre_b[i], pro_a[i], dim=0) for i in range(5)) / 5)
    assert abs(loss.item() - naive.item()) < 1e-6
    loss.backward()
    assert pro_a.grad is None and pro_b.grad is None  # targets are stop-gradient
    assert pre_a.grad is not None and pre_b.grad is not None


def test_restoration_weight_schedule():
    assert restoration_weight(0.0) == 1.0 and abs(restoration_weight(1.0)) < 1e-12
    assert abs(restoration_weight(0.5) - 0.5) < 1e-12
    assert abs(restoration_weight(0.25) - (1 + math.sqrt(0.5)) / 2) < 1e-12


def test_pcrlv2_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    vols = [Volume("v", np.random.default_rng(1).normal(size=(1, 24, 24, 16)).astype(np.float32), None, np.eye(4),
                   (1.0, 1.0, 1.0))]
    method = PCRLv2(UNet(3, 1, 2, (4, 8, 16), skip=False), PCRLv2Options(locals_per_sample=2))
    batch = method.spec.sampler(vols, (16, 16, 16), 0, spatial_dims=3, batch_size=2).batch(0)
    opt = torch.optim.Adam(method.parameters(), 3e-3)
    losses = []
    for _ in range(12):
        torch.manual_seed(1)  # the same random scales every step: a fixed objective
        out = method.training_step(batch, 0.0)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.logs["loss_rec"].item())
    assert losses[-1] < losses[0]


def test_the_two_global_views_and_the_locals_are_normalised_apart():
    """Each global view goes through the network in its own pass (BatchNorm statistics of that view alone, as the
    official code): a second view that is a scaled copy of the first gives the same normalised features."""
    torch.manual_seed(0)
    net = UNet(2, 1, 2, (4, 8, 16), skip=False, norm="batch")
    method = PCRLv2(net, PCRLv2Options(locals_per_sample=2))
    seen = []
    first_bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    first_bn.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    g = torch.Generator().manual_seed(0)
    view = torch.randn(3, 1, 16, 16, generator=g)
    batch = {"image": view, "view2": 5.0 * view, "local": torch.randn(3, 2, 1, 8, 8, generator=g),
             "target": torch.rand(3, 1, 16, 16, generator=g)}
    method.training_step(batch, 0.0)
    assert [o.shape[0] for o in seen] == [3, 3, 6]  # view 1, view 2, the locals: three passes
    # the first convolution has no bias: BN(conv(5x)) = BN(conv(x)) up to the epsilon
    torch.testing.assert_close(seen[0], seen[1], atol=1e-4, rtol=1e-4)


def test_views_corrupted_together_equal_views_corrupted_one_by_one_bit_for_bit():
    from frugalseg.data.augment import gaussian_blur
    from frugalseg.data.pcrl_crops import corrupt_views, draw_corruption

    def one_view(view, p):  # the corruption of one view, written out, its blur that of the view alone
        x = gaussian_blur(view[None], torch.tensor([p["sigma"]]))[0] if p["sigma"] >= 0.1 else view
        x = x + torch.from_numpy(p["noise"])
        x = torch.sign(x) * x.abs().pow(p["gamma"])
        if p["starts"] is not None:
            x = torch.from_numpy(swap_patches(x.numpy(), p["starts"], p["size"]))
        a = x.numpy().astype(np.float64)
        return (x - float(a.mean())) / max(float(a.std(ddof=1)), 1e-6)

    gen = torch.Generator().manual_seed(0)
    shapes = [(1, 32, 24), (1, 16, 16), (1, 32, 24), (1, 16, 16), (1, 8, 12, 10), (1, 32, 24)] * 4
    views = [torch.rand(*s, generator=gen) for s in shapes]
    rng = np.random.default_rng(5)
    params = [draw_corruption(rng, v.shape, swap=len(s) == 3 and s[1] == 32) for v, s in zip(views, shapes)]
    radii = {max(1, int(np.ceil(2 * np.float32(p["sigma"])))) for p in params if p["sigma"] >= 0.1}
    assert len(radii) >= 2  # several kernel radii, so several groups per shape
    for view, p, together in zip(views, params, corrupt_views(views, params)):
        assert torch.equal(together, one_view(view, p))


def test_corruption_noise_is_zero_mean_with_the_drawn_sd_and_repeats_with_the_seed():
    from frugalseg.data.pcrl_crops import draw_corruption

    def draws(seed):
        rng = np.random.default_rng(seed)
        return [draw_corruption(rng, (1, 128, 128), swap=True) for _ in range(20)]

    first, again, other = draws(3), draws(3), draws(4)
    stds = np.array([p["noise_std"] for p in first])
    assert stds.min() >= 0 and stds.max() <= 0.25 and stds.max() - stds.min() > 0.1  # sigma ~ U(0, 0.25)
    for p in first:
        assert p["noise"].dtype == np.float32 and p["noise"].shape == (1, 128, 128)
        assert abs(float(p["noise"].mean())) < 4 * p["noise_std"] / 128 + 1e-9  # 4 standard errors
        assert abs(float(p["noise"].std()) - p["noise_std"]) <= 0.03 * p["noise_std"]
    assert all(np.array_equal(a["noise"], b["noise"]) for a, b in zip(first, again))
    assert not np.array_equal(first[0]["noise"] / max(first[0]["noise_std"], 1e-9),
                              first[1]["noise"] / max(first[1]["noise_std"], 1e-9))  # each view its own noise
    assert not any(np.array_equal(a["noise"], b["noise"]) for a, b in zip(first, other))


def test_views_scaled_together_span_zero_to_one_per_view_and_channel():
    from frugalseg.data.pcrl_crops import unit_views

    gen = torch.Generator().manual_seed(0)
    views = [torch.randn(2, 6, 5, generator=gen) * (k + 1) + k for k in range(3)] + [torch.randn(2, 4, 4, 3)]
    for view, scaled in zip(views, unit_views(views)):
        assert scaled.shape == view.shape
        flat = scaled.flatten(1)
        torch.testing.assert_close(flat.amin(1), torch.zeros(2), rtol=0, atol=0)
        torch.testing.assert_close(flat.amax(1), torch.ones(2), rtol=0, atol=1e-6)
        lo = view.flatten(1).amin(1).view(2, *[1] * (view.dim() - 1))
        hi = view.flatten(1).amax(1).view(2, *[1] * (view.dim() - 1))
        assert torch.equal(scaled, (view - lo) / (hi - lo))  # the same operations as view by view
