"""BCP and its copy-paste first stage: which image is pasted into which, which labels each region is compared with,
and with which weight; the teacher only moves by EMA."""

import pytest
import torch

from frugalseg.losses import segmentation as seg
from frugalseg.methods import bcp as bcp_module
from frugalseg.methods import copy_paste as cp_module
from frugalseg.methods.bcp import BCP, BCPOptions
from frugalseg.methods.copy_paste import CopyPaste
from tests.test_unimatch import Linear1x1


def _batch(b=4, s=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    box = torch.zeros(b, s, s, dtype=torch.bool)
    box[:, 1:6, 2:7] = True  # one box for the batch
    return {"image": torch.randn(b, 1, s, s, generator=g), "label": torch.randint(0, 3, (b, s, s), generator=g),
            "u_image": torch.randn(b, 1, s, s, generator=g), "box": box}


def _record(monkeypatch, module):
    calls = []
    real = seg.mixed_region_loss

    def recording(logits, outside, inside, box, w_out, w_in):
        calls.append({"outside": outside, "inside": inside, "box": box, "w": (w_out, w_in)})
        return real(logits, outside, inside, box, w_out, w_in)

    monkeypatch.setattr(module, "mixed_region_loss", recording)
    return calls


def _inputs(monkeypatch):
    seen = []
    real = Linear1x1.forward
    monkeypatch.setattr(Linear1x1, "forward", lambda self, x: seen.append(x.detach().clone()) or real(self, x))
    return seen


def test_copy_paste_pastes_the_second_half_into_the_first_with_its_labels(monkeypatch):
    calls, seen = _record(monkeypatch, cp_module), _inputs(monkeypatch)
    batch = _batch()
    out = CopyPaste(Linear1x1()).training_step(batch, 0.3)
    a, b = batch["image"][:2], batch["image"][2:]
    box = batch["box"][:2]
    torch.testing.assert_close(seen[0], torch.where(box[:, None], b, a))
    (call,) = calls
    assert torch.equal(call["outside"], batch["label"][:2]) and torch.equal(call["inside"], batch["label"][2:])
    assert call["w"] == (1.0, 1.0)
    assert out.loss.item() == pytest.approx(0.5 * (out.logs["loss_dice"] + out.logs["loss_ce"]).item())


def test_bcp_pastes_both_ways_and_weighs_the_pseudo_labelled_regions(monkeypatch):
    calls = _record(monkeypatch, bcp_module)
    method = BCP(Linear1x1(), BCPOptions(u_weight=0.5, largest_component=False))
    batch = _batch()
    seen = _inputs(monkeypatch)
    out = method.training_step(batch, 0.5)
    x, u, box = batch["image"], batch["u_image"], batch["box"][:2]
    a, b, ua, ub = x[:2], x[2:], u[:2], u[2:]
    # the teacher labels u_a and u_b; the student sees u_a with a's box, then b with u_b's box
    torch.testing.assert_close(seen[0], ua)
    torch.testing.assert_close(seen[1], ub)
    torch.testing.assert_close(seen[2], torch.where(box[:, None], a, ua))
    torch.testing.assert_close(seen[3], torch.where(box[:, None], ub, b))
    with torch.no_grad():
        pa, pb = method.teacher(ua).argmax(1), method.teacher(ub).argmax(1)
    unl, lab = calls
    assert torch.equal(unl["outside"], pa) and torch.equal(unl["inside"], batch["label"][:2])
    assert unl["w"] == (0.5, 1.0)
    assert torch.equal(lab["outside"], batch["label"][2:]) and torch.equal(lab["inside"], pb)
    assert lab["w"] == (1.0, 0.5)
    logs = out.logs
    total = 0.5 * (logs["loss_dice_u"] + logs["loss_dice_l"] + logs["loss_ce_u"] + logs["loss_ce_l"])
    assert out.loss.item() == pytest.approx(total.item(), abs=1e-6)


def test_bcp_teacher_gets_no_gradient_and_moves_only_by_ema():
    method = BCP(Linear1x1(), BCPOptions(ema=0.9))
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    out = method.training_step(_batch(), 0.5)
    out.loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert any(p.grad is not None for p in method.net.parameters())
    with torch.no_grad():
        for p in method.net.parameters():
            p.sub_(0.1 * p.grad)
    method.after_optimizer_step(0.5)
    student = method.net.state_dict()
    for k, v in method.teacher.state_dict().items():
        torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * student[k])


def test_bcp_needs_pairs_within_the_batch(phantoms_2d):
    from frugalseg.assemble import assemble
    from frugalseg.config import build_config
    from frugalseg.data.readers import open_source
    from frugalseg.errors import UserError

    cfg = build_config(2, None, ["data.batch_size=1", "model.channels=[4,8]"], method="bcp")
    with pytest.raises(UserError, match=r"--method bcp: needs data.batch_size >= 2, got 1"):
        assemble("bcp", cfg, open_source(phantoms_2d))
