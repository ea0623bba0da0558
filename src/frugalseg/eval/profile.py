"""Speed profile of the default configs: time per training step, samples/s, data-wait share, peak RSS."""

from __future__ import annotations

import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from frugalseg.config import build_config
from frugalseg.data.preprocess import Preprocessor
from frugalseg.data.readers import open_source
from frugalseg.data.sampling import PatchSampler
from frugalseg.data.synthetic import write_phantoms
from frugalseg.engine.optim import build_optimizer
from frugalseg.engine.repro import set_threads
from frugalseg.engine.trainer import set_memory_format, to_device
from frugalseg.registry import build_method, build_network


def profile_config(spatial_dims: int, method: str = "supervised", steps: int = 8, warmup: int = 2,
                   sets: list[str] | None = None) -> dict:
    """Median wall time of ``steps`` optimiser steps of the default config on synthetic phantoms."""
    cfg = build_config(spatial_dims, None, sets or [])
    with tempfile.TemporaryDirectory() as tmp:
        src = open_source(write_phantoms(Path(tmp), spatial_dims, n_train=3, n_val=0, n_test=0))
        vols = [Preprocessor()(src.load(c)) for c in src.cases("train")]
    sampler = PatchSampler(vols, spatial_dims, cfg.data.patch_size, cfg.data.batch_size, 0,
                           cfg.data.foreground_oversample, cfg.data.augment)
    net = build_network(cfg.model, spatial_dims, 1, src.num_classes)
    module = build_method(method, net, cfg.method)
    set_memory_format(module, cfg.train.channels_last)
    opt = build_optimizer(module.parameters(), cfg.optim)
    device = torch.device("cpu")
    step_times, data_times = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        batch = to_device(sampler.batch(i), device, cfg.train.channels_last)
        t1 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.bf16):
            loss = module.training_step(batch, 0.0).loss.float()
        opt.zero_grad()
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        if i >= warmup:
            step_times.append(t2 - t0)
            data_times.append(t1 - t0)
    med = statistics.median(step_times)
    return {
        "config": f"default-{spatial_dims}d", "method": method, "patch": cfg.data.patch_size,
        "batch": cfg.data.batch_size, "bf16": cfg.train.bf16, "channels_last": cfg.train.channels_last,
        "seconds_per_step": med, "samples_per_second": cfg.data.batch_size / med,
        "data_fraction": sum(data_times) / sum(step_times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def profile_all(steps: int = 8) -> dict:
    threads = set_threads(0)
    return {"threads": threads, "torch": torch.__version__,
            "runs": [profile_config(2, steps=steps), profile_config(3, steps=steps)]}
