"""Files written atomically and read safely.

Writes go to a temporary file in the destination folder, renamed over the target when complete: a crash or a kill
mid-write leaves the previous file (or none) in place, never a half-written one. Tensor files are read with
``torch.load(weights_only=True)``: nothing but tensors and containers is unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from frugalseg.errors import UserError


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: Path | str, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(fileobj)`` on a temporary file next to ``path``, fsync, then rename it to ``path``."""
    path = Path(path)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename in (None, tmp):  # name the file the user asked for
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise


def write_json_atomic(obj: Any, path: Path | str) -> None:
    """``obj`` as indented JSON, written atomically."""
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def write_text_atomic(path: Path | str, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))


def save_atomic(obj: Any, path: Path | str) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load a tensor file written by this project (``weights_only=True``), one-line error if unreadable."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: corrupt or incompatible checkpoint ({reason})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: corrupt or incompatible checkpoint (not a mapping)")
    return obj
