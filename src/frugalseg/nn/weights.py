"""Loading pre-trained weights by name and shape, with a report; never a silent partial load."""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from frugalseg.errors import UserError
from frugalseg.files import why_unreadable

WRAPPER_KEYS = ("network", "state_dict", "model", "net", "student", "network_weights")
PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely (``weights_only=True``; besides tensors and containers only ``argparse.Namespace``
    is rebuilt) and return its flat tensor state dict."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    try:  # argparse.Namespace holds plain attributes (PCRLv2's checkpoints pickle their options in one)
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a foreign file's unpickler warnings: the one-line error says enough
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file makes the unpickler raise nearly anything
        raise UserError(f"{path}: not a loadable PyTorch checkpoint ({why_unreadable(exc, path)})") from None
    for _ in range(3):
        if isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
            inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not any(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f"{path}: no tensor state dict found in the checkpoint")
    state = {}
    for key, value in obj.items():
        if not torch.is_tensor(value):
            continue
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # matching tensors left out on purpose (encoder only)

    def summary(self) -> str:
        text = (f"loaded {len(self.loaded)}, missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
                f"shape-mismatched {len(self.mismatched)}")
        return text + (f", skipped (not encoder) {len(self.skipped)}" if self.skipped else "")

    def to_dict(self) -> dict[str, list[str]]:
        return {"loaded": self.loaded, "missing": self.missing, "unexpected": self.unexpected,
                "mismatched": self.mismatched, "skipped": self.skipped}


def load_pretrained(net: nn.Module, path: Path | str, parts: str = "all") -> LoadReport:
    """Copy every tensor whose name and shape match into ``net`` (with ``parts="encoder"``, only those under the
    network's ``encoder_prefixes``); refuse when nothing matches or an encoder parameter is missing (a decoder or
    head may legitimately differ, e.g. after pre-training)."""
    state = read_state_dict(path)
    own = net.state_dict()
    rename = getattr(net, "released_key", None)
    if rename is not None:  # a network that also reads the key spellings of released checkpoints
        state = {rename(k): v for k, v in state.items()}
    report = LoadReport()
    matched = {}
    prefixes = getattr(net, "encoder_prefixes", ())
    if parts == "encoder" and not prefixes:
        raise ValueError(f"{type(net).__name__} does not state its encoder_prefixes")
    for key, value in state.items():
        if parts == "encoder" and not key.startswith(prefixes):
            report.skipped.append(key)
        elif key not in own:
            report.unexpected.append(key)
        elif tuple(own[key].shape) != tuple(value.shape):
            report.mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs network {tuple(own[key].shape)}")
        else:
            matched[key] = value
            report.loaded.append(key)
    report.missing = [k for k in own if k not in matched]
    if not matched:
        raise UserError(f"--init {path}: no parameter matches the network by name and shape ({report.summary()})")
    enc_missing = [k for k in report.missing if k.startswith(prefixes)]
    if enc_missing:
        raise UserError(f"--init {path}: encoder parameter '{enc_missing[0]}' is missing or mismatched "
                        f"({len(enc_missing)} encoder tensors; {report.summary()})")
    net.load_state_dict(matched, strict=False)
    return report
