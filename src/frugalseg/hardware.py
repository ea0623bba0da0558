"""What this machine offers: the device to run on, and whether its CPU multiplies bf16 in hardware."""

from __future__ import annotations

import re
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
