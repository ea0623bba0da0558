"""CutMix / copy-paste boxes and the strong views: hand-made tensors, exact boxes, areas as configured, 3-D cuboids."""

import numpy as np
import pytest
import torch

from frugalseg.config import AugmentConfig
from frugalseg.data.augment import apply_strong, draw_strong, gaussian_blur
from frugalseg.data.mixing import BoxedSampler, BoxSpec, box_mask, draw_box, draw_masks, paste


def test_paste_moves_the_label_box_exactly_with_the_image_box():
    a = torch.zeros(2, 1, 6, 8)
    b = torch.arange(2 * 6 * 8, dtype=torch.float32).view(2, 1, 6, 8)
    la, lb = torch.zeros(2, 6, 8, dtype=torch.long), torch.full((2, 6, 8), 3)
    mask = torch.stack([box_mask((6, 8), np.array([1, 2]), np.array([3, 4])), torch.zeros(6, 8, dtype=torch.bool)])
    img, lab = paste(a, b, mask), paste(la, lb, mask)
    assert torch.equal(img[0, 0, 1:4, 2:6], b[0, 0, 1:4, 2:6]) and img[0].sum() == b[0, 0, 1:4, 2:6].sum()
    assert torch.equal(lab[0] == 3, mask[0]) and torch.equal(img[1], a[1]) and (lab[1] == 0).all()
    assert torch.equal((img[0, 0] != 0) | (lab[0] == 0), torch.ones(6, 8, dtype=torch.bool))


def test_a_fixed_side_box_covers_that_fraction_of_every_axis_in_2d_and_3d():
    rng = np.random.default_rng(0)
    for shape in [(96, 96), (32, 48, 32)]:
        for _ in range(20):
            start, size = draw_box(rng, shape, BoxSpec(side=2 / 3))
            assert list(size) == [round(n * 2 / 3) for n in shape]
            assert (start >= 0).all() and (start + size <= np.array(shape)).all()
        mask = box_mask(shape, start, size)
        assert mask.sum() == np.prod(size) and mask.dim() == len(shape)  # a cuboid in 3-D


def test_random_box_areas_and_aspect_ratios_stay_in_the_configured_ranges():
    rng = np.random.default_rng(1)
    spec = BoxSpec(area=(0.02, 0.4), ratio=(0.3, 1 / 0.3))
    areas, ratios = [], []
    for _ in range(500):
        _, size = draw_box(rng, (128, 128), spec)
        areas.append(size.prod() / 128**2)
        ratios.append(size[1] / size[0])
    areas, ratios = np.array(areas), np.array(ratios)
    assert areas.min() >= 0.015 and areas.max() <= 0.42  # rounding to whole voxels and clipping to the patch
    assert 0.1 < np.median(areas) < 0.3 and areas.max() > 0.3 and areas.min() < 0.05
    assert ratios.min() >= 0.25 and ratios.max() <= 4.0 and ratios.min() < 0.5 and ratios.max() > 2.0


def test_masks_per_batch_probability_count_and_determinism():
    rng = np.random.default_rng(2)
    masks, boxes = draw_masks(rng, 5, (16, 16), BoxSpec(side=0.5, per_batch=True))
    assert all(torch.equal(m, masks[0]) for m in masks) and masks[0].sum() == 64
    assert (boxes[:, :, 1] - boxes[:, :, 0] == 8).all()
    masks, _ = draw_masks(np.random.default_rng(3), 400, (16, 16), BoxSpec(probability=0.5))
    empty = (masks.flatten(1).sum(1) == 0).float().mean().item()
    assert 0.4 < empty < 0.6

    class Inner:
        def batch(self, step):
            return {"image": torch.zeros(3, 1, 16, 16)}

    sampler = BoxedSampler(Inner(), BoxSpec(count=2, probability=1.0), (16, 16), 3, seed=7)
    b1, b2 = sampler.batch(4), sampler.batch(4)
    assert set(b1) == {"image", "box", "box_coords", "box2", "box2_coords"}
    assert torch.equal(b1["box"], b2["box"]) and torch.equal(b1["box2"], b2["box2"])  # deterministic in the step
    assert not torch.equal(b1["box"], b1["box2"]) and not torch.equal(b1["box"], sampler.batch(5)["box"])
    for i in range(3):  # the coordinates describe the mask
        (y0, y1), (x0, x1) = b1["box_coords"][i].tolist()
        assert b1["box"][i].sum() == (y1 - y0) * (x1 - x0) and b1["box"][i, y0:y1, x0:x1].all()


def test_strong_view_brightness_contrast_and_blur_on_known_values():
    x = torch.tensor([0.0, 1.0, 2.0, 5.0]).view(1, 1, 1, 4)
    params = {"brightness": torch.tensor([2.0]), "contrast": torch.tensor([1.0]), "sigma": torch.tensor([0.0])}
    torch.testing.assert_close(apply_strong(x, params), torch.tensor([0.0, 2.0, 4.0, 10.0]).view(1, 1, 1, 4))
    params = {"brightness": torch.tensor([1.0]), "contrast": torch.tensor([0.5]), "sigma": torch.tensor([0.0])}
    torch.testing.assert_close(apply_strong(x, params), torch.tensor([1.0, 1.5, 2.0, 3.5]).view(1, 1, 1, 4))
    # a blur spreads an impulse symmetrically and keeps its mass; sigma 0 leaves a sample as it is
    img = torch.zeros(2, 1, 9, 9)
    img[:, 0, 4, 4] = 1.0
    out = gaussian_blur(img, torch.tensor([1.0, 0.0]))
    assert torch.equal(out[1], img[1])
    assert out[0].sum().item() == pytest.approx(1.0, abs=1e-5) and out[0, 0, 4, 4] < 0.2
    assert out[0, 0, 4, 3] == pytest.approx(out[0, 0, 3, 4].item()) and out[0, 0, 4, 3] > out[0, 0, 4, 2]
    g = torch.Generator().manual_seed(0)
    p = draw_strong(1000, AugmentConfig(), g)
    assert 0.7 < (p["brightness"] != 1).float().mean() < 0.9 and 0.4 < (p["sigma"] > 0).float().mean() < 0.6
    assert p["brightness"].min() >= 0.5 and p["brightness"].max() <= 1.5 and p["sigma"].max() <= 2.0


def test_strong_views_share_the_weak_views_spatial_transform():
    from frugalseg.data.sampling import PatchSampler
    from frugalseg.data.volume import Volume

    rng = np.random.default_rng(0)
    img = rng.random((1, 40, 40, 6)).astype(np.float32)
    vol = Volume("v", img, None, np.eye(4), (1.5, 1.5, 6.0))
    aug = AugmentConfig(strong_probability=1.0, strong_contrast=0.0, blur_probability=0.0)
    b = PatchSampler([vol], 2, (32, 32), 4, 3, 0.0, aug, strong_views=2).batch(1)
    assert {"image", "strong1", "strong2"} <= set(b)
    for k in ("strong1", "strong2"):  # brightness only: strong = (weak - min) * factor + min, per sample
        for i in range(4):
            w, s = b["image"][i], b[k][i]
            lo = w.min()
            factor = ((s - lo).sum() / (w - lo).sum()).item()
            torch.testing.assert_close(s, (w - lo) * factor + lo, atol=1e-5, rtol=1e-5)
    assert not torch.equal(b["strong1"], b["strong2"])
