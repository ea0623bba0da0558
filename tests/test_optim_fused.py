"""AdamW as PyTorch's fused kernel (optim.fused): the per-operation AdamW's update to rounding, whatever the
layouts of the gradients and moments."""

import copy

import torch

from frugalseg.config import OptimConfig
from frugalseg.engine.optim import FusedAdamW, build_optimizer, same_layout
from frugalseg.nn.unet import UNet


def _net():
    torch.manual_seed(0)
    return UNet(2, 1, 3, channels=(4, 8, 16), norm="batch").to(memory_format=torch.channels_last)


def _train(net, opt, grads_layout, steps=4):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in net.parameters():
            g = torch.randn(p.shape, generator=gen) * 0.1
            p.grad = torch.empty_like(p).copy_(g) if grads_layout == "param" else g.contiguous()
        opt.step()
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def test_fused_adamw_makes_the_per_operation_update_whatever_the_gradient_layout():
    ref_net = _net()
    ref = _train(ref_net, torch.optim.AdamW(ref_net.parameters(), lr=1e-2, weight_decay=0.1), "param")
    moved = (ref - torch.cat([p.detach().flatten() for p in _net().parameters()])).abs().max()
    assert moved > 0.03  # the steps move the weights well beyond the tolerance below
    # the 3x3 weights are channels-last: a default-layout gradient puts other elements at the same offsets
    assert any(not same_layout(p.contiguous(), p) for p in ref_net.parameters())
    for layout in ("param", "default"):
        net = _net()
        opt = build_optimizer(net.parameters(), OptimConfig(lr=1e-2, weight_decay=0.1))
        assert isinstance(opt, FusedAdamW)
        torch.testing.assert_close(_train(net, opt, layout), ref, rtol=0, atol=1e-6)


def test_fused_adamw_moments_loaded_in_another_layout_and_the_switch():
    net, twin = _net(), _net()
    opt = build_optimizer(net.parameters(), OptimConfig(lr=1e-2))
    ref_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=OptimConfig().weight_decay)
    _train(net, opt, "param", steps=2)
    _train(twin, ref_opt, "param", steps=2)
    state = copy.deepcopy(opt.state_dict())
    for s in state["state"].values():  # moments saved in the default layout
        s["exp_avg"], s["exp_avg_sq"] = s["exp_avg"].contiguous(), s["exp_avg_sq"].contiguous()
    opt.load_state_dict(state)
    torch.testing.assert_close(_train(net, opt, "param", steps=2), _train(twin, ref_opt, "param", steps=2),
                               rtol=0, atol=1e-6)
    plain = build_optimizer(_net().parameters(), OptimConfig(fused=False))
    assert type(plain) is torch.optim.AdamW and not plain.defaults["fused"]
