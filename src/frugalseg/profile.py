"""Speed profile (``frugalseg profile``, ``make bench``).

For every registered method and the default 2-D and 3-D configs: median wall time of a training step, samples/s,
the share of the step spent waiting for data, peak RSS, and achieved FLOP/s (forward + backward counted with
``torch.utils.flop_counter``) against the peak this machine reaches on a large convolution, measured in the same
run in fp32 and bf16, channels-last. Each configuration runs in a fresh process so its peak RSS is its own.
"""

from __future__ import annotations

import math
import multiprocessing
import resource
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from frugalseg.hardware import native_bf16, resolve_precision

# a convolution large enough that its arithmetic dominates overheads (what "peak" is measured on)
PEAK_CONV_2D = {"input": (8, 128, 64, 64), "out_channels": 128}
PEAK_CONV_3D = {"input": (2, 64, 32, 32, 32), "out_channels": 64}


def conv_throughput(shape: tuple[int, ...], out_channels: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """Best-of-``repeats`` forward FLOP/s of a 3x3(x3) channels-last convolution of input ``shape``."""
    dims = len(shape) - 2
    conv = (torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d)(shape[1], out_channels, 3, padding=1, bias=False)
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    conv = conv.to(dtype=dtype, memory_format=fmt)
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
    flops = 2 * shape[0] * math.prod(shape[2:]) * shape[1] * out_channels * 3**dims
    best = math.inf
    with torch.no_grad():
        conv(x)  # warm-up: oneDNN picks and compiles its kernel
        for _ in range(repeats):
            t0 = time.perf_counter()
            conv(x)
            best = min(best, time.perf_counter() - t0)
    return flops / best


def measure_peak(precisions: tuple[str, ...] = ("fp32", "bf16")) -> dict:
    """Peak convolution FLOP/s of this machine in each of ``precisions``, 2-D and 3-D; ``peak_flops`` is the best.

    A precision left out gets no key: bf16 on a CPU without bf16 instructions is emulated, and its 3-D convolution
    alone can take minutes on one core, for a roof no fp32 row is measured against.
    """
    out = {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        if name not in precisions:
            continue
        for dims, spec in ((2, PEAK_CONV_2D), (3, PEAK_CONV_3D)):
            out[f"conv{dims}d_{name}_flops"] = conv_throughput(spec["input"], spec["out_channels"], dtype)
    out["peak_flops"] = max(out.values())
    out["native_bf16"] = native_bf16()
    return out


def step_flops(module: torch.nn.Module, batch: dict, bf16: bool) -> int:
    """FLOPs of one forward + backward pass of ``module.training_step`` (convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = module.training_step(batch, 0.0).loss.float()
        loss.backward()
    module.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def profile_config(spatial_dims: int, method: str = "supervised", steps: int = 8, warmup: int = 2,
                   sets: list[str] | None = None, threads: int = 0) -> dict:
    """Median wall time of ``steps`` optimiser steps of the default config on synthetic phantoms: the stage is
    assembled as ``train`` / ``pretrain`` assemble it (SelfReg included when ``--set selfreg.weight`` asks for
    it) and each step is the one :func:`~frugalseg.engine.trainer.fit` runs."""
    from frugalseg.assemble import assemble
    from frugalseg.config import build_config
    from frugalseg.data.prefetch import Prefetcher, resolve_workers
    from frugalseg.data.readers import open_source
    from frugalseg.data.splits import few_label_split, pretrain_split
    from frugalseg.data.synthetic import write_phantoms
    from frugalseg.engine.optim import build_optimizer, build_scheduler
    from frugalseg.engine.repro import set_threads
    from frugalseg.engine.trainer import StepRunner, set_memory_format, to_device
    from frugalseg.hardware import keep_freed_memory
    from frugalseg.methods.base import PRETRAIN

    set_threads(threads)
    cfg = build_config(spatial_dims, None, sets or [], method=method)
    device = torch.device("cpu")
    precision = resolve_precision(cfg.train.precision, device)
    with tempfile.TemporaryDirectory() as tmp:
        src = open_source(write_phantoms(Path(tmp), spatial_dims, n_train=3, n_val=0, n_test=0))
        probe = assemble(method, cfg, src)  # the record, before reading anything
        pool = len(src.labelled_pool)
        split = pretrain_split(src) if probe.spec.kind == PRETRAIN else few_label_split(src, pool, 0)
        stage = assemble(method, cfg, src, split, seed=0)
        volumes = [src.load(case) for case in src.cases("train")]  # for the inference throughput
    module, sampler = stage.module, stage.sampler
    module.to(device)
    set_memory_format(module, cfg.train.channels_last)
    opt = build_optimizer(module.parameters(), cfg.optim)
    sched = build_scheduler(opt, warmup + steps, cfg.optim)
    flops = step_flops(module, to_device(sampler.batch(0), device, cfg.train.channels_last), precision == "bf16")
    workers = resolve_workers(cfg.data.workers, device)
    source = Prefetcher(sampler.batch, 0, (warmup + steps) * cfg.train.accumulate, workers)
    runner = StepRunner(module, source, opt, sched, cfg.train, device)
    module.train()
    step_times, data_times = [], []
    try:
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            result = runner(i, i / (warmup + steps))
            if i >= warmup:
                step_times.append(time.perf_counter() - t0)
                data_times.append(result.data_seconds)
    finally:
        source.close()
    med = statistics.median(step_times)
    return {
        "config": f"default-{spatial_dims}d", "method": method, "patch": list(cfg.data.patch_size),
        "batch": cfg.data.batch_size, "precision": precision, "channels_last": cfg.train.channels_last,
        "compile": cfg.train.compile, "compiled": runner.compiled,
        "seconds_per_step": med, "samples_per_second": cfg.data.batch_size / med,
        "data_fraction": sum(data_times) / sum(step_times), "data_workers": workers,
        "flops_per_step": flops, "achieved_flops": flops / med,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "eval_volumes_per_second": eval_throughput(module.net, cfg, volumes, src.class_names, device),
        "keeps_freed_memory": keep_freed_memory(),
    }


def eval_throughput(net: torch.nn.Module, cfg, volumes, class_names, device, rounds: int = 3) -> float:
    """Volumes per second of whole-volume inference as ``evaluate`` / ``predict`` run it (slice-wise or sliding
    window, on a copy of ``net`` prepared as :func:`load_model` prepares it): the fastest of
    ``rounds`` passes over ``volumes``, after one warm-up volume. ``net`` itself is left as it was."""
    import copy

    from frugalseg.eval.inference import TrainedModel, prepare_for_inference, segment

    folded = prepare_for_inference(copy.deepcopy(net))
    model = TrainedModel(folded, cfg, list(class_names), volumes[0].image.shape[0], device)
    segment(model, volumes[0])  # warm-up
    best = math.inf
    for _ in range(rounds):
        t0 = time.perf_counter()
        for vol in volumes:
            segment(model, vol)
        best = min(best, time.perf_counter() - t0)
    return len(volumes) / best


def _in_fresh_process(fn, *args):
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def _peak_job(threads: int, precisions: tuple[str, ...]) -> dict:
    from frugalseg.engine.repro import set_threads

    set_threads(threads)
    return measure_peak(precisions)


def peak_precisions(rows: list[dict], native: bool) -> tuple[str, ...]:
    """The precisions whose roof a profile needs: fp32, each precision a row ran in, and bf16 where the hardware
    runs it (so the last line can say what bf16 would give)."""
    used = {"fp32", *(r.get("precision", "fp32") for r in rows)} | ({"bf16"} if native else set())
    return tuple(p for p in ("fp32", "bf16") if p in used)


def profile_all(steps: int = 8, methods: list[str] | None = None, dims: tuple[int, ...] = (2, 3),
                progress=None, sets: list[str] | None = None) -> dict:
    """Profile every registered method (or ``methods``) in the default 2-D and 3-D configs, plus the peak.

    ``sets`` are ``--set`` overrides applied to every config (e.g. ``train.precision=bf16``). Each row's share of
    the peak is against the peak of the precision it ran in and of its dimensionality.
    """
    from frugalseg.engine.repro import set_threads
    from frugalseg.errors import UserError
    from frugalseg.registry import METHODS, method_spec

    threads = set_threads(0)
    runs, run_dims = [], []
    for method in methods or list(METHODS):
        for d in dims:
            if d not in method_spec(method, None, "--methods").spatial_dims:
                continue
            if progress is not None:
                progress(f"profiling {method} {d}-D")
            try:
                runs.append(_in_fresh_process(profile_config, d, method, steps, 2, sets, threads))
            except UserError as exc:  # e.g. a diverged step: the row says so, the other rows are still measured
                runs.append({"config": f"default-{d}d", "method": method, "error": str(exc)})
                if progress is not None:
                    progress(f"  {method} {d}-D failed: {exc}")
            except Exception as exc:  # a fault of frugalseg or PyTorch in one config: kept, with its traceback
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                runs.append({"config": f"default-{d}d", "method": method, "error": f"{type(exc).__name__}: {first}",
                             "unexpected": True})
                if progress is not None:
                    remote = str(exc.__cause__ or "").strip()  # the worker process's traceback
                    progress(f"  {method} {d}-D failed unexpectedly (please report it): {type(exc).__name__}: "
                             f"{first}" + (f"\n{remote}" if remote else ""))
            run_dims.append(d)
    if progress is not None:
        progress("measuring the convolution peak")
    peak = _in_fresh_process(_peak_job, threads, peak_precisions(runs, native_bf16()))
    for row, d in zip(runs, run_dims):
        if "error" in row:
            continue
        roof = peak.get(f"conv{d}d_{row.get('precision', 'fp32')}_flops", peak["peak_flops"])
        row["fraction_of_peak"] = row["achieved_flops"] / roof
    return {"threads": threads, "torch": torch.__version__, "set": list(sets or []), "peak": peak, "runs": runs}


def read_baseline(path: Path) -> dict:
    """A profile written earlier by ``frugalseg profile --out`` (what ``--against`` compares with), checked."""
    import json

    from frugalseg.errors import UserError

    try:
        data = json.loads(Path(path).read_text())
        runs = data["runs"]
        sets = data.get("set") or []
        if not (isinstance(sets, list) and all(isinstance(x, str) for x in sets)):
            raise ValueError
        for r in runs:
            if "error" in r and isinstance(r["method"], str) and isinstance(r["config"], str):
                continue  # a row that failed in that profile
            if not (isinstance(r["method"], str) and isinstance(r["config"], str)
                    and 0 < float(r["seconds_per_step"]) < math.inf
                    and 0 <= float(r.get("eval_volumes_per_second") or 0) < math.inf):
                raise ValueError
    except OSError as exc:
        raise UserError(f"--against {path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"--against {path}: not a profile written by frugalseg profile --out") from None
    return data


def compare(result: dict, baseline: dict, name: str) -> dict:
    """``result`` with, on every row the ``baseline`` profile also has (same method and config), ``speedup`` (the
    baseline's seconds per step over this one's) and ``eval_speedup`` (this one's evaluation volumes/s over the
    baseline's, where both were measured)."""
    before = {(r["method"], r["config"]): r for r in baseline["runs"] if "error" not in r}
    runs = []
    for r in result["runs"]:
        r = dict(r)
        b = before.get((r["method"], r["config"]))
        if b is not None and "error" not in r:
            r["speedup"] = float(b["seconds_per_step"]) / r["seconds_per_step"]
            ev, ev_b = r.get("eval_volumes_per_second"), b.get("eval_volumes_per_second")
            if ev and ev_b:
                r["eval_speedup"] = ev / float(ev_b)
        runs.append(r)
    return {**result, "runs": runs, "against": {"file": name, "set": list(baseline.get("set") or [])}}


def format_table(result: dict) -> str:
    """The profile as a fixed-width table (what ``frugalseg profile`` prints); with a baseline (``--against``) two
    more columns: step and evaluation speed-up over it."""
    against = "against" in result
    head = (f"{'method':<14} {'config':<11} {'patch':<12} {'batch':>5} {'prec':>4} {'s/step':>7} {'samples/s':>9} "
            f"{'data %':>6} {'GFLOP/s':>8} {'% peak':>6} {'RSS MB':>7} {'eval vol/s':>10}")
    if against:
        head += f" {'x step':>6} {'x eval':>6}"
    lines = [head, "-" * len(head)]
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"{r['method']:<14} {r['config']:<11} failed: {r['error']}")
            continue
        line = (
            f"{r['method']:<14} {r['config']:<11} {'x'.join(map(str, r['patch'])):<12} {r['batch']:>5} "
            f"{r.get('precision', 'fp32'):>4} {r['seconds_per_step']:>7.3f} {r['samples_per_second']:>9.1f} "
            f"{100 * r['data_fraction']:>6.1f} {r['achieved_flops'] / 1e9:>8.0f} {100 * r['fraction_of_peak']:>6.0f} "
            f"{r['peak_rss_mb']:>7.0f} {r.get('eval_volumes_per_second', float('nan')):>10.2f}")
        if against:
            line += "".join(f" {r[k]:>6.2f}" if k in r else f" {'-':>6}" for k in ("speedup", "eval_speedup"))
        lines.append(line)
    p = result["peak"]
    if result.get("set"):
        lines.append("--set " + " ".join(result["set"]))
    workers = sorted({r.get("data_workers", 0) for r in result["runs"] if "error" not in r})
    if any(workers):
        lines.append(f"data %: waiting for batches made ahead by background workers (data.workers = "
                     f"{', '.join(map(str, workers))})")
    eager = [f"{r['method']} {r['config'].removeprefix('default-')}" for r in result["runs"]
             if r.get("compile") and not r.get("compiled")]
    if eager:
        lines.append(f"trained eagerly although train.compile is set (the step calls the network's parts, or "
                     f"compilation is unavailable): {', '.join(eager)}")
    if against:
        a = result["against"]
        lines.append(f"x step, x eval: speed-up over {a['file']}" + (f" (--set {' '.join(a['set'])})" if a["set"]
                                                                       else "") + "; - = not in it")
    lines.append("")
    def roof(key: str) -> str:
        return f"{p[key] / 1e9:.0f}" if key in p else "-"

    lines.append(
        f"peak (3x3 conv, channels-last, {result['threads']} threads): "
        f"2-D fp32 {roof('conv2d_fp32_flops')}, bf16 {roof('conv2d_bf16_flops')}; "
        f"3-D fp32 {roof('conv3d_fp32_flops')}, bf16 {roof('conv3d_bf16_flops')} GFLOP/s"
        + ("" if "conv2d_bf16_flops" in p else " (bf16 not measured: no bf16 row, none in hardware)")
        + f"; bf16 in hardware: {'yes' if p['native_bf16'] else 'no'}; torch {result['torch']}")
    return "\n".join(lines)
