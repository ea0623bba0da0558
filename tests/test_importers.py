"""Importing released SwinUNETR weights: exact released key names and shapes, built here (no downloads)."""

from __future__ import annotations

import json
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from monai.networks.nets import SwinUNETR

from frugalseg.errors import UserError
from frugalseg.nn.importers import import_weights, write_imported
from frugalseg.nn.swin import SwinUNETRNet
from frugalseg.nn.weights import load_pretrained

ENCODER = ("swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.")


@pytest.fixture(scope="module")
def released_v2():
    """VoCo_10k.pt's content: SwinUNETR(use_v2=True, feature_size=48) restricted to the encoder (145 tensors)."""
    torch.manual_seed(0)
    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=48, use_v2=True)
    state = OrderedDict((k, v.clone()) for k, v in net.state_dict().items() if k.startswith(ENCODER))
    return state


def test_voco_release_lands_tensor_by_tensor(released_v2, tmp_path):
    assert len(released_v2) == 145  # as the released file
    variants = {
        "bare": released_v2,
        "module": OrderedDict((f"module.{k}", v) for k, v in released_v2.items()),
        "swin_vit": {"state_dict": OrderedDict((k.replace("swinViT.", "swin_vit."), v)
                                               for k, v in released_v2.items())},
        "student": {"student": OrderedDict((f"backbone.{k}", v) for k, v in released_v2.items())},
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        state, report = import_weights(tmp_path / f"{name}.pt", "voco")
        assert report.network == {"name": "swinunetr", "spatial_dims": 3, "feature_size": 48, "in_channels": 1,
                                  "use_v2": True}, name
        assert set(state) == set(released_v2), name
        for key, value in released_v2.items():
            assert torch.equal(state[key], value), (name, key)
    out = tmp_path / "voco_frugalseg.pt"
    write_imported(tmp_path / "swin_vit.pt", "voco", out)
    net = SwinUNETRNet(3, 1, 3, feature_size=48, use_v2=True)
    report = load_pretrained(net, out)
    assert len(report.loaded) == 145 and not report.mismatched
    own = net.state_dict()
    for key, value in released_v2.items():
        assert torch.equal(own[key], value), key
    meta = json.loads(torch.load(out, weights_only=True)["meta"])
    assert meta["config"]["model"] == {"name": "swinunetr", "swin_feature_size": 48, "swin_v2": True}


def test_init_reads_a_raw_voco_file_directly(released_v2, tmp_path):
    torch.save({"state_dict": OrderedDict((f"module.{k.replace('swinViT.', 'swin_vit.')}", v)
                                          for k, v in released_v2.items())}, tmp_path / "raw.pt")
    net = SwinUNETRNet(3, 1, 3, feature_size=48, use_v2=True)
    report = load_pretrained(net, tmp_path / "raw.pt")
    assert len(report.loaded) == 145
    assert torch.equal(net.state_dict()["swinViT.layers1c.0.layer.conv1.conv.weight"],
                       released_v2["swinViT.layers1c.0.layer.conv1.conv.weight"])


def test_monai_ssl_weights_get_their_prefix_and_lose_the_ssl_heads(tmp_path):
    torch.manual_seed(1)
    vit = SwinUNETR(in_channels=1, out_channels=14, feature_size=48, use_v2=False).swinViT.state_dict()
    heads = {"rotation_head.weight": torch.randn(4, 768), "rotation_head.bias": torch.randn(4),
             "contrastive_head.weight": torch.randn(512, 768), "conv.0.weight": torch.randn(384, 768, 3, 3, 3)}
    obj = {"state_dict": OrderedDict([(f"module.{k}", v) for k, v in vit.items()]
                                     + [(f"module.{k}", v) for k, v in heads.items()])}
    torch.save(obj, tmp_path / "model_swinvit.pt")
    with pytest.raises(UserError, match="encoder tensor 'encoder1.layer.conv1.conv.weight' is missing"):
        import_weights(tmp_path / "model_swinvit.pt", "monai-ssl")  # the ViT alone: encoder1..4,10 are not in it
    full = SwinUNETR(in_channels=1, out_channels=14, feature_size=48, use_v2=False).state_dict()
    obj["state_dict"].update({f"module.{k}": v for k, v in full.items() if k.startswith(ENCODER[1:])})
    torch.save(obj, tmp_path / "ssl_full.pt")
    state, report = import_weights(tmp_path / "ssl_full.pt", "monai-ssl")
    assert report.network["use_v2"] is False
    assert sorted(report.dropped) == sorted(heads)
    for key, value in vit.items():
        assert torch.equal(state[f"swinViT.{key}"], value), key


def test_partial_or_foreign_files_are_refused(released_v2, tmp_path):
    missing = OrderedDict(list(released_v2.items())[1:])  # first tensor (patch embedding) gone
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(UserError, match="no 'patch_embed.proj.weight' tensor"):
        import_weights(tmp_path / "missing.pt", "voco")
    trimmed = OrderedDict((k, v) for k, v in released_v2.items() if not k.startswith("encoder10."))
    torch.save(trimmed, tmp_path / "trimmed.pt")
    with pytest.raises(UserError, match="encoder tensor 'encoder10.layer.conv1.conv.weight' is missing"):
        import_weights(tmp_path / "trimmed.pt", "voco")
    wrong = OrderedDict(released_v2)
    wrong["encoder1.layer.conv1.conv.weight"] = torch.zeros(48, 4, 3, 3, 3)
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(UserError, match=r"'encoder1.layer.conv1.conv.weight' has shape \(48, 4, 3, 3, 3\)"):
        import_weights(tmp_path / "wrong.pt", "voco")
    extra = OrderedDict(released_v2)
    extra["mystery.weight"] = torch.zeros(3)
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(UserError, match="'mystery.weight' has no place in SwinUNETR"):
        import_weights(tmp_path / "extra.pt", "voco")
    with pytest.raises(UserError, match="--format: unknown format 'pcrl'"):
        import_weights(tmp_path / "extra.pt", "pcrl")


# ---------------------------------------------------------------- PCRLv2 releases (Models-Genesis 3-D, ResNet-18 2-D)

def _pcrlv2_3d_release(seed: int = 0) -> OrderedDict:
    """``simance_multi_crop_luna_pretask_1.0_240.pt``'s state dict: the whole PCRLv2 3-D nsU-Net (169 tensors) as
    saved from ``nn.DataParallel`` - encoder ``down_tr*``, skip-less decoder ``up_tr*`` with its per-scale BN
    projector, predictor and restoration head, output ``out_tr.final_conv``."""
    from frugalseg.nn.genesis import GenesisUNet

    torch.manual_seed(seed)
    state = OrderedDict((k, v.clone()) for k, v in GenesisUNet(3, 1, 1, skip=False).state_dict().items())
    for name, c in (("up_tr256", 256), ("up_tr128", 128), ("up_tr64", 64)):
        heads = OrderedDict()
        heads.update({f"bn.{k}": v for k, v in torch.nn.BatchNorm1d(c).state_dict().items()})
        pred = torch.nn.Sequential(torch.nn.Linear(c, 2 * c), torch.nn.BatchNorm1d(2 * c), torch.nn.ReLU(),
                                   torch.nn.Linear(2 * c, c))
        heads.update({f"predictor_head.{k}": v for k, v in pred.state_dict().items()})
        mask = torch.nn.Module()
        mask.conv1, mask.bn1 = torch.nn.Conv3d(c, 1, 3, padding=1), torch.nn.BatchNorm3d(1)
        heads.update({f"deep_supervision_head.{k}": v for k, v in mask.state_dict().items()})
        state.update({f"{name}.{k}": v for k, v in heads.items()})
    return OrderedDict((f"module.{k}", v) for k, v in state.items())


def _save_release(state, path):
    import argparse

    optimizer = {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.0, "params": [0]}]}
    torch.save({"opt": argparse.Namespace(lr=1e-3, b=16, output="runs", ratio=1.0, epochs=240, gpus="0,1,2,3"),
                "state_dict": state, "optimizer": optimizer, "epoch": 240}, path)


def test_pcrlv2_3d_release_lands_its_encoder_tensor_by_tensor(tmp_path):
    from frugalseg.nn.genesis import GenesisUNet

    release = _pcrlv2_3d_release()
    assert len(release) == 169  # as the released file
    encoder = {k[len("module."):]: v for k, v in release.items() if k.startswith("module.down_tr")}
    assert len(encoder) == 56 and sum(v.numel() for k, v in encoder.items() if "num_batches" not in k
                                      and "running" not in k) == 7_027_776  # 7.03 M encoder parameters
    _save_release(release, tmp_path / "luna.pt")  # pickles an argparse.Namespace, as the release
    state, report = import_weights(tmp_path / "luna.pt", "pcrlv2")
    assert report.network == {"name": "genesis", "spatial_dims": 3, "in_channels": 1}
    assert set(state) == set(encoder) and len(report.dropped) == 169 - 56
    assert all(k.startswith(("up_tr", "out_tr.")) for k in report.dropped)  # module. stripped on reading
    for key, value in encoder.items():
        assert torch.equal(state[key], value), key
    out = tmp_path / "pcrlv2_3d.pt"
    write_imported(tmp_path / "luna.pt", "pcrlv2", out)
    net = GenesisUNet(3, 1, 3)  # with skips, for fine-tuning: the decoder starts fresh
    load = load_pretrained(net, out)
    assert len(load.loaded) == 56 and all(k.startswith(("up_tr", "out_tr.")) for k in load.missing)
    own = net.state_dict()
    for key, value in encoder.items():
        assert torch.equal(own[key], value), key
    assert json.loads(torch.load(out, weights_only=True)["meta"])["config"]["model"] == {"name": "genesis"}
    # --init reads the raw release directly too: encoder loaded, the skip-less decoder refused by shape
    net = GenesisUNet(3, 1, 3)
    raw = load_pretrained(net, tmp_path / "luna.pt")
    assert set(encoder) <= set(raw.loaded)
    assert all(k.startswith(("up_tr", "out_tr.")) for k in raw.mismatched + raw.unexpected)
    own = net.state_dict()
    for key, value in encoder.items():
        assert torch.equal(own[key], value), key
    assert any(m.startswith("up_tr256.ops.0.conv1.weight") for m in raw.mismatched)


def test_pcrlv2_2d_release_lands_in_the_resnet_unet_with_one_channel(tmp_path):
    from frugalseg.nn.resnet_unet import ResNet18UNet

    torch.manual_seed(2)
    encoder = ResNet18UNet(2, 3, 3).encoder.state_dict()
    assert len(encoder) == 120
    release = OrderedDict(encoder)
    release.update({"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})  # README's dummy keys
    _save_release(release, tmp_path / "chest.pt")
    state, report = import_weights(tmp_path / "chest.pt", "pcrlv2", in_channels=1)
    assert report.network == {"name": "resnet18_unet", "spatial_dims": 2, "in_channels": 1}
    assert sorted(report.dropped) == ["fc.bias", "fc.weight"] and report.adapted == ["encoder.conv1.weight"]
    assert set(state) == {f"encoder.{k}" for k in encoder}
    for key, value in encoder.items():
        if key != "conv1.weight":
            assert torch.equal(state[f"encoder.{key}"], value), key
    # a grey image gives the one-channel network the response the released network gives to it repeated in RGB
    x = torch.randn(2, 1, 64, 64)
    rgb = torch.nn.functional.conv2d(x.repeat(1, 3, 1, 1), encoder["conv1.weight"], stride=2, padding=3)
    grey = torch.nn.functional.conv2d(x, state["encoder.conv1.weight"], stride=2, padding=3)
    assert torch.allclose(grey, rgb, atol=1e-4)
    net = ResNet18UNet(2, 1, 4)
    write_imported(tmp_path / "chest.pt", "pcrlv2", tmp_path / "w.pt", in_channels=1)
    report = load_pretrained(net, tmp_path / "w.pt")
    assert len(report.loaded) == 120
    with pytest.raises(UserError, match=r"encoder parameter 'encoder.conv1.weight' is missing or mismatched"):
        load_pretrained(ResNet18UNet(2, 1, 4), tmp_path / "chest.pt")  # raw 3-channel file, 1-channel network
    assert len(load_pretrained(ResNet18UNet(2, 3, 4), tmp_path / "chest.pt").loaded) == 120  # raw, same channels


def test_input_channels_inflate_so_equal_channels_respond_as_before(tmp_path):
    release = _pcrlv2_3d_release(seed=3)
    _save_release(release, tmp_path / "luna.pt")
    state, report = import_weights(tmp_path / "luna.pt", "pcrlv2", in_channels=2)
    assert report.network["in_channels"] == 2 and report.file_in_channels == 1
    w = release["module.down_tr64.ops.0.conv1.weight"]
    assert state["down_tr64.ops.0.conv1.weight"].shape == (32, 2, 3, 3, 3)
    x = torch.randn(1, 1, 6, 6, 6)
    one = torch.nn.functional.conv3d(x, w, padding=1)
    two = torch.nn.functional.conv3d(x.repeat(1, 2, 1, 1, 1), state["down_tr64.ops.0.conv1.weight"], padding=1)
    assert torch.allclose(one, two, atol=1e-5)
    with pytest.raises(UserError, match="--in-channels: must be at least 1, got 0"):
        import_weights(tmp_path / "luna.pt", "pcrlv2", in_channels=0)


def test_partial_or_foreign_pcrlv2_files_are_refused(released_v2, tmp_path):
    release = _pcrlv2_3d_release()
    trimmed = OrderedDict((k, v) for k, v in release.items() if not k.startswith("module.down_tr512.ops.1."))
    _save_release(trimmed, tmp_path / "trimmed.pt")
    with pytest.raises(UserError, match="encoder tensor 'down_tr512.ops.1.conv1.weight' is missing"):
        import_weights(tmp_path / "trimmed.pt", "pcrlv2")
    extra = OrderedDict(release)
    extra["module.classifier.weight"] = torch.zeros(2, 512)
    _save_release(extra, tmp_path / "extra.pt")
    with pytest.raises(UserError, match="'classifier.weight' has no place in the genesis U-Net"):
        import_weights(tmp_path / "extra.pt", "pcrlv2")
    torch.save(released_v2, tmp_path / "voco.pt")
    with pytest.raises(UserError, match=r"neither 'down_tr64.\*' \(3-D\) nor ResNet-18 'conv1.weight' \(2-D\) "
                                        r"tensors: not PCRLv2 weights"):
        import_weights(tmp_path / "voco.pt", "pcrlv2")


def test_genesis_and_resnet_unets_follow_the_network_contract():
    from frugalseg.config import ModelConfig
    from frugalseg.registry import build_network

    net = build_network(ModelConfig(name="genesis"), 3, 1, 3).eval()
    x = torch.randn(1, 1, 19, 24, 17)  # odd sizes: max-pooling floors, the decoder pads back
    feats = net.encode(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 19, 24, 17), (128, 9, 12, 8), (256, 4, 6, 4),
                                                  (512, 2, 3, 2)]
    logits, dec = net.decode(feats)
    assert logits.shape == (1, 3, 19, 24, 17) and [d.shape[1] for d in dec] == [256, 128, 64]
    assert torch.equal(net(x), logits)
    res = build_network(ModelConfig(name="resnet18_unet"), 2, 1, 4).eval()
    assert res(torch.randn(2, 1, 50, 70)).shape == (2, 4, 50, 70)
    with pytest.raises(UserError, match="model.name resnet18_unet: 2-D only"):
        build_network(ModelConfig(name="resnet18_unet"), 3, 1, 4)


def test_import_then_fine_tune_and_pretrain_on_the_genesis_layout(tmp_path, phantoms_3d, tiny_3d):
    """CLI end to end: a PCRLv2 3-D release -> import-weights -> train --init on the genesis U-Net;
    and PCRLv2 pre-training itself runs on the released layout (genesis nsU-Net)."""
    from typer.testing import CliRunner

    from frugalseg.cli import app

    _save_release(_pcrlv2_3d_release(seed=4), tmp_path / "luna.pt")
    runner = CliRunner()
    res = runner.invoke(app, ["import-weights", str(tmp_path / "luna.pt"), str(tmp_path / "w.pt"),
                              "--format", "pcrlv2"])
    assert res.exit_code == 0, res.output
    assert "mapped 56 tensors (56 encoder) into genesis (3-D), 1 input channel(s); dropped 113 tensors" in res.output
    assert "--set model.name=genesis" in res.output
    small = ["model.name=genesis", "train.steps=2", "data.patch_size=[16,16,16]", "data.batch_size=2"]
    sets = [a for s in tiny_3d + small for a in ("--set", s)]
    run = tmp_path / "ft"
    res = runner.invoke(app, ["train", "--data", str(phantoms_3d), "--labeled", "1", "--out", str(run),
                              "--init", str(tmp_path / "w.pt"), *sets])
    assert res.exit_code == 0, res.output
    report = json.loads((run / "init_report.json").read_text())
    assert len(report["loaded"]) == 56 and all(k.startswith(("up_tr", "out_tr.")) for k in report["missing"])
    res = runner.invoke(app, ["pretrain", "--data", str(phantoms_3d), "--method", "pcrlv2", "--out",
                              str(tmp_path / "pre"), "--init", str(tmp_path / "w.pt"), *sets,
                              "--set", "model.skip=false"])
    assert res.exit_code == 0, res.output
    state = torch.load(tmp_path / "pre" / "model.pt", weights_only=True)
    net = state.get("network", state)
    assert "down_tr64.ops.0.conv1.weight" in net and net["up_tr256.ops.0.conv1.weight"].shape[1] == 512


@pytest.mark.parametrize("name,dims", [("unet", 2), ("unet", 3), ("genesis", 3), ("resnet18_unet", 2),
                                       ("swinunetr", 2)])
def test_every_network_states_its_decoder_widths_and_classes(name, dims):
    from frugalseg.config import ModelConfig
    from frugalseg.registry import build_network

    cfg = ModelConfig(name=name, channels=[8, 16, 32], swin_feature_size=12)
    net = build_network(cfg, dims, 1, 3).eval()
    size = (64 if name == "swinunetr" else 32,) * dims  # SwinUNETR's bottleneck InstanceNorm needs > 1 voxel
    with torch.no_grad():
        logits, dec = net.decode(net.encode(torch.randn(1, 1, *size)))
    assert net.out_channels == 3 == logits.shape[1]
    assert tuple(d.shape[1] for d in dec) == tuple(net.decoder_channels)
    assert all(s % net.size_divisor == 0 for s in logits.shape[2:])


SOURCE = SimpleNamespace(in_channels=1, num_classes=3)  # what assembling a stage reads of a dataset


def test_decoder_map_methods_refuse_patches_a_padding_network_would_pad():
    from frugalseg.assemble import assemble
    from frugalseg.config import Config

    cfg = Config()
    cfg.model.name, cfg.data.spatial_dims, cfg.data.patch_size, cfg.data.batch_size = "resnet18_unet", 2, [48, 64], 4
    with pytest.raises(UserError, match=r"data.patch_size \[48, 64\]: --method patchcl on model.name resnet18_unet "
                                        r"needs multiples of 32"):
        assemble("patchcl", cfg, SOURCE)
    assemble("supervised", cfg, SOURCE)  # forward pads and crops back: any size trains
    cfg.data.patch_size = [64, 64]
    assemble("patchcl", cfg, SOURCE)


def test_methods_that_need_the_projects_unet_refuse_other_networks_in_one_line():
    from frugalseg.assemble import assemble
    from frugalseg.config import Config

    cfg = Config()
    cfg.model.name, cfg.data.spatial_dims, cfg.data.patch_size = "resnet18_unet", 2, [64, 64]
    with pytest.raises(UserError, match=r"--method lcl: needs the U-Net \(model.name=unet\)"):
        assemble("lcl", cfg, SOURCE)
    with pytest.raises(UserError, match=r"--method pcrlv2: needs a U-Net \(model.name=unet or genesis"):
        assemble("pcrlv2", cfg, SOURCE)
    cfg.selfreg.weight = 0.015
    with pytest.raises(UserError, match=r"config key 'selfreg.weight': selfreg needs the U-Net"):
        assemble("supervised", cfg, SOURCE)
    cfg.model.name = "unet"
    cfg.model.channels = [8, 16, 32]
    assemble("supervised", cfg, SOURCE)  # the U-Net itself is accepted
