"""UniMatch: the confidence mask, CutMix of images and pseudo-labels with the partner's box, the loss weights,
the feature-perturbation stream; each checked on hand-made tensors."""

import pytest
import torch
import torch.nn as nn

from frugalseg.methods import unimatch as um
from frugalseg.methods.unimatch import UniMatch, UniMatchOptions


class Linear1x1(nn.Module):
    """A network whose logits are a 1x1 convolution of the image: encode = [image], decode = conv."""

    spatial_dims = 2

    def __init__(self, k=3):
        super().__init__()
        self.conv = nn.Conv2d(1, k, 1)
        self.out_channels = k

    def encode(self, x):
        return [x]

    def decode(self, feats):
        return self.conv(feats[-1]), []

    def forward(self, x):
        return self.decode(self.encode(x))[0]


def _batch(b=3, s=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    box = torch.zeros(b, s, s, dtype=torch.bool)
    box[:, 2:6, 3:7] = True
    box2 = torch.zeros(b, s, s, dtype=torch.bool)
    box2[0, :4, :4] = True  # only sample 0 has a second box
    return {"image": torch.randn(b, 1, s, s, generator=g), "label": torch.randint(0, 3, (b, s, s), generator=g),
            "u_image": torch.randn(b, 1, s, s, generator=g), "u_strong1": torch.randn(b, 1, s, s, generator=g),
            "u_strong2": torch.randn(b, 1, s, s, generator=g), "box": box, "box2": box2}


def test_strong_inputs_and_targets_take_the_partners_box(monkeypatch):
    seen_inputs, seen_dice = [], []
    method = UniMatch(Linear1x1(), UniMatchOptions(confidence=0.5, dropout=0.0, separate_bn=False))
    real_forward = Linear1x1.forward

    def recording_forward(self, x):
        seen_inputs.append(x.detach().clone())
        return real_forward(self, x)

    monkeypatch.setattr(Linear1x1, "forward", recording_forward)
    real_dice = um.masked_dice_loss
    monkeypatch.setattr(um, "masked_dice_loss", lambda p, t, m=None: seen_dice.append((t, m)) or real_dice(p, t, m))
    batch = _batch()
    method.training_step(batch, 0.5)
    strong = seen_inputs[-1]  # the strong views' pass: [s1 mixed; s2 mixed]
    s1, s2 = strong.chunk(2)
    partner = torch.roll(batch["u_strong1"], 1, 0)
    box = batch["box"][:, None]
    torch.testing.assert_close(s1, torch.where(box, partner, batch["u_strong1"]))
    torch.testing.assert_close(s2[1:], batch["u_strong2"][1:])  # no second box: the strong view as it is
    assert torch.equal(s2[0, :, :4, :4], batch["u_strong2"][2, :, :4, :4])  # sample 0 takes sample 2's box
    with torch.no_grad():
        weak = method.net(batch["u_image"]).softmax(1)
    conf, pseudo = weak.max(1)
    # the dice calls: labelled, s1, s2, fp - targets and masks mixed by the same boxes
    (_, m_x), (t1, m1), (t2, m2), (t_fp, m_fp) = seen_dice
    assert m_x is None
    assert torch.equal(t1, torch.where(batch["box"], torch.roll(pseudo, 1, 0), pseudo))
    assert torch.equal(m1, torch.where(batch["box"], torch.roll(conf >= 0.5, 1, 0), conf >= 0.5))
    assert torch.equal(t_fp, pseudo) and torch.equal(m_fp, conf >= 0.5)
    assert torch.equal(t2[1:], pseudo[1:]) and torch.equal(t2[0, :4, :4], pseudo[2, :4, :4])


def test_loss_weights_and_the_confidence_threshold():
    torch.manual_seed(0)
    batch = _batch()
    nothing = UniMatch(Linear1x1(), UniMatchOptions(confidence=1.0))  # no pseudo-label is confident enough
    out = nothing.training_step(batch, 0.5)
    assert out.logs["confident"] == 0.0
    for key in ("loss_s1", "loss_s2", "loss_fp"):
        assert out.logs[key].item() == pytest.approx(0.0, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.5 * out.logs["loss_x"].item(), abs=1e-6)
    every = UniMatch(Linear1x1(), UniMatchOptions(confidence=0.0, dropout=0.0))
    out = every.training_step(batch, 0.5)
    assert out.logs["confident"] == 1.0
    logs = out.logs
    expected = 0.5 * (logs["loss_x"] + 0.25 * (logs["loss_s1"] + logs["loss_s2"]) + 0.5 * logs["loss_fp"])
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert out.logs["loss_fp"].item() > 0  # dropout off: the fp prediction equals the weak one, yet soft != hard
    ramped = UniMatch(Linear1x1(), UniMatchOptions(confidence=0.0, rampup=0.5)).training_step(batch, 0.0)
    assert ramped.logs["unlabelled_weight"] == pytest.approx(torch.exp(torch.tensor(-5.0)).item())


def test_feature_perturbation_drops_whole_channels_of_the_unlabelled_features_only(monkeypatch):
    captured = {}
    method = UniMatch(Linear1x1(), UniMatchOptions(dropout=0.5, separate_bn=False))
    real_decode = Linear1x1.decode

    def recording_decode(self, feats):
        captured.setdefault("feats", feats)
        return real_decode(self, feats)

    monkeypatch.setattr(Linear1x1, "decode", recording_decode)
    torch.manual_seed(3)
    batch = _batch(b=6)
    batch["u_image"] = torch.ones(6, 1, 8, 8)
    method.training_step(batch, 0.5)
    f = captured["feats"][0]  # [x; u_w; dropout(u_w)]
    assert f.shape[0] == 18 and torch.equal(f[:6], batch["image"]) and torch.equal(f[6:12], batch["u_image"])
    dropped = f[12:]
    assert set(dropped.flatten().tolist()) <= {0.0, 2.0}  # channel dropout 0.5: zeroed or scaled by 2
    assert {float(d.max()) for d in dropped} == {0.0, 2.0}


def test_ema_teacher_option_predicts_the_pseudo_labels_and_moves_by_ema():
    method = UniMatch(Linear1x1(), UniMatchOptions(teacher="ema", ema=0.5))
    assert method.teacher is not None and all(not p.requires_grad for p in method.teacher.parameters())
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    with torch.no_grad():
        for p in method.net.parameters():
            p.add_(1.0)
    method.after_optimizer_step(0.5)
    for k, v in method.teacher.state_dict().items():
        torch.testing.assert_close(v, 0.5 * before[k] + 0.5 * method.net.state_dict()[k])


def test_separate_batchnorm_passes_normalise_each_stream_alone():
    from frugalseg.nn.unet import UNet

    for separate, sizes in ((False, [5]), (True, [2, 3])):
        net = UNet(2, 1, 3, (4, 8), norm="batch")
        seen = []
        first = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
        first.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.shape[0]))
        method = UniMatch(net, UniMatchOptions(separate_bn=separate))
        batch = _batch(b=3, s=8)
        batch["image"], batch["label"] = batch["image"][:2], batch["label"][:2]
        method.training_step(batch, 0.5)
        assert seen[: len(sizes)] == sizes, (separate, seen)
