"""Mean teacher: ramp-up, consistency, teacher moved only by EMA, the labelled + unlabelled sampler."""

import math

import numpy as np
import pytest
import torch

from frugalseg.config import AugmentConfig
from frugalseg.data.sampling import PatchSampler, SemiSupervisedSampler, build_sampler
from frugalseg.data.volume import Volume
from frugalseg.losses.consistency import sigmoid_rampup, softmax_mse
from frugalseg.methods.mean_teacher import MeanTeacher, MeanTeacherOptions
from frugalseg.nn.unet import UNet


def test_sigmoid_rampup_known_values():
    assert sigmoid_rampup(0.0, 0.4) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(0.2, 0.4) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(0.4, 0.4) == 1.0 and sigmoid_rampup(0.9, 0.4) == 1.0
    assert sigmoid_rampup(0.0, 0.0) == 1.0


def test_softmax_mse_zero_when_predictions_agree_and_teacher_detached():
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    assert softmax_mse(s, s.clone()).item() == 0.0
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    softmax_mse(s, t).backward()
    assert t.grad is None and s.grad is not None
    p, q = s.detach().softmax(1), t.detach().softmax(1)
    assert softmax_mse(s, t).item() == pytest.approx(((p - q) ** 2).mean().item(), abs=1e-7)


def _vols(labelled=True):
    rng = np.random.default_rng(0)
    out = []
    for i in range(3):
        img = rng.random((1, 40, 40, 6)).astype(np.float32)
        lab = (img[0] > 0.5).astype(np.int64) if labelled else None
        out.append(Volume(f"v{i}", img, lab, np.eye(4), (1.5, 1.5, 6.0)))
    return out


def test_semi_supervised_batches_weak_teacher_view_and_independent_streams():
    aug = AugmentConfig(noise_std=0.0, gamma=[1.0, 1.0], contrast=[1.0, 1.0], probability=1.0)
    method = MeanTeacher(UNet(2, 1, 2, (4, 8)))
    s = build_sampler(method.spec, _vols()[:1], _vols(), 2, (32, 32), 4, 5, 0.33, aug)
    assert isinstance(s, SemiSupervisedSampler)
    b = s.batch(3)
    alone = PatchSampler(_vols()[:1], 2, (32, 32), 4, 5, 0.33, aug).batch(3)
    torch.testing.assert_close(b["image"], alone["image"])  # the labelled stream is unchanged by the other
    assert "u_label" not in b and b["u_image"].shape == (4, 1, 32, 32)
    assert not torch.equal(b["u_image"], b["image"])  # a different random stream
    diff = b["u_image"] - b["u_view2"]  # student = teacher's (spatially transformed) view + intensity only
    torch.testing.assert_close(diff, diff.mean(dim=(1, 2, 3), keepdim=True).expand_as(diff), atol=1e-5, rtol=0)


def test_teacher_gets_no_gradient_and_moves_only_by_ema():
    torch.manual_seed(0)
    method = MeanTeacher(UNet(2, 1, 2, (4, 8, 16)), MeanTeacherOptions(ema=0.9, consistency=1.0, rampup=0.0))
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(2, 1, 16, 16, generator=g), "label": torch.randint(0, 2, (2, 16, 16), generator=g),
             "u_image": torch.randn(2, 1, 16, 16, generator=g), "u_view2": torch.randn(2, 1, 16, 16, generator=g)}
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    out = method.training_step(batch, 0.5)
    assert out.logs["consistency_weight"] == 1.0 and out.logs["loss_consistency"] > 0
    out.loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    opt.step()
    for k, v in method.teacher.named_parameters():
        assert torch.equal(v, before[k])
    method.after_optimizer_step(0.5)
    student = dict(method.net.named_parameters())
    for k, v in method.teacher.named_parameters():
        assert torch.allclose(v, 0.9 * before[k] + 0.1 * student[k].detach(), atol=1e-6), k
