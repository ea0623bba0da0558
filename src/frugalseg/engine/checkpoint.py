"""Atomic, resumable checkpoints. A kill during a write never leaves a corrupt file in place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from frugalseg.atomic import write_atomic
from frugalseg.errors import UserError


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by this project (``weights_only=True``), one-line error if unreadable."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: corrupt or incompatible checkpoint ({reason})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: corrupt or incompatible checkpoint (not a mapping)")
    return obj
