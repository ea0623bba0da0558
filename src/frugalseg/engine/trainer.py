"""The one training loop. It knows nothing about any method: it calls ``training_step`` and steps the optimiser.

Pre-training, supervised, semi-supervised training and fine-tuning all run through :func:`fit`.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from frugalseg.config import TrainConfig
from frugalseg.data.prefetch import Prefetcher
from frugalseg.engine import distributed as dist
from frugalseg.engine.tracking import RunLog
from frugalseg.errors import UserError
from frugalseg.files import load_checkpoint, save_atomic
from frugalseg.hardware import resolve_precision

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"  # the checkpoint before the last one, kept in case the last is damaged
BEST = "best.pt"  # the network's weights at its best validation score (train.keep=best)


def has_checkpoint(run_dir: Path) -> bool:
    return (Path(run_dir) / CHECKPOINT).is_file() or (Path(run_dir) / PREVIOUS).is_file()


def resume_state(run_dir: Path, notify: Callable[[str], None] | None = None) -> dict | None:
    """The state to resume from: ``checkpoint.pt``, or the previous one when the last is unreadable (said in one
    line through ``notify``); ``None`` when the run never checkpointed."""
    ckpt, prev = Path(run_dir) / CHECKPOINT, Path(run_dir) / PREVIOUS
    if ckpt.is_file():
        try:
            return load_checkpoint(ckpt)
        except UserError as exc:
            if not prev.is_file():
                raise
            state = load_checkpoint(prev)
            os.replace(ckpt, ckpt.with_name("checkpoint.damaged.pt"))  # kept for inspection, never reused
            if notify is not None:
                notify(f"{exc}; resuming from {prev.name} (step {int(state['step'])})")
            return state
    return load_checkpoint(prev) if prev.is_file() else None


@dataclass
class FitResult:
    steps: int
    seconds: float
    last_loss: float
    compiled: bool = False  # the network ran compiled (train.compile, where it applies and compilation is available)


def to_device(batch: dict[str, torch.Tensor], device: torch.device, channels_last: bool) -> dict:
    out = {}
    for key, value in batch.items():
        value = value.to(device, non_blocking=True)
        if channels_last and value.is_floating_point() and value.dim() in (4, 5):
            fmt = torch.channels_last if value.dim() == 4 else torch.channels_last_3d
            value = value.contiguous(memory_format=fmt)
        out[key] = value
    return out


def set_memory_format(method: nn.Module, channels_last: bool) -> None:
    if not channels_last:
        return
    dims = method.net.spatial_dims
    method.to(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)


class _Stepper(nn.Module):
    """``forward`` = the method's training step, so that DistributedDataParallel can wrap any method."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, batch: dict[str, torch.Tensor], progress: float):
        out = self.method.training_step(batch, progress)
        return out.loss, out.logs


@dataclass
class StepResult:
    loss: float
    logs: dict[str, float]
    data_seconds: float


class StepRunner:
    """One optimiser step of ``method`` exactly as :func:`fit` runs it (and as ``frugalseg profile`` times it):
    batches (accumulated), autocast, backward, clipping, optimiser and scheduler steps, then the method's
    ``after_optimizer_step``. The method must already be on ``device`` in its memory format."""

    def __init__(self, method: nn.Module, batches: Callable[[int], dict[str, torch.Tensor]],
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 cfg: TrainConfig, device: torch.device, notify: Callable[[str], None] | None = None) -> None:
        self.method, self.batches, self.optimizer, self.scheduler = method, batches, optimizer, scheduler
        self.cfg, self.device = cfg, device
        self.engine: nn.Module = _Stepper(method)
        if dist.active():
            from torch.nn.parallel import DistributedDataParallel

            _agree_on_strides(method)
            # under bf16 autocast some such gradients come out in the other spelling (a 1x1x1 head's in channels-last
            # strides): the same memory layout, so the warning - for a weight with a size-1 dimension - is dropped
            warnings.filterwarnings("ignore", message=r"(?s)Grad strides do not match bucket view strides.*"
                                                      r"grad\.sizes\(\) = \[([0-9]+, )*1[],]")
            # BatchNorm statistics are already global; buffers (EMA teachers, queues) are broadcast from rank 0
            self.engine = DistributedDataParallel(self.engine,
                                                  device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=method.spec.partial_graph)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.precision = resolve_precision(cfg.precision, device)
        self.compiled = cfg.compile and _compilable(method, notify) and compile_network(method.net, notify)

    def autocast(self):
        return (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16"
                else contextlib.nullcontext())

    def __call__(self, step: int, progress: float) -> StepResult:
        return self.compiled_call(self._step, step, progress)

    def compiled_call(self, fn: Callable, *args):  # noqa: ANN201
        """``fn(*args)``; with a compiled network, a failure to compile (lazy: in the forward or the backward of a
        training step, or in the eval-mode forward of a validation) ends the run as one line, not a traceback."""
        if not self.compiled:
            return fn(*args)
        from torch._dynamo.exc import TorchDynamoException  # inductor's errors derive from it

        try:
            return fn(*args)
        except TorchDynamoException as exc:
            cause = getattr(exc, "inner_exception", None) or exc  # the compiler's own error, not dynamo's wrapper
            first = (str(cause).strip().splitlines() or [""])[0][:160]
            raise UserError(f"train.compile: PyTorch could not compile this network ({type(cause).__name__}: "
                            f"{first}); run it without compilation (--set train.compile=false)") from exc

    def _step(self, step: int, progress: float) -> StepResult:
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        data_time = 0.0
        for micro in range(cfg.accumulate):
            t_data = time.perf_counter()
            batch = to_device(dist.shard(self.batches(step * cfg.accumulate + micro)), self.device,
                              cfg.channels_last)
            data_time += time.perf_counter() - t_data
            sync = (micro == cfg.accumulate - 1 or not dist.active())
            with contextlib.nullcontext() if sync else self.engine.no_sync():
                with self.autocast():
                    loss, logs = self.engine(batch, progress)
                loss = loss.float()
                if not torch.isfinite(loss):
                    raise UserError(f"training diverged: loss is {loss.item()} at step {step}; "
                                    "lower optim.lr or check the input normalisation")
                (loss / cfg.accumulate).backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.method.after_optimizer_step(progress)
        return StepResult(loss.item(), {k: float(v) for k, v in logs.items()}, data_time)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _net_state(method: nn.Module) -> dict[str, torch.Tensor]:
    """The kept network's weights, on the CPU, in the default memory layout."""
    return {k: v.detach().cpu().contiguous() for k, v in method.net.state_dict().items()}


def compile_network(net: nn.Module, notify: Callable[[str], None] | None = None) -> bool:
    """Compile ``net``'s forward in place (``nn.Module.compile``: the parameters and the state dict are the
    network's own). Returns whether it did: where a tiny probe does not compile (no C compiler, ...) the network
    stays eager and ``notify`` hears why.

    What earlier compilations in this process left behind is dropped first: dynamo keys its cache on the code, not
    on the network, so a second run of the same network code (a benchmark's next cell) would otherwise find its
    shapes changed and compile them as symbolic ones, which inductor fails on for some convolutions."""
    torch._dynamo.reset()
    try:
        probe = torch.compile(lambda x: torch.relu(x) * 2)
        probe(torch.ones(2))
    except Exception as exc:  # inductor's failures come in many types
        if notify is not None:
            notify(f"train.compile: compilation is unavailable here ({type(exc).__name__}); training eagerly")
        return False
    net.compile()
    return True


def _compilable(method: nn.Module, notify: Callable[[str], None] | None) -> bool:
    """Whether ``train.compile`` can compile ``method``'s network: not where its step calls the network's parts
    (``MethodSpec.network_parts``), which the compiled forward would not cover and whose BatchNorms, run compiled
    and eagerly in one step, break the backward."""
    if not method.spec.network_parts:
        return True
    if notify is not None:
        notify(f"train.compile: {type(method).__name__} calls the network's encoder and decoder apart, which "
               "compiling the network does not cover; training eagerly")
    return False


def _agree_on_strides(method: nn.Module) -> None:
    """Give the default strides to parameters that are contiguous but spelled otherwise.

    A weight with a dimension of size 1 (a 1x1(x1) kernel, a convolution of a one-channel image) has, in channels-
    last memory, strides such as ``(27, 1, 9, 3, 1)`` while its gradient comes out as ``(27, 27, 9, 3, 1)`` — the
    same layout: strides of size-1 dimensions are never used —, and DistributedDataParallel, whose gradient buckets
    follow the parameter's strides, warns on every rank. The values and the computation are unchanged.
    """
    with torch.no_grad():
        for p in method.parameters():
            default = torch.empty(p.shape, dtype=p.dtype, device=p.device)
            if p.is_contiguous() and p.stride() != default.stride():
                p.data = default.copy_(p.data)


class _NoLog:
    def write(self, step: int, entry: dict) -> None:
        pass

    def close(self) -> None:
        pass


def fit(
    method: nn.Module,
    batches: Callable[[int], dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainConfig,
    run_dir: Path,
    device: torch.device,
    resume: bool = False,
    show_progress: bool = True,
    description: str = "train",
    notify: Callable[[str], None] | None = None,
    validate: Callable[[], dict[str, float]] | None = None,
    workers: int = 0,
) -> FitResult:
    """Train ``method`` for ``cfg.steps`` optimiser steps; ``batches(i)`` gives the i-th micro-batch.

    Checkpoints (method, optimiser, scheduler, RNG state, step) are written every ``cfg.checkpoint_every``
    steps and at the end to ``run_dir/checkpoint.pt``; with ``resume=True`` training continues from it, and
    because batches depend only on their index the result equals an uninterrupted run.

    With ``validate`` and ``cfg.val_every`` > 0, ``validate()`` (e.g. ``{"val_dice": ...}``) runs every
    ``val_every`` steps and at the end; its values are logged at that step and, with ``cfg.keep == "best"``, the
    network's weights at the best ``val_dice`` are kept in ``run_dir/best.pt``. Time spent validating is not
    counted as training time.

    With ``workers`` > 0 that many background processes make the batches ahead of their step
    (:class:`~frugalseg.data.prefetch.Prefetcher`); the batches, hence the run, are the same.

    Under ``torchrun`` (see :mod:`frugalseg.engine.distributed`) each rank trains on its shard of the same global
    batch inside DistributedDataParallel; rank 0 alone logs, shows progress, validates and writes checkpoints.
    """
    method.to(device)
    set_memory_format(method, cfg.channels_last)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / CHECKPOINT
    start, before = 0, 0.0  # steps and training seconds of the earlier invocations (up to their last checkpoint)
    best = -math.inf  # the best validation score so far (train.keep=best)
    state = resume_state(run_dir, notify) if resume else None
    if state is not None:
        try:
            method.load_state_dict(state["method"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise UserError(f"{ckpt_path}: incompatible checkpoint ({str(exc).splitlines()[0][:160]})") from None
        torch.set_rng_state(state["rng"])
        start = int(state["step"])
        before = float(state.get("seconds", 0.0))
        best = float(state.get("best_val", -math.inf))
    main = dist.is_main()
    log = RunLog(run_dir, resume_step=start if resume else None) if main else _NoLog()
    total = cfg.steps
    source = Prefetcher(batches, start * cfg.accumulate, total * cfg.accumulate, workers, notify=notify)
    try:
        runner = StepRunner(method, source, optimizer, scheduler, cfg, device, notify)
    except BaseException:
        source.close()
        raise
    t0, data_time, last_loss = time.perf_counter(), 0.0, float("nan")
    val_time = 0.0  # seconds spent validating (not training)
    validating = validate is not None and cfg.val_every > 0 and main
    window: dict[str, float] = {}
    n_window = 0
    bar = tqdm(range(start, total), initial=start, total=total, desc=description, dynamic_ncols=True,
               disable=None if show_progress and main else True, leave=False)  # None: off when not a terminal
    method.train()
    plain = show_progress and main and notify is not None and not sys.stderr.isatty()  # a log file, not a terminal
    try:
        for step in bar:
            result = runner(step, step / total)
            data_time += result.data_seconds
            last_loss = result.loss
            window["loss"] = window.get("loss", 0.0) + last_loss
            for key, value in result.logs.items():
                window[key] = window.get(key, 0.0) + value
            n_window += 1
            done = step + 1
            if done % cfg.log_every == 0 or done == total:
                elapsed = time.perf_counter() - t0 - val_time
                entry = dist.mean_across_ranks({k: v / n_window for k, v in window.items()})
                entry.update(lr=scheduler.get_last_lr()[0], seconds=before + elapsed,
                             data_fraction=data_time / max(elapsed, 1e-9))
                log.write(done, entry)
                bar.set_postfix(loss=f"{entry['loss']:.4f}")
                window, n_window = {}, 0
                if plain:
                    per_step = elapsed / max(done - start, 1)
                    notify(f"{description}: step {done}/{total}, loss {entry['loss']:.4f}, {per_step:.2f} s/step, "
                           f"ETA {_clock(per_step * (total - done))}")
            if validating and (done % cfg.val_every == 0 or done == total):
                t_val = time.perf_counter()
                scores = runner.compiled_call(validate)
                val_time += time.perf_counter() - t_val
                log.write(done, {**scores, "val_seconds": time.perf_counter() - t_val})
                if plain:
                    notify(f"{description}: step {done}/{total}, validation mean Dice {scores['val_dice']:.4f}")
                if cfg.keep == "best" and scores["val_dice"] > best:
                    best = scores["val_dice"]
                    save_atomic({"network": _net_state(method), "step": done, "val_dice": best}, run_dir / BEST)
            if (done % cfg.checkpoint_every == 0 or done == total) and main:
                if ckpt_path.exists():
                    os.replace(ckpt_path, run_dir / PREVIOUS)
                save_atomic({"method": method.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                             "step": done, "seconds": before + time.perf_counter() - t0 - val_time,
                             "best_val": best}, ckpt_path)
    finally:
        source.close()
        bar.close()
        log.close()
    dist.barrier()  # rank 0's last checkpoint is on disk before any rank moves on
    seconds = before + time.perf_counter() - t0 - val_time  # the whole run's training time, across resumes
    return FitResult(steps=total - start, seconds=seconds, last_loss=last_loss if math.isfinite(last_loss) else 0.0,
                     compiled=runner.compiled)
