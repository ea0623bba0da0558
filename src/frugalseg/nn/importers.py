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

The target network (SwinUNETR v1/v2, feature size, input channels, 2-D/3-D) is read off the weights themselves.
Every tensor of the file is either mapped onto a parameter of that network with the same shape or dropped by a
stated rule (SSL heads); every encoder tensor of the network must be provided. Anything else is refused with the
first offending key. Files are read with ``weights_only=True``: nothing is unpickled but tensors and containers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from frugalseg.errors import UserError

FORMATS = ("voco", "monai-ssl")
SWIN_VIT_TOP = re.compile(r"^(patch_embed|layers\d+c?|norm)\.")  # top-level modules of MONAI's SwinTransformer
SSL_HEADS = re.compile(r"^(rotation_head|contrastive_head|conv|projection_head|proj_head|head|pred|predictor|"
                       r"student_head|teacher_head)\.")  # self-supervision heads: never part of the network


@dataclass
class ImportReport:
    source: str
    format: str
    network: dict
    mapped: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        enc = sum(k.startswith(("swinViT.", "encoder")) for k in self.mapped)
        net = self.network
        return (f"mapped {len(self.mapped)} tensors ({enc} encoder) into swinunetr "
                f"{'v2' if net['use_v2'] else 'v1'}, feature size {net['feature_size']}, "
                f"{net['in_channels']} input channel(s); dropped {len(self.dropped)} SSL-head tensors")

    def to_dict(self) -> dict:
        return {"source": self.source, "format": self.format, "network": self.network, "mapped": self.mapped,
                "renamed": self.renamed, "dropped": self.dropped}


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


def _target(state: dict[str, torch.Tensor], path: Path, out_channels: int):
    from frugalseg.nn.swin import SwinUNETRNet

    embed = state.get("swinViT.patch_embed.proj.weight")
    if embed is None:
        raise UserError(f"{path}: no 'patch_embed.proj.weight' tensor: not SwinUNETR / Swin ViT weights")
    if embed.dim() not in (4, 5):
        raise UserError(f"{path}: 'patch_embed.proj.weight' has shape {tuple(embed.shape)}, not a conv kernel")
    info = {"name": "swinunetr", "spatial_dims": embed.dim() - 2, "feature_size": int(embed.shape[0]),
            "in_channels": int(embed.shape[1]), "use_v2": any(k.startswith("swinViT.layers1c.") for k in state)}
    if info["feature_size"] % 12:
        raise UserError(f"{path}: feature size {info['feature_size']} is not a multiple of 12 (SwinUNETR's heads)")
    net = SwinUNETRNet(info["spatial_dims"], info["in_channels"], out_channels, info["feature_size"],
                       use_v2=info["use_v2"])
    return net, info


def import_weights(path: Path | str, fmt: str) -> tuple[dict[str, torch.Tensor], ImportReport]:
    """Read a released checkpoint of format ``fmt`` and return the frugalseg state dict and the report."""
    from frugalseg.nn.weights import read_state_dict

    if fmt not in FORMATS:
        raise UserError(f"--format: unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    path = Path(path)
    raw = read_state_dict(path)
    renamed: dict[str, str] = {}
    state: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in raw.items():
        new = swin_key(key, fmt)
        if SSL_HEADS.match(new):
            dropped.append(key)
            continue
        if new in state:
            raise UserError(f"{path}: two tensors map to '{new}' (one of them is '{key}')")
        if new != key:
            renamed[key] = new
        state[new] = value
    out = state.get("out.conv.conv.weight")
    net, info = _target(state, path, int(out.shape[0]) if out is not None else 2)
    own = net.state_dict()
    for key, value in state.items():
        if key not in own:
            hint = " (SwinUNETR v2 block in a v1 file?)" if re.match(r"swinViT\.layers\dc\.", key) else ""
            raise UserError(f"{path}: tensor '{key}' has no place in SwinUNETR{hint}; refusing a partial import")
        if tuple(own[key].shape) != tuple(value.shape):
            raise UserError(f"{path}: tensor '{key}' has shape {tuple(value.shape)}, SwinUNETR expects "
                            f"{tuple(own[key].shape)}")
    missing = [k for k in own if k.startswith(net.encoder_prefixes) and k not in state]
    if missing:
        raise UserError(f"{path}: encoder tensor '{missing[0]}' is missing ({len(missing)} encoder tensors "
                        f"missing): not complete {fmt} weights")
    report = ImportReport(str(path), fmt, info, sorted(state), renamed, dropped)
    return {k: v.detach().clone().contiguous() for k, v in state.items()}, report


def write_imported(path: Path | str, fmt: str, out: Path | str, force: bool = False) -> ImportReport:
    """``frugalseg import-weights``: convert ``path`` and write ``out`` (refused if it exists, unless ``force``)."""
    from frugalseg.engine.checkpoint import save_atomic

    out = Path(out)
    if not Path(path).is_file():
        raise UserError(f"{path}: weights file not found")
    if out.exists() and not force:
        raise UserError(f"{out}: already exists (add --force to overwrite)")
    if out.exists() and not out.is_file():
        raise UserError(f"{out}: exists and is not a file")
    if not out.parent.is_dir():
        raise UserError(f"{out}: folder {out.parent} does not exist")
    state, report = import_weights(path, fmt)
    meta = {"imported": report.to_dict(), "config": {"model": {"name": "swinunetr",
                                                               "swin_feature_size": report.network["feature_size"],
                                                               "swin_v2": report.network["use_v2"]}}}
    save_atomic({"network": state, "meta": json.dumps(meta)}, out)
    return report
