"""Training batches made ahead of the step that uses them, in background processes (``data.workers``).

A batch depends only on its index (:mod:`frugalseg.data.sampling`), so making it in another process changes
nothing but when it is made: a run with workers equals one without, and a resumed run starts its workers at the
step it resumes from. Each worker computes with one thread (the training step keeps the process's threads), and
its batches reach the training process through shared memory.
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import sys
from collections.abc import Callable

import torch
import torch.multiprocessing as mp

Batch = dict[str, torch.Tensor]
POLL_SECONDS = 1.0  # how often a waiting side checks that the other one is still there


def resolve_workers(value: int | str, device: torch.device, cores: int | None = None) -> int:
    """``data.workers``: a number as given; ``auto`` = 1 where a core would otherwise idle - training on a GPU,
    or with fewer training threads than this process's cores - and 0 where the training threads use every core
    (measured on 2 cores: a worker then takes as much time from the step as it saves)."""
    if value != "auto":
        return int(value)
    if device.type == "cuda":
        return 1
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
    return 1 if torch.get_num_threads() < cores else 0


class WorkerLost(RuntimeError):
    """A background worker stopped without delivering its batch (killed, out of memory, ...)."""


class Prefetcher:
    """``batch_fn`` for the indices ``start, start + 1, ..., stop - 1``, asked for in that order, made by
    ``workers`` background processes (worker ``w`` makes every ``workers``-th index), each up to ``depth`` batches
    ahead of its use.

    Any other index is made in the calling process, so a caller may ask in any order. If a worker fails, the
    batch is made again here: an error in the batch itself is then raised as the sampler raises it, and
    anything else (a worker killed) is said once through ``notify`` and the run goes on without workers.
    ``workers=0`` makes every batch here.
    """

    def __init__(self, batch_fn: Callable[[int], Batch], start: int, stop: int, workers: int = 1, depth: int = 2,
                 notify: Callable[[str], None] | None = None) -> None:
        self.batch_fn, self.notify = batch_fn, notify
        self.start, self.stop, self.next = start, stop, start
        self._procs: list = []
        self._queues: list = []
        self._stop_event = None
        if workers > 0 and stop > start:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            self._stop_event = ctx.Event()
            try:
                n = min(workers, stop - start)
                for w in range(n):
                    q = ctx.Queue(maxsize=depth)
                    proc = ctx.Process(target=_work, args=(batch_fn, range(start + w, stop, n), q,
                                                           self._stop_event, os.getpid()), daemon=True)
                    self._queues.append(q)
                    proc.start()
                    self._procs.append(proc)
            except (AssertionError, OSError, pickle.PicklingError, AttributeError, TypeError) as exc:
                # a daemonic process may not start children, no process left, a sampler that cannot be sent
                self.close()
                self._say(f"cannot start one: {type(exc).__name__}: {exc}")

    def __call__(self, index: int) -> Batch:
        if not self._procs or index != self.next or index >= self.stop:
            return self.batch_fn(index)
        self.next += 1
        try:
            got, batch, error = self._get((index - self.start) % len(self._procs))
            if got != index:
                raise WorkerLost(f"worker delivered batch {got} for {index}")
        except WorkerLost as exc:
            self.close()
            batch = self.batch_fn(index)
            self._say(str(exc))
            return batch
        if error is not None:
            self.close()
            batch = self.batch_fn(index)  # the sampler's own error, raised here as it would be without workers
            self._say(error)  # it failed only in the worker
        return batch

    def _get(self, w: int):
        while True:
            try:
                return self._queues[w].get(timeout=POLL_SECONDS)
            except queue.Empty:
                if not self._procs[w].is_alive():
                    raise WorkerLost(f"it stopped with exit code {self._procs[w].exitcode}") from None
            except (OSError, EOFError, RuntimeError) as exc:  # a torn message, its shared memory gone
                raise WorkerLost(f"{type(exc).__name__}: {exc}") from None

    def _say(self, reason: str) -> None:
        if self.notify is not None:
            self.notify(f"data.workers: a background worker failed ({reason.splitlines()[0][:160]}); making "
                        "batches in the training process from here on")

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        procs, self._procs = self._procs, []
        queues, self._queues = self._queues, []
        if self._stop_event is not None:
            self._stop_event.set()
        for proc in procs:
            proc.join(timeout=2 * POLL_SECONDS)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for q in queues:
            q.cancel_join_thread()
            q.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the workers are daemons and go with the process
            pass


def _work(batch_fn: Callable[[int], Batch], indices: range, out, stop_event, parent: int) -> None:
    """A worker: make each batch of ``indices`` and hand it over; then wait to be stopped (the training process
    may still be reading the last batches' shared memory from this one)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's to handle; it stops us
    _die_with_parent()
    torch.set_num_threads(1)
    if hasattr(os, "nice"):
        os.nice(19)  # the training step's threads come first: the worker uses the cores when they would idle

    out.cancel_join_thread()  # stopped while a batch is still in the pipe, do not wait for it to drain

    def gone() -> bool:
        return stop_event.is_set() or os.getppid() != parent

    for i in indices:
        try:
            item = (i, batch_fn(i), None)
        except Exception as exc:  # reported with its type; the training process makes the batch again
            item = (i, None, f"{type(exc).__name__}: {exc}")
        while True:
            if gone():
                return
            try:
                out.put(item, timeout=POLL_SECONDS)
                break
            except queue.Full:
                continue
        if item[2] is not None:
            break
    while not gone():
        stop_event.wait(POLL_SECONDS)


def _die_with_parent() -> None:
    """On Linux, have the kernel end this worker when the training process ends, however it ends (SIGKILL
    included); elsewhere the worker notices within a second (``os.getppid`` changes)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
