"""SelfReg-UNet: each term against hand values, zero when features agree, and the wrapper end to end."""

import pytest
import torch

from frugalseg.losses.selfreg import channel_scores, internal_distillation, semantic_consistency
from frugalseg.methods.selfreg import SelfRegularised
from frugalseg.methods.supervised import Supervised
from frugalseg.nn.unet import UNet


def test_scr_is_zero_when_the_layer_already_matches_the_teacher():
    teacher = torch.randn(2, 4, 8, 8)
    same = teacher[:, :1].expand(2, 4, 8, 8).clone()  # every channel equal: any pairing matches
    assert semantic_consistency(same, same).item() == 0.0
    coarse = torch.nn.functional.avg_pool2d(teacher, 2)  # the teacher pooled to the layer's size
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    p_s, p_t = torch.randperm(4, generator=g), torch.randperm(4, generator=g)  # the pairing SCR will draw
    g.set_state(state)
    student = coarse[:, p_t][:, p_s.argsort()]  # so that student[:, p_s] == coarse[:, p_t]
    assert semantic_consistency(student, teacher, generator=g).item() == pytest.approx(0.0, abs=1e-12)
    other = torch.Generator().manual_seed(1)
    assert semantic_consistency(student, teacher, generator=other).item() > 0  # another pairing does not match


def test_scr_value_pools_the_larger_map_and_detaches_the_teacher():
    s = torch.ones(1, 2, 2, 2, requires_grad=True)
    t = torch.zeros(1, 2, 4, 4, requires_grad=True)
    with torch.no_grad():
        t[:, :, :2, :2] = 4.0  # pooled to 2x2: the top-left cell is 4, the rest 0
    loss = semantic_consistency(s, t)
    assert loss.item() == pytest.approx(((4 - 1) ** 2 + 3 * 1) / 4)
    loss.backward()
    assert t.grad is None and s.grad is not None


def test_ifd_hand_values_and_zero_when_halves_agree():
    f = torch.zeros(1, 4, 1, 2)
    f[0, 0] = torch.tensor([3.0, 4.0])  # the two strongest (after normalising) ...
    f[0, 1] = torch.tensor([3.0, 4.0])
    f[0, 2] = torch.tensor([1.0, 0.0])  # ... and the two weakest channels
    f[0, 3] = torch.tensor([0.0, 1.0])
    scores = channel_scores(f)
    assert scores.tolist() == pytest.approx([0.7, 0.7, 0.5, 0.5])
    expected = ((3 - 1) ** 2 + 4**2 + 3**2 + (4 - 1) ** 2) / 4
    assert internal_distillation(f).item() == pytest.approx(expected)
    g = torch.randn(2, 1, 3, 3).repeat(1, 6, 1, 1)
    assert internal_distillation(g).item() == pytest.approx(0.0, abs=1e-12)


def test_wrapper_adds_the_regulariser_to_the_method_loss():
    torch.manual_seed(0)
    net = UNet(2, 1, 3, (4, 8, 16))
    base = Supervised(net)
    wrapped = SelfRegularised(base, weight=0.5)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(2, 1, 16, 16, generator=g), "label": torch.randint(0, 3, (2, 16, 16), generator=g)}
    plain = base.training_step(batch, 0.0)
    out = wrapped.training_step(batch, 0.0)
    ifd, scr = out.logs["loss_selfreg_ifd"], out.logs["loss_selfreg_scr"]
    assert ifd > 0 and scr > 0
    assert out.loss.item() == pytest.approx(plain.loss.item() + 0.5 * (ifd + scr).item(), rel=1e-5)
    assert set(wrapped.state_dict()) == {f"inner.{k}" for k in base.state_dict()}
    assert wrapped.net is net
