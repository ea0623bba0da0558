"""Importing released pre-trained weights into frugalseg networks, strictly, with a report.

Formats:

* ``voco`` - VoCo releases (``VoCo_10k.pt`` and later): a SwinUNETR-v2 state dict restricted to the encoder
  (``swinViT.*``, ``encoder1..4,10.*``), possibly with the decoder, possibly prefixed ``module.`` / ``backbone.``,
  possibly with ``swin_vit`` for ``swinViT``, possibly wrapped in ``state_dict`` / ``network_weights`` / ``net`` /
  ``student``.
* ``monai-ssl`` - MONAI's SwinUNETR self-supervised weights (``model_swinvit.pt``): the Swin ViT of an SSL head,
  keys ``module.patch_embed.*``, ``module.layers1.*`` ... without the ``swinViT.`` prefix (a plain
  ``strict=False`` load into SwinUNETR silently loads nothing), plus the SSL heads (rotation, contrastive,
  reconstruction) that are dropped.

* ``pcrlv2`` - PCRLv2 releases, ``{'opt': argparse.Namespace, 'state_dict', 'optimizer', 'epoch'}``. 3-D: the whole
  pre-training nsU-Net in the Models-Genesis layout; its encoder (``down_tr64..512.*``) lands in the
  ``genesis`` U-Net, its decoder and heads (``up_tr*``, ``out_tr.*``: shapes of a network without skips) are
  dropped. 2-D: a ResNet-18 encoder (``conv1``, ``bn1``, ``layer1..4``) that lands in ``resnet18_unet``'s
  ``encoder.``; the dummy ``fc.*`` tensors of the release are dropped.

The target network (family, 2-D/3-D, sizes, input channels) is read off the weights themselves. Every tensor of the
file is either mapped onto a parameter of that network with the same shape or dropped by a stated rule; every encoder
tensor of the network must be provided. Anything else is refused with the first offending key. Files are read with
``weights_only=True``: nothing is unpickled but tensors, containers and ``argparse.Namespace`` (plain attributes).

With ``in_channels`` the input convolutions are adapted to another number of image channels so that an image whose
channels are all equal gives the same response as before: summed over the channels for one channel, otherwise
repeated cyclically and scaled by (channels in the file) / (channels wanted).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from frugalseg.errors import UserError
from frugalseg.nn.resnet_unet import RESNET_KEY

FORMATS = ("voco", "monai-ssl", "pcrlv2")
SWIN_VIT_TOP = re.compile(r"^(patch_embed|layers\d+c?|norm)\.")  # top-level modules of MONAI's SwinTransformer
SSL_HEADS = re.compile(r"^(rotation_head|contrastive_head|conv|projection_head|proj_head|head|pred|predictor|"
                       r"student_head|teacher_head)\.")  # self-supervision heads: never part of the network
INPUT_CONVS = {  # convolutions that see the image, per target network
    "swinunetr": ("swinViT.patch_embed.proj.weight", "encoder1.layer.conv1.conv.weight",
                  "encoder1.layer.conv3.conv.weight"),
    "genesis": ("down_tr64.ops.0.conv1.weight",),
    "resnet18_unet": ("encoder.conv1.weight",),
}


@dataclass
class ImportReport:
    source: str
    format: str
    network: dict
    mapped: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    dropped_rule: str = ""
    adapted: list[str] = field(default_factory=list)
    file_in_channels: int = 0
    encoder_prefixes: tuple[str, ...] = ()

    def describe(self) -> str:
        net = self.network
        if net["name"] == "swinunetr":
            what = f"swinunetr {'v2' if net['use_v2'] else 'v1'}, feature size {net['feature_size']}"
        else:
            what = f"{net['name']} ({net['spatial_dims']}-D)"
        return f"{what}, {net['in_channels']} input channel(s)"

    def summary(self) -> str:
        enc = sum(k.startswith(self.encoder_prefixes) for k in self.mapped)
        text = f"mapped {len(self.mapped)} tensors ({enc} encoder) into {self.describe()}"
        if self.adapted:
            text += f"; input convolution(s) adapted from {self.file_in_channels} channel(s)"
        return text + f"; dropped {len(self.dropped)} tensors{f' ({self.dropped_rule})' if self.dropped else ''}"

    def use_hint(self) -> str:
        """The ``--set`` options that build the network these weights were mapped onto."""
        net = self.network
        sets = [f"model.name={net['name']}"]
        if net["name"] == "swinunetr":
            sets += [f"model.swin_feature_size={net['feature_size']}", f"model.swin_v2={str(net['use_v2']).lower()}"]
        if net["name"] == "genesis":
            sets += ["model.skip=true"]
        return " ".join(f"--set {s}" for s in sets)

    def model_config(self) -> dict:
        return _model_config(self.network)

    def to_dict(self) -> dict:
        return {"source": self.source, "format": self.format,
                "network": self.network,
                "mapped": self.mapped, "renamed": self.renamed, "dropped": self.dropped,
                "dropped_rule": self.dropped_rule, "adapted": self.adapted, "file_in_channels": self.file_in_channels}


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in ("module.", "_orig_mod.", "backbone.", "model."):
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    if key.startswith("swin_vit."):
        key = "swinViT." + key[len("swin_vit."):]
    return key


def swin_key(key: str, fmt: str) -> str:
    """The SwinUNETR parameter name of a released key (before checking it exists)."""
    key = _strip(key)
    if fmt == "monai-ssl" and key.startswith("swinViT.swinViT."):
        key = key[len("swinViT."):]
    if SWIN_VIT_TOP.match(key):  # a bare Swin ViT key (MONAI SSL weights, some VoCo exports)
        key = "swinViT." + key
    return key


def _rename(raw: dict[str, torch.Tensor], path: Path, fmt: str):
    """Released keys -> network keys; returns the renamed state, the renames, the dropped keys and the drop rule."""
    renamed: dict[str, str] = {}
    state: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    stripped = {_strip(k) for k in raw}
    resnet = fmt == "pcrlv2" and not any(k.startswith("down_tr") for k in stripped)
    for key, value in raw.items():
        if fmt == "pcrlv2":
            new = _strip(key)
            if resnet:
                new = "encoder." + new if RESNET_KEY.match(new) else new
                drop = new.startswith("fc.")  # dummy classifier tensors of the 2-D release
            else:
                drop = new.startswith(("up_tr", "out_tr."))  # decoder and heads of the skip-less network
        else:
            new = swin_key(key, fmt)
            drop = bool(SSL_HEADS.match(new))
        if drop:
            dropped.append(key)
            continue
        if new in state:
            raise UserError(f"{path}: two tensors map to '{new}' (one of them is '{key}')")
        if new != key:
            renamed[key] = new
        state[new] = value
    rule = {"voco": "SSL heads", "monai-ssl": "SSL heads",
            "pcrlv2": "classifier stub" if resnet else "decoder and heads of the skip-less pre-training network"}[fmt]
    return state, renamed, dropped, rule


def _describe(state: dict[str, torch.Tensor], path: Path, fmt: str) -> dict:
    """The network the weights belong to (family, dimensionality, sizes, input channels), from the tensors' shapes."""
    if fmt == "pcrlv2":
        first = state.get("down_tr64.ops.0.conv1.weight")
        if first is not None:
            if first.dim() not in (4, 5):
                raise UserError(f"{path}: 'down_tr64.ops.0.conv1.weight' has shape {tuple(first.shape)}, "
                                f"not a conv kernel")
            return {"name": "genesis", "spatial_dims": first.dim() - 2, "in_channels": int(first.shape[1])}
        first = state.get("encoder.conv1.weight")
        if first is None or first.dim() != 4:
            raise UserError(f"{path}: neither 'down_tr64.*' (3-D) nor ResNet-18 'conv1.weight' (2-D) tensors: "
                            f"not PCRLv2 weights")
        return {"name": "resnet18_unet", "spatial_dims": 2, "in_channels": int(first.shape[1])}
    embed = state.get("swinViT.patch_embed.proj.weight")
    if embed is None:
        raise UserError(f"{path}: no 'patch_embed.proj.weight' tensor: not SwinUNETR / Swin ViT weights")
    if embed.dim() not in (4, 5):
        raise UserError(f"{path}: 'patch_embed.proj.weight' has shape {tuple(embed.shape)}, not a conv kernel")
    info = {"name": "swinunetr", "spatial_dims": embed.dim() - 2, "feature_size": int(embed.shape[0]),
            "in_channels": int(embed.shape[1]), "use_v2": any(k.startswith("swinViT.layers1c.") for k in state)}
    if info["feature_size"] % 12:
        raise UserError(f"{path}: feature size {info['feature_size']} is not a multiple of 12 (SwinUNETR's heads)")
    return info


def _model_config(info: dict) -> dict:
    """The ``model`` config keys that build the network ``info`` describes."""
    if info["name"] == "swinunetr":
        return {"name": "swinunetr", "swin_feature_size": info["feature_size"], "swin_v2": info["use_v2"]}
    return {"name": info["name"]}


def adapt_input_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """An input convolution for ``channels`` image channels: an image whose channels are all equal gives the same
    response (summed for one channel; otherwise repeated cyclically and scaled by old / new)."""
    old = weight.shape[1]
    if channels == old:
        return weight
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    index = torch.arange(channels) % old
    return weight[:, index] * (old / channels)


def import_weights(path: Path | str, fmt: str, in_channels: int | None = None
                   ) -> tuple[dict[str, torch.Tensor], ImportReport]:
    """Read a released checkpoint of format ``fmt`` and return the frugalseg state dict and the report."""
    from frugalseg.nn.weights import read_state_dict

    if fmt not in FORMATS:
        raise UserError(f"--format: unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if in_channels is not None and in_channels < 1:
        raise UserError(f"--in-channels: must be at least 1, got {in_channels}")
    path = Path(path)
    state, renamed, dropped, rule = _rename(read_state_dict(path), path, fmt)
    info = _describe(state, path, fmt)
    file_in_channels = info["in_channels"]
    adapted = []
    if in_channels is not None and in_channels != info["in_channels"]:
        for key in INPUT_CONVS[info["name"]]:
            if key in state:
                state[key] = adapt_input_channels(state[key], in_channels)
                adapted.append(key)
        info["in_channels"] = in_channels
    from frugalseg.config import ModelConfig
    from frugalseg.registry import build_network

    out = state.get("out.conv.conv.weight")
    net = build_network(ModelConfig(**_model_config(info)), info["spatial_dims"], info["in_channels"],
                        int(out.shape[0]) if out is not None else 2)
    family = {"swinunetr": "SwinUNETR", "genesis": "the genesis U-Net", "resnet18_unet": "the ResNet-18 U-Net"}
    own = net.state_dict()
    for key, value in state.items():
        if key not in own:
            hint = " (SwinUNETR v2 block in a v1 file?)" if re.match(r"swinViT\.layers\dc\.", key) else ""
            raise UserError(f"{path}: tensor '{key}' has no place in {family[info['name']]}{hint}; "
                            f"refusing a partial import")
        if tuple(own[key].shape) != tuple(value.shape):
            raise UserError(f"{path}: tensor '{key}' has shape {tuple(value.shape)}, {family[info['name']]} expects "
                            f"{tuple(own[key].shape)}")
    missing = [k for k in own if k.startswith(net.encoder_prefixes) and k not in state]
    if missing:
        raise UserError(f"{path}: encoder tensor '{missing[0]}' is missing ({len(missing)} encoder tensors "
                        f"missing): not complete {fmt} weights")
    report = ImportReport(str(path), fmt, info, sorted(state), renamed, dropped, rule, adapted, file_in_channels,
                          tuple(net.encoder_prefixes))
    return {k: v.detach().contiguous() for k, v in state.items()}, report  # freshly read: no copy needed


def write_imported(path: Path | str, fmt: str, out: Path | str, force: bool = False,
                   in_channels: int | None = None) -> ImportReport:
    """``frugalseg import-weights``: convert ``path`` and write ``out`` (refused if it exists, unless ``force``)."""
    from frugalseg.files import save_atomic

    out = Path(out)
    if not Path(path).is_file():
        raise UserError(f"{path}: weights file not found")
    if out.exists() and not force:
        raise UserError(f"{out}: already exists (add --force to overwrite)")
    if out.exists() and not out.is_file():
        raise UserError(f"{out}: exists and is not a file")
    if not out.parent.is_dir():
        raise UserError(f"{out}: folder {out.parent} does not exist")
    state, report = import_weights(path, fmt, in_channels)
    meta = {"imported": report.to_dict(), "config": {"model": report.model_config()}}
    save_atomic({"network": state, "meta": json.dumps(meta)}, out)
    return report
