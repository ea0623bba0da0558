"""VoCo: overlap targets from boxes against a voxel count, crops from the right place, losses against loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from frugalseg.data.voco_crops import VoCoSampler, base_boxes, grid_size, overlap_fractions, sample_crops
from frugalseg.data.volume import Volume
from frugalseg.losses.voco import base_dissimilarity, overlap_logits, overlap_losses
from frugalseg.methods.voco import VoCo, VoCoOptions
from frugalseg.nn.unet import UNet


def test_overlap_fractions_equal_a_voxel_count():
    rng = np.random.default_rng(0)
    extent, g = (24, 36), 3
    bases = base_boxes(extent, g)
    for _ in range(20):
        x0, y0 = rng.integers(0, extent[0] - 8 + 1), rng.integers(0, extent[1] - 12 + 1)
        crop = np.array([[[x0, x0 + 8], [y0, y0 + 12]]], dtype=np.float64)
        got = overlap_fractions(crop, bases)[0]
        mask = np.zeros(extent, bool)
        mask[x0:x0 + 8, y0:y0 + 12] = True
        for k, ((a, b), (c, d)) in enumerate(bases.astype(int)):
            assert got[k] == mask[a:b, c:d].sum() / ((b - a) * (d - c))
        assert abs(got.sum() - 1.0) < 1e-12  # a base-sized crop inside the grid covers one base's worth


def test_grid_and_random_crops_stay_inside_the_volume():
    vol = Volume("v", np.zeros((1, 50, 70, 9), np.float32), None, np.eye(4), (1.0, 1.0, 1.0))
    assert grid_size((50, 70, 9), (24, 24, 9)) == 3 and grid_size((400, 400, 9), (24, 24, 9)) == 4
    sampler = VoCoSampler([vol], (16, 16, 8), seed=0, crops=5)
    rng = np.random.default_rng(3)
    for _ in range(50):
        bases, crops = sampler.boxes(0, rng)
        assert (crops[..., 0] >= 0).all() and (crops[:, 0, 1] <= 50).all() and (crops[:, 1, 1] <= 70).all()
        np.testing.assert_allclose(overlap_fractions(crops, bases).sum(1), 1.0)


def test_crops_sample_the_box_they_claim():
    image = np.arange(8 * 12 * 4, dtype=np.float32).reshape(1, 8, 12, 4)
    box = np.array([[[2.0, 6.0], [4.0, 10.0]]])  # voxels 2..5 x 4..9, full depth
    crop = sample_crops(image, box, (4, 6, 4))  # same voxel size: an exact copy
    torch.testing.assert_close(crop[0], torch.from_numpy(image[:, 2:6, 4:10, :]))


def test_crops_equal_grid_sample_on_the_boxes_affine_grids():
    import torch.nn.functional as F

    def reference(image, boxes, patch):  # one trilinear grid_sample on each box's affine grid (whole third axis)
        shape = image.shape[1:]
        theta = torch.zeros(len(boxes), 3, 4)
        for r, box in enumerate(boxes):
            for d, (a, b) in enumerate([*box, (0.0, shape[2])]):
                theta[r, 2 - d, 2 - d] = (b - a) / shape[d]  # grid coordinates run (last axis, ..., first)
                theta[r, 2 - d, 3] = (a + b) / shape[d] - 1.0
        img = torch.from_numpy(image)[None].expand(len(boxes), -1, -1, -1, -1)
        grid = F.affine_grid(theta, [len(boxes), image.shape[0], *patch], align_corners=False)
        return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)

    rng = np.random.default_rng(0)
    for _ in range(6):
        shape = tuple(int(n) for n in rng.integers(12, 40, size=3))
        image = rng.normal(size=(2, *shape)).astype(np.float32)
        patch = tuple(int(n) for n in rng.integers(5, 20, size=3))
        lo = rng.uniform(-4, 0.6 * np.array(shape[:2]), size=(5, 2))  # some boxes leave the volume: borders
        boxes = np.stack([lo, lo + rng.uniform(2, 0.6 * np.array(shape[:2]), size=(5, 2))], -1)
        torch.testing.assert_close(sample_crops(image, boxes, patch), reference(image, boxes, patch),
                                   rtol=0, atol=1e-4)


def test_batch_layout_and_determinism():
    vols = [Volume(f"v{i}", np.random.default_rng(i).normal(size=(1, 40, 40, 8)).astype(np.float32), None,
                   np.eye(4), (1.0, 1.0, 1.0)) for i in range(3)]
    sampler = VoCoSampler(vols, (16, 16, 8), seed=1, volumes_per_step=2, crops=2)
    b = sampler.batch(5)
    assert b["image"].shape == (2 * (9 + 2), 1, 16, 16, 8) and b["overlap"].shape == (2, 2, 9)
    torch.testing.assert_close(b["overlap"].sum(-1), torch.ones(2, 2))
    torch.testing.assert_close(sampler.batch(5)["image"], b["image"])


def _naive(p, q, y):
    pos, neg, reg = [], [], []
    for v in range(p.shape[0]):
        logits = torch.stack([torch.stack([F.relu(F.cosine_similarity(p[v, r], q[v, k], dim=0))
                                           for k in range(q.shape[1])]) for r in range(p.shape[1])])
        yy = y[v]
        pos.append(-(yy * torch.log(1 - (yy - logits).abs() + 1e-6)).sum() / (yy.sum() + 1e-6))
        zeros = [(r, k) for r in range(yy.shape[0]) for k in range(yy.shape[1]) if yy[r, k] == 0]
        neg.append(sum(logits[r, k] ** 2 for r, k in zeros) / (len(zeros) + 1e-6))
        terms = [F.relu(F.cosine_similarity(q[v, a], q[v, b], dim=0)) ** 2
                 for a in range(q.shape[1]) for b in range(a + 1, q.shape[1])]
        reg.append(torch.stack(terms).mean())
    return torch.stack(pos).mean(), torch.stack(neg).mean(), torch.stack(reg).mean()


def test_losses_equal_a_per_crop_loop():
    torch.manual_seed(0)
    p, q = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    y = torch.tensor([[[0.5, 0.5, 0, 0], [0.25, 0.25, 0.25, 0.25], [0, 0, 0, 1.0]],
                      [[1.0, 0, 0, 0], [0, 0.7, 0, 0.3], [0.1, 0.2, 0.3, 0.4]]])
    pos, neg = overlap_losses(overlap_logits(p, q), y)
    reg = base_dissimilarity(q)
    npos, nneg, nreg = _naive(p, q, y)
    for a, b in ((pos, npos), (neg, nneg), (reg, nreg)):
        assert abs(a.item() - b.item()) < 1e-5


def test_perfect_prediction_costs_nothing_and_regulariser_stops_gradient_on_one_side():
    y = torch.tensor([[[0.6, 0.4]]])
    pos, neg = overlap_losses(y.clone(), y)
    assert abs(pos.item()) < 1e-5 and neg.item() == 0
    q = torch.tensor([[[1.0, 0.2, 0.0], [0.8, 0.6, 0.0]]], requires_grad=True)  # two bases, cos > 0
    reg = base_dissimilarity(q)
    cos = F.cosine_similarity(q[0, 0], q[0, 1], dim=0)
    assert abs(reg.item() - cos.item() ** 2) < 1e-6
    reg.backward()
    assert q.grad[0, 0].abs().sum() > 0  # the first base of the pair is pushed away...
    assert torch.equal(q.grad[0, 1], torch.zeros(3))  # ...from a stop-gradient copy of the second


def test_voco_step_decreases_its_loss():
    torch.manual_seed(0)
    vols = [Volume(f"v{i}", np.random.default_rng(i).normal(size=(1, 40, 40, 12)).astype(np.float32), None,
                   np.eye(4), (1.0, 1.0, 1.0)) for i in range(2)]
    method = VoCo(UNet(3, 1, 2, (4, 8, 16)), VoCoOptions(hidden=32, projection=32, teacher=True))
    sampler = method.spec.sampler(vols, (16, 16, 12), 0)
    batch = sampler.batch(0)
    opt = torch.optim.Adam(method.parameters(), 1e-2)
    first = None
    for _ in range(15):
        out = method.training_step(batch, 0.0)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        method.after_optimizer_step(0.0)
        first = first if first is not None else out.loss.item()
    assert out.loss.item() < first
    assert all(not p.requires_grad for p in method.teacher_net.parameters())


def test_every_batch_has_bases_a_crop_misses_and_a_two_by_two_grid_is_refused():
    from frugalseg.errors import OptionError

    vol = Volume("v", np.zeros((1, 35, 50, 36), np.float32), None, np.eye(4), (1.0, 1.0, 1.0))  # Hippocampus-sized
    sampler = VoCoSampler([vol], (32, 48, 32), seed=0)  # the volume fits one patch: the grid is still 3 x 3
    assert sampler.grid == 3
    for step in range(20):
        assert (sampler.batch(step)["overlap"] == 0).any(dim=-1).all()  # every crop misses some base
    with pytest.raises(OptionError, match="grid must be 0 .automatic. or at least 3"):
        VoCoOptions(grid=2)


def test_crops_are_rotated_by_quarter_turns_in_plane(monkeypatch):
    from frugalseg.data import voco_crops

    x = np.broadcast_to(np.arange(48, dtype=np.float32)[:, None, None], (48, 48, 8))[None].copy()
    vol = Volume("v", x, None, np.eye(4), (1.0, 1.0, 1.0))

    def along_second_axis(views):
        views = views[:, 0]  # (R, X, Y, Z): an x-gradient varies along X unless a quarter turn moved it to Y
        return [(v.diff(dim=1).abs().sum() > v.diff(dim=0).abs().sum()).item() for v in views]

    monkeypatch.setattr(voco_crops, "ROTATE_PROBABILITY", 0.0)
    images = torch.cat([VoCoSampler([vol], (16, 16, 8), seed=0).batch(s)["image"] for s in range(10)])
    assert not any(along_second_axis(images))
    monkeypatch.setattr(voco_crops, "ROTATE_PROBABILITY", 1.0)
    images = torch.cat([VoCoSampler([vol], (16, 16, 8), seed=0).batch(s)["image"] for s in range(10)])
    share = np.mean(along_second_axis(images))
    assert 0.5 < share < 0.85  # k in {1, 2, 3}: two of three turns move the gradient to the other axis
