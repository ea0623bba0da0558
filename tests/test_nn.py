import pytest
import torch

from frugalseg.errors import UserError
from frugalseg.nn.swin import SwinUNETRNet
from frugalseg.nn.unet import UNet
from frugalseg.nn.weights import load_pretrained


@pytest.mark.parametrize("dims, size", [(2, (37, 45)), (2, (32, 32)), (2, (1 + 16, 9)), (3, (17, 22, 19)),
                                        (3, (16, 16, 16))])
@pytest.mark.parametrize("skip", [True, False])
def test_unet_shapes_and_contract(dims, size, skip):
    chans = (4, 8, 16, 32)
    net = UNet(dims, 2, 3, chans, skip=skip).eval()
    x = torch.randn(2, 2, *size)
    feats = net.encode(x)
    assert len(feats) == 4
    for i, f in enumerate(feats):  # every scale halves (rounding up) and has the configured width
        expected = tuple(-(-s // 2**i) for s in size)
        assert f.shape == (2, chans[i], *expected)
    logits, dec = net.decode(feats)
    assert logits.shape == (2, 3, *size)
    assert [d.shape[1] for d in dec] == [16, 8, 4]  # coarse to fine
    assert dec[-1].shape[2:] == size
    torch.testing.assert_close(net(x), logits)


def test_no_skip_decoder_ignores_encoder_detail():
    net = UNet(2, 1, 2, (4, 8, 16), skip=False).eval()
    feats = net.encode(torch.randn(1, 1, 16, 16))
    changed = [f.clone() for f in feats]
    changed[0] += 5.0  # fine-scale features are not used without skips
    torch.testing.assert_close(net.decode(feats)[0], net.decode(changed)[0])
    net_skip = UNet(2, 1, 2, (4, 8, 16), skip=True).eval()
    feats = net_skip.encode(torch.randn(1, 1, 16, 16))
    changed = [f.clone() for f in feats]
    changed[0] += 5.0
    assert not torch.allclose(net_skip.decode(feats)[0], net_skip.decode(changed)[0])


def test_swinunetr_adapter_contract_2d():
    net = SwinUNETRNet(2, 1, 3, feature_size=12).eval()
    x = torch.randn(1, 1, 40, 50)
    feats = net.encode(x)
    assert [f.shape[-1] for f in feats] == [64, 32, 16, 8, 4, 2]  # padded to 64
    logits, dec = net.decode(feats)
    assert len(dec) == 5
    assert net(x).shape == (1, 3, 40, 50)


def test_load_pretrained_reports_and_refuses(tmp_path):
    src = UNet(2, 1, 4, (4, 8, 16))
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    dst = UNet(2, 1, 2, (4, 8, 16))  # different number of classes: only the head differs
    report = load_pretrained(dst, path)
    assert len(report.mismatched) == 2 and len(report.missing) == 2  # head weight + bias
    torch.testing.assert_close(dst.encoder[0][0].weight, src.encoder[0][0].weight)
    enc_only = {k: v for k, v in src.state_dict().items() if not k.startswith("encoder.2")}
    torch.save(enc_only, path)
    with pytest.raises(UserError, match="encoder parameter 'encoder.2"):
        load_pretrained(UNet(2, 1, 4, (4, 8, 16)), path)
    torch.save({"foo": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="no parameter matches"):
        load_pretrained(UNet(2, 1, 4, (4, 8, 16)), path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a loadable PyTorch checkpoint"):
        load_pretrained(UNet(2, 1, 4, (4, 8, 16)), path)


def test_encoder_only_init_leaves_a_skipless_decoder_out(tmp_path):
    """PCRLv2 pre-trains a U-Net without skips: part of its decoder has the shapes of the skip U-Net's decoder."""
    nsunet = UNet(3, 1, 2, (4, 8, 16), skip=False)
    path = tmp_path / "ns.pt"
    torch.save(nsunet.state_dict(), path)
    shared = [k for k, v in UNet(3, 1, 2, (4, 8, 16)).state_dict().items()
              if not k.startswith("encoder.") and k in nsunet.state_dict() and nsunet.state_dict()[k].shape == v.shape]
    assert shared  # the trap: with every matching tensor, these decoder tensors load although the layout differs
    torch.manual_seed(1)
    fresh = UNet(3, 1, 2, (4, 8, 16))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    report = load_pretrained(fresh, path, parts="encoder")
    after = fresh.state_dict()
    for k in after:
        if k.startswith("encoder."):
            torch.testing.assert_close(after[k], nsunet.state_dict()[k])
        else:  # decoder and head: the fresh network's own initialisation
            torch.testing.assert_close(after[k], before[k])
    assert set(report.skipped) == {k for k in nsunet.state_dict() if not k.startswith("encoder.")}
    assert report.loaded == [k for k in nsunet.state_dict() if k.startswith("encoder.")]
    assert f"skipped (not encoder) {len(report.skipped)}" in report.summary()
    assert set(shared) <= set(load_pretrained(UNet(3, 1, 2, (4, 8, 16)), path).loaded)  # parts="all"


def test_load_pretrained_never_unpickles_objects(tmp_path):
    import argparse
    import os

    path = tmp_path / "pickled.pt"
    torch.save({"hook": os.system, "state_dict": UNet(2, 1, 2, (4, 8)).state_dict()}, path)
    with pytest.raises(UserError, match="not a loadable PyTorch checkpoint"):
        load_pretrained(UNet(2, 1, 2, (4, 8)), path)
    # argparse.Namespace is only attributes: PCRLv2's checkpoints keep their options in one
    torch.save({"opt": argparse.Namespace(a=1), "state_dict": UNet(2, 1, 2, (4, 8)).state_dict()}, path)
    assert len(load_pretrained(UNet(2, 1, 2, (4, 8)), path).loaded) > 0


def test_registry_builds_swinunetr_from_config():
    from frugalseg.config import ModelConfig
    from frugalseg.registry import build_network

    net = build_network(ModelConfig(name="swinunetr", swin_feature_size=12), 2, 1, 3)
    assert isinstance(net, SwinUNETRNet)
    assert net(torch.randn(2, 1, 32, 48)).shape == (2, 3, 32, 48)
    with pytest.raises(UserError, match="model.name: unknown name 'vit'"):
        build_network(ModelConfig(name="vit"), 2, 1, 3)


def test_decode_can_stop_after_some_blocks():
    net = UNet(2, 1, 3, (4, 8, 16, 32)).eval()
    feats = net.encode(torch.randn(1, 1, 32, 32))
    logits, full = net.decode(feats)
    none, part = net.decode(feats, 2)
    assert none is None and len(part) == 2 and logits.shape == (1, 3, 32, 32)
    for a, b in zip(part, full[:2]):
        torch.testing.assert_close(a, b)


def test_a_foreign_file_gives_one_error_and_no_library_warning(tmp_path):
    import warnings

    path = tmp_path / "odd.pt"
    path.write_bytes(b"\x80\x23" + bytes(range(200)))  # claims pickle protocol 35: torch warns before failing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UserError, match="not a loadable PyTorch checkpoint"):
            load_pretrained(UNet(2, 1, 2, (4, 8)), path)
    assert caught == []
