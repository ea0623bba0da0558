"""Seeding, thread settings and provenance."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def set_threads(requested: int = 0) -> int:
    """Use as many intra-op threads as cores this process may run on (or ``requested`` if > 0), and keep freed
    memory for reuse (:func:`~frugalseg.hardware.keep_freed_memory`): the settings of a process that trains or
    profiles."""
    from frugalseg.hardware import keep_freed_memory

    keep_freed_memory()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    # processes of one torchrun job on this machine share its cores
    from frugalseg.engine.distributed import context

    local = max(1, context().local_world)
    n = requested if requested > 0 else max(1, cores // local)
    torch.set_num_threads(n)
    return n


def git_revision() -> str:
    """The project's git revision, or ``unknown`` outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        rev = out.stdout.strip()
        if out.returncode == 0 and rev:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"
