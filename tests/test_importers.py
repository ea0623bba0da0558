"""Importing released SwinUNETR weights: exact released key names and shapes, built here (no downloads)."""

from __future__ import annotations

import json
from collections import OrderedDict

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
