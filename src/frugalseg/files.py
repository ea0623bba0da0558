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


def why_unreadable(exc: BaseException, path: Path | str) -> str:
    """A short reason why ``torch.load(weights_only=True)`` refused the file ``path``, in the user's terms."""
    import zipfile

    text = str(exc)
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        saved = zipfile.is_zipfile(path) or head[:1] == b"\x80"  # torch.save's zip, or a pickle with a protocol
    except OSError:
        saved = False
    if saved and ("GLOBAL" in text or "Unsupported global" in text):
        return "it holds pickled Python objects besides tensors, and nothing but tensors is ever unpickled"
    if isinstance(exc, EOFError) or "zip" in text.lower() or "Weights only load failed" in text or not text:
        return "damaged, or not a PyTorch file"
    return text.strip().splitlines()[0][:160]


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load a tensor file written by this project (``weights_only=True``), one-line error if unreadable."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: not a readable checkpoint ({why_unreadable(exc, path)})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a readable checkpoint (it holds no mapping of tensors)")
    return obj


LOCK_FILE = ".lock"


class FolderLock:
    """An exclusive lock on a folder for this process (``fcntl.flock`` on ``<folder>/.lock``, which holds the pid).

    The operating system releases it when the process ends, however it ends, so a lock left by a dead process is
    never in the way. A second process that asks for it gets a one-line :class:`UserError` naming the holder. The
    lock file is removed on release (the folder keeps only what the run wrote).
    """

    _held: dict[Path, int] = {}  # folders this process holds (a nested run into a held folder shares the lock)
    _fds: set[int] = set()  # their lock files' descriptors (closed in forked children: see _forget_in_child)

    def __init__(self, folder: Path | str, option: str = "--out") -> None:
        import fcntl

        self.folder, self.created = Path(folder), not Path(folder).exists()
        self._fd = -1
        key = self.folder.resolve()
        if key in FolderLock._held:
            self._nested = key
            FolderLock._held[key] += 1
            return
        self._nested = None
        path = self.folder / LOCK_FILE
        for _ in range(10):  # the file may be removed between open and flock by the holder's release: retry
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise UserError(f"{option} {folder}: cannot write ({exc.strerror or exc})") from None
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(self._fd, 32).decode(errors="replace").strip() or "?"
                os.close(self._fd)
                raise UserError(f"{option} {folder}: another frugalseg process (pid {holder}) is writing this "
                                "folder; wait for it to end or choose another folder") from None
            try:
                if os.fstat(self._fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(self._fd)  # we locked a file that was removed meanwhile: take the new one
        else:
            raise UserError(f"{option} {folder}: its lock file keeps changing under another process; try again")
        os.ftruncate(self._fd, 0)
        os.write(self._fd, str(os.getpid()).encode())
        FolderLock._held[self.folder.resolve()] = 1
        FolderLock._fds.add(self._fd)

    def release(self, remove_if_unused: bool = False) -> None:
        """Unlock and remove the lock file; with ``remove_if_unused``, also remove the folder if this lock created
        it and nothing else was written into it (a run refused before its first file leaves no trace)."""
        if self._nested is not None:  # the outer holder releases
            FolderLock._held[self._nested] -= 1
            self._nested = None
            return
        if self._fd < 0:
            return
        FolderLock._held.pop(self.folder.resolve(), None)
        FolderLock._fds.discard(self._fd)
        try:
            (self.folder / LOCK_FILE).unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = -1
        if remove_if_unused and self.created and not any(self.folder.iterdir()):
            self.folder.rmdir()

    @staticmethod
    def _forget_in_child() -> None:
        """A forked child (a background data worker) does not hold its parent's locks: a flock lives as long as
        any descriptor of it, so a child outliving a killed parent would keep the folder locked."""
        for fd in FolderLock._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        FolderLock._fds = set()
        FolderLock._held = {}

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release(remove_if_unused=exc[0] is not None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=FolderLock._forget_in_child)
