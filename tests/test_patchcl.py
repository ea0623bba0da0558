"""PatchCL: entropy-guided patch picks on a hand-made map, the bound against a naive loop, queues, the method."""

import math

import pytest
import torch

from frugalseg.losses.patchcl import (
    attended_patch_features,
    binary_entropy,
    patch_statistics,
    plgcl_loss,
    select_patches,
)
from frugalseg.methods.patchcl import PatchCL, PatchCLOptions
from frugalseg.nn.unet import UNet


def test_binary_entropy_known_values():
    c = torch.tensor([0.5, 0.0, 1.0, 0.25])
    expected = [1.0, 0.0, 0.0, -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))]
    assert binary_entropy(c).tolist() == pytest.approx(expected, abs=1e-4)


def test_patch_picks_follow_dominance_then_entropy():
    # one image, 2 classes, 4x4 pixels -> four 2x2 patches (row-major: TL, TR, BL, BR)
    c1 = torch.tensor([[0.9, 0.9, 0.6, 0.6],
                       [0.9, 0.9, 0.6, 0.6],
                       [0.2, 0.2, 1.0, 1.0],
                       [0.2, 0.2, 1.0, 1.0]])
    conf = torch.stack([1 - c1, c1])[None]  # (1, 2, 4, 4)
    mean_conf, mean_ent = patch_statistics(conf, 2)
    assert mean_conf[0, 1].tolist() == pytest.approx([0.9, 0.6, 0.2, 1.0])
    picks = select_patches(mean_conf, mean_ent, per_class=2)
    # class 0 dominates only the bottom-left patch; class 1: BR (certain) before TL (0.9), TR (0.6) dropped
    assert picks == [(0, 0, 2), (0, 1, 3), (0, 1, 0)]


def test_attended_features_are_confidence_weighted_patch_means():
    feats = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    conf = torch.zeros(1, 2, 4, 4)
    conf[0, 1, 0, 0] = 1.0
    conf[0, 1, 0, 1] = 3.0  # weights inside the top-left 2x2 patch: pixel values 0 and 1
    out = attended_patch_features(feats, conf, [(0, 1, 0)], 2)
    assert out.flatten().tolist() == pytest.approx([(0 * 1 + 1 * 3) / 4])
    half = torch.nn.functional.avg_pool2d(feats, 2)  # a feature map at half resolution
    out = attended_patch_features(half, torch.ones(1, 2, 4, 4), [(0, 0, 0)], 4)  # one patch: the whole image
    assert out.flatten().tolist() == pytest.approx([half.mean().item()])


def test_plgcl_equals_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    k, d = 3, 4
    t = torch.randn(5, d, generator=g)
    classes = torch.tensor([0, 1, 2, 0, 1])
    means = torch.randn(k, d, generator=g) * 0.3
    a = torch.randn(k, d, d, generator=g) * 0.1
    covs = a @ a.transpose(1, 2)
    present = torch.tensor([True, True, False])
    tau, lam, zeta = 0.5, 2.0, 8.0
    keep = present[classes]
    got = plgcl_loss(t[keep], classes[keep], means, covs, present, tau, lam, zeta)
    terms = []
    for vec, i in zip(t[keep], classes[keep].tolist()):
        u = vec / vec.norm()

        def a_of(j, u=u):
            return float(u @ means[j]) / tau + lam / (2 * tau**2) * float(u @ covs[j] @ u)

        negs = sum(math.exp(a_of(j)) for j in range(k) if j != i and present[j])
        terms.append(-float(u @ means[i]) / tau + math.log(math.exp(a_of(i)) + zeta / int(present.sum()) * negs))
    assert got.item() == pytest.approx(sum(terms) / len(terms), abs=1e-5)


def test_patchcl_steps_fill_queues_and_teacher_moves_only_by_ema():
    torch.manual_seed(0)
    method = PatchCL(UNet(2, 1, 3, (4, 8, 16)), PatchCLOptions(patch=8, per_class=4, queue=16, embedding=8, warmup=0.0))
    g = torch.Generator().manual_seed(0)
    label = torch.zeros(2, 32, 32, dtype=torch.long)
    label[:, 8:24, 8:24] = 1
    label[:, 12:20, 12:20] = 2
    batch = {"image": torch.randn(2, 1, 32, 32, generator=g), "label": label,
             "u_image": torch.randn(2, 1, 32, 32, generator=g), "u_view2": torch.randn(2, 1, 32, 32, generator=g)}
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.01)
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    outs = []
    for _ in range(3):
        out = method.training_step(batch, 0.5)
        opt.zero_grad()
        out.loss.backward()
        assert all(p.grad is None for p in method.teacher.parameters())
        opt.step()
        method.after_optimizer_step(0.5)
        outs.append(out)
    assert outs[0].logs["loss_plgcl"] == 0  # empty queues: no statistics yet
    assert outs[-1].logs["loss_plgcl"] != 0 and torch.isfinite(outs[-1].loss)
    assert int(method.queue_count[1]) > 0 and int(method.queue_count[0]) > 0
    assert any(not torch.equal(v, before[k]) for k, v in method.teacher.state_dict().items())


def test_patch_entropy_is_that_of_the_attended_image():
    # 1 image, 2 classes, 2x2 pixels = one patch; class 1 is certain everywhere
    image = torch.tensor([[[[0.0, 4.0], [2.0, 4.0]]]])  # unit scale: 0, 1, 0.5, 1
    conf = torch.stack([torch.zeros(2, 2), torch.ones(2, 2)])[None]
    _, ent = patch_statistics(conf, 2, image)
    # I ⊙ C^1 = (0, 1, 0.5, 1): entropies 0, 0, 1, 0 -> mean 0.25; C^0 = 0 everywhere: 0
    assert ent[0, 1, 0].item() == pytest.approx(0.25, abs=1e-4) and ent[0, 0, 0].item() == pytest.approx(0, abs=1e-4)
    _, ent_conf = patch_statistics(conf, 2)  # on C^k alone the certain class has no entropy at all
    assert ent_conf[0, 1, 0].item() == pytest.approx(0.0, abs=1e-4)


def test_warm_up_trains_supervised_and_cross_entropy_consistency_only():
    torch.manual_seed(0)
    method = PatchCL(UNet(2, 1, 3, (4, 8, 16)), PatchCLOptions(patch=8, per_class=4, queue=16, embedding=8,
                                                              warmup=0.5, consistency=4.0, rampup=0.0,
                                                              confidence=0.0))
    g = torch.Generator().manual_seed(1)
    label = torch.zeros(2, 32, 32, dtype=torch.long)
    label[:, 8:24, 8:24] = 1
    label[:, 12:20, 12:20] = 2
    batch = {"image": torch.randn(2, 1, 32, 32, generator=g), "label": label,
             "u_image": torch.randn(2, 1, 32, 32, generator=g), "u_view2": torch.randn(2, 1, 32, 32, generator=g)}
    out = method.training_step(batch, 0.2)  # inside the warm-up
    assert out.logs["loss_plgcl"] == 0 and out.logs["patches"] == 0 and int(method.queue_count.sum()) == 0
    with torch.no_grad():
        method.teacher.train()
        pseudo = method.teacher(batch["u_view2"]).argmax(1)
        student = method.net(batch["u_image"])
    ce = torch.nn.functional.cross_entropy(student, pseudo)
    assert out.logs["loss_consistency"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((out.logs["loss_dice_ce"] + 4.0 * ce).item(), rel=1e-5)
    after = method.training_step(batch, 0.6)  # after it: patches are picked and queued
    assert after.logs["patches"] > 0 and int(method.queue_count.sum()) > 0
    off = PatchCL(UNet(2, 1, 3, (4, 8, 16)), PatchCLOptions(patch=8, per_class=4, queue=16, embedding=8, contrast=0.0))
    out = off.training_step(batch, 0.9)  # γ = 0: no patch work at all
    assert out.logs["patches"] == 0 and int(off.queue_count.sum()) == 0


def test_consistency_leaves_out_pixels_below_the_confidence_threshold():
    torch.manual_seed(0)
    method = PatchCL(UNet(2, 1, 3, (4, 8, 16)), PatchCLOptions(patch=8, per_class=4, queue=16, embedding=8,
                                                              warmup=0.5, rampup=0.0, confidence=0.4))
    g = torch.Generator().manual_seed(3)
    label = torch.zeros(2, 32, 32, dtype=torch.long)
    label[:, 8:24, 8:24] = 1
    batch = {"image": torch.randn(2, 1, 32, 32, generator=g), "label": label,
             "u_image": torch.randn(2, 1, 32, 32, generator=g), "u_view2": torch.randn(2, 1, 32, 32, generator=g)}
    out = method.training_step(batch, 0.1)
    with torch.no_grad():
        method.teacher.train()
        prob = method.teacher(batch["u_view2"]).softmax(1)
        student = method.net(batch["u_image"])
    kept = prob.max(1).values >= 0.4
    assert 0 < kept.float().mean() < 1  # the threshold splits this batch
    ce = torch.nn.functional.cross_entropy(student, prob.argmax(1), reduction="none")
    # the left-out pixels count as zeros in the mean; all pixels in would give the plain mean
    assert out.logs["loss_consistency"].item() == pytest.approx((ce * kept).mean().item(), rel=1e-5)
    assert out.logs["loss_consistency"].item() < ce.mean().item()
    assert out.logs["confident"].item() == pytest.approx(kept.float().mean().item())
