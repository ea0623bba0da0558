"""Name -> implementation tables. Keys are CLI names; values import lazily so ``frugalseg --help`` stays light."""

from __future__ import annotations

import importlib
from typing import Any

from frugalseg.errors import UserError

METHODS: dict[str, str] = {
    "supervised": "frugalseg.methods.supervised:Supervised",
    "mean_teacher": "frugalseg.methods.mean_teacher:MeanTeacher",
    "patchcl": "frugalseg.methods.patchcl:PatchCL",
    "unimatch": "frugalseg.methods.unimatch:UniMatch",
    "copy_paste": "frugalseg.methods.copy_paste:CopyPaste",
    "bcp": "frugalseg.methods.bcp:BCP",
    "gcl": "frugalseg.methods.gcl:GlobalContrastive",
    "lcl": "frugalseg.methods.lcl:LocalContrastive",
    "byol": "frugalseg.methods.byol:BYOL",
    "voco": "frugalseg.methods.voco:VoCo",
    "pcrlv2": "frugalseg.methods.pcrlv2:PCRLv2",
}

NETWORKS: dict[str, str] = {
    "unet": "frugalseg.nn.unet:UNet",
    "swinunetr": "frugalseg.nn.swin:SwinUNETRNet",
    "genesis": "frugalseg.nn.genesis:GenesisUNet",
    "resnet18_unet": "frugalseg.nn.resnet_unet:ResNet18UNet",
}

DATASETS: dict[str, str] = {
    "decathlon": "frugalseg.data.readers:DecathlonSource",
    "ssl4mis_h5": "frugalseg.data.readers:SSL4MISSource",
}


def resolve(table: dict[str, str], name: str, option: str) -> Any:
    if name not in table:
        raise UserError(f"{option}: unknown name {name!r} (choose from {', '.join(sorted(table))})")
    module, attr = table[name].split(":")
    return getattr(importlib.import_module(module), attr)


def method_class(name: str, option: str = "--method") -> Any:
    """The :class:`~frugalseg.methods.base.Method` registered as ``name``."""
    return resolve(METHODS, name, option)


def method_spec(name: str, options: dict[str, Any] | None = None, option: str = "--method"):
    """The record method ``name`` declares under ``options`` (a ``method`` config mapping; defaults if ``None``)."""
    from frugalseg.config import parse_options

    cls = method_class(name, option)
    return cls.declare(parse_options(cls.Options, options or {}, "method"))


def build_network(model_cfg, spatial_dims: int, in_channels: int, out_channels: int):
    """Instantiate the configured network."""
    cls = resolve(NETWORKS, model_cfg.name, "model.name")
    if model_cfg.name == "swinunetr":
        return cls(spatial_dims, in_channels, out_channels, feature_size=model_cfg.swin_feature_size,
                   use_v2=model_cfg.swin_v2)
    if model_cfg.name == "genesis":  # fixed widths (the released layout); model.channels does not apply
        return cls(spatial_dims, in_channels, out_channels, skip=model_cfg.skip)
    if model_cfg.name == "resnet18_unet":
        if spatial_dims != 2:
            raise UserError("model.name resnet18_unet: 2-D only (set data.spatial_dims=2 or another model.name)")
        return cls(spatial_dims, in_channels, out_channels)
    return cls(spatial_dims, in_channels, out_channels, channels=model_cfg.channels, skip=model_cfg.skip,
               norm=model_cfg.norm, dropout=model_cfg.dropout)
