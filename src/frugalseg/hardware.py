"""What this machine offers: the device to run on, and whether its CPU multiplies bf16 in hardware."""

from __future__ import annotations

import ctypes
import functools
import os
import re
import sys
from pathlib import Path

from frugalseg.errors import UserError


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (empty when unknown)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); without it bf16 is emulated and slow."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def pick_device(choice: str = "auto"):
    """``auto`` (the first CUDA GPU if there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:i``."""
    import torch

    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" or (choice.startswith("cuda:") and re.fullmatch(r"[0-9]+", choice[5:])):
        if not torch.cuda.is_available():
            raise UserError(f"--device {choice}: no CUDA GPU is available here")
        index = int(choice[5:]) if ":" in choice else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {choice}: only {torch.cuda.device_count()} CUDA GPU(s) here")
        return torch.device(choice)
    raise UserError(f"--device {choice!r}: expected auto, cpu, cuda or cuda:<index>")


def resolve_precision(choice: str, device) -> str:
    """``train.precision`` on ``device``: ``fp32`` or ``bf16`` as asked, or for ``auto`` bf16 where it is multiplied
    in hardware (a CUDA GPU with bf16 support, a CPU with AVX512-BF16 or AMX), fp32 elsewhere."""
    if choice != "auto":
        return choice
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if native_bf16() else "fp32"


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache  # once per process
def keep_freed_memory() -> bool:
    """Let glibc's allocator keep freed memory for the next allocation instead of returning it to the system.

    A training step allocates and frees the same large activation and gradient buffers every step. By default
    glibc serves blocks above a (self-adjusting) threshold with fresh ``mmap`` pages and gives freed memory at the
    top of its heap back to the system, so each step pays again for page faults and for zeroing new pages: 6,100-8,200
    page faults per default 2-D step, and the step 1.1-1.2x slower (docs/results.md, "Memory the step frees").
    Here blocks up to 32 MiB come from the heap and up to 1 GiB of freed memory stays mapped, so the process's
    resident memory stays at its peak instead of shrinking between steps. Only on Linux with glibc (elsewhere,
    or with ``FRUGALSEG_MALLOC=default`` in the environment, the allocator is left as it is); returns whether the
    settings took effect. Values are unchanged: only where the memory comes from differs.
    """
    if not sys.platform.startswith("linux") or os.environ.get("FRUGALSEG_MALLOC", "") == "default":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return (libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
                and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1)
    except (OSError, AttributeError):  # not glibc (musl has no libc.so.6 / no mallopt)
        return False
