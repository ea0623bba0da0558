"""BYOL: loss against the formula, stop-gradient, EMA target, momentum schedule, two-view sampling."""

import math

import pytest
import torch

from frugalseg.losses.contrastive import byol_regression, symmetric_byol_loss
from frugalseg.methods.byol import BYOL, BYOLOptions
from frugalseg.nn.ema import cosine_momentum, ema_update, frozen_copy
from frugalseg.nn.unet import UNet


def test_regression_loss_equals_normalised_squared_distance():
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    naive = torch.stack([((p[i] / p[i].norm() - z[i] / z[i].norm()) ** 2).sum() for i in range(5)])
    assert torch.allclose(byol_regression(p, z), naive, atol=1e-5)
    assert torch.allclose(byol_regression(p, 3 * p), torch.zeros(5), atol=1e-6)  # scale invariant
    assert torch.allclose(byol_regression(p, -p), torch.full((5,), 4.0), atol=1e-5)
    sym = symmetric_byol_loss(p, z, p, z)  # l(p1, z2) + l(p2, z1) = 2 l(p, z)
    assert sym.item() == pytest.approx(2 * naive.mean().item(), abs=1e-5)


def test_cosine_momentum_schedule():
    assert cosine_momentum(0.99, 0.0) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 0.5) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 1.0) == pytest.approx(1.0)
    assert cosine_momentum(0.9, 0.25) == pytest.approx(1 - 0.1 * (math.cos(math.pi / 4) + 1) / 2)


def test_ema_update_over_parameters_and_batchnorm_buffers():
    online = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    target = frozen_copy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
        online[1].running_mean.fill_(2.0)
        online[1].num_batches_tracked.fill_(7)
    before = [p.clone() for p in target.parameters()]
    ema_update(target, online, 0.75)
    for t, b, o in zip(target.parameters(), before, online.parameters()):
        assert torch.allclose(t, 0.75 * b + 0.25 * o)
    assert torch.allclose(target[1].running_mean, torch.full((4,), 0.5))
    assert int(target[1].num_batches_tracked) == 7


def _batch(dims=2):
    g = torch.Generator().manual_seed(1)
    shape = (4, 1, 32, 32) if dims == 2 else (4, 1, 16, 16, 16)
    return {"image": torch.randn(shape, generator=g), "view2": torch.randn(shape, generator=g)}


@pytest.mark.parametrize("dims", [2, 3])
def test_target_gets_no_gradient_and_moves_only_by_ema(dims):
    torch.manual_seed(0)
    method = BYOL(UNet(dims, 1, 2, (4, 8, 16)), BYOLOptions(hidden=32, projection=16, momentum=0.9))
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    target_before = {k: v.clone() for k, v in method.target_net.state_dict().items()}
    out = method.training_step(_batch(dims), 0.0)
    out.loss.backward()
    assert all(p.grad is None for p in method.target_net.parameters())
    assert all(p.grad is None for p in method.target_projector.parameters())
    assert method.net.encoder[0][0].weight.grad is not None
    online_before = {k: v.clone() for k, v in method.net.state_dict().items()}
    opt.step()
    # the optimiser did not touch the target ...
    for k, v in method.target_net.named_parameters():
        assert torch.equal(v, target_before[k]), k
    # ... the EMA moves it to tau * old + (1 - tau) * online (tau = 0.9 at progress 0)
    method.after_optimizer_step(0.0)
    online = dict(method.net.named_parameters())
    for k, v in method.target_net.named_parameters():
        assert torch.allclose(v, 0.9 * target_before[k] + 0.1 * online[k].detach(), atol=1e-6), k
    assert any(not torch.equal(online[k], online_before[k]) for k in online)


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    method = BYOL(UNet(2, 1, 2, (4, 8, 16)), BYOLOptions(hidden=32, projection=16, momentum=0.99))
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch()
    losses = []
    for i in range(30):
        out = method.training_step(batch, i / 30)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        method.after_optimizer_step(i / 30)
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0]
