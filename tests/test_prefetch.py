"""Batches made ahead in background processes (``data.workers``) are the batches the training process makes."""

from __future__ import annotations

import os

import pytest
import torch

from frugalseg.assemble import assemble
from frugalseg.config import build_config
from frugalseg.data.augment import sample_mean
from frugalseg.data.prefetch import Prefetcher, resolve_workers
from frugalseg.data.readers import open_source
from frugalseg.data.splits import few_label_split, pretrain_split
from frugalseg.engine.optim import build_optimizer, build_scheduler
from frugalseg.engine.trainer import fit
from frugalseg.errors import UserError
from frugalseg.methods.base import PRETRAIN

SMALL = ["model.channels=[8,16,32]", "data.batch_size=4"]


def _sampler(method: str, data, dims: int, sets: list[str]):
    cfg = build_config(dims, None, sets, method=method)
    src = open_source(data)
    probe = assemble(method, cfg, src)
    split = pretrain_split(src) if probe.spec.kind == PRETRAIN else few_label_split(src, len(src.labelled_pool), 0)
    return cfg, assemble(method, cfg, src, split, seed=0)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


ONE = ["data.batch_size=1"]  # one sample per batch: a per-sample mean is a whole-tensor reduction


@pytest.mark.parametrize("method,dims,sets", [
    ("supervised", 2, []), ("supervised", 3, []), ("bcp", 2, []), ("unimatch", 3, []), ("gcl", 2, []),
    ("lcl", 2, []), ("pcrlv2", 2, []), ("pcrlv2", 3, []), ("voco", 3, []),
    ("supervised", 3, ONE + ["data.patch_size=[64,64,64]"]), ("unimatch", 2, ONE + ["data.patch_size=[256,256]"]),
])
def test_a_worker_makes_bit_for_bit_the_batches_of_the_training_process(phantoms_2d, phantoms_3d, method, dims,
                                                                         sets):
    # the training process computes with 2 threads, a worker with 1: a reduction whose work is split between
    # threads (a mean over one large sample, a grouped convolution) would differ in its last bits
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _, stage = _sampler(method, phantoms_2d if dims == 2 else phantoms_3d, dims, sets or ["data.batch_size=4"])
        ref = [stage.sampler.batch(k) for k in (3, 4, 5)]
        pf = Prefetcher(stage.sampler.batch, 3, 6, workers=1)
        got = [pf(k) for k in (3, 4, 5)]
        pf.close()
    finally:
        torch.set_num_threads(threads)
    for k, (a, b) in enumerate(zip(ref, got)):
        assert _equal(a, b), f"{method} {dims}-D batch {3 + k} differs when made by a worker"


def test_sample_mean_is_the_mean_and_does_not_depend_on_the_threads():
    x = torch.randn(2, 1, 64, 64, 64) * 3 + 1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sample_mean(x)
        torch.set_num_threads(2)
        two = sample_mean(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    torch.testing.assert_close(one, x.double().reshape(2, -1).mean(1).float(), rtol=0, atol=1e-6)


def test_auto_workers_only_where_a_core_would_idle():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert resolve_workers("auto", torch.device("cpu"), cores=2) == 0  # the step's threads use every core
        assert resolve_workers("auto", torch.device("cpu"), cores=4) == 1
        assert resolve_workers("auto", torch.device("cuda"), cores=2) == 1  # the CPU waits on the GPU
        assert resolve_workers(3, torch.device("cpu"), cores=2) == 3
    finally:
        torch.set_num_threads(threads)


def _counting(calls: list):
    def batch(i: int) -> dict:
        calls.append((os.getpid(), i))
        return {"x": torch.full((2, 3), float(i))}
    return batch


def test_indices_in_order_come_from_the_worker_others_from_the_caller():
    calls: list = []
    pf = Prefetcher(_counting(calls), 10, 14, workers=1)
    assert float(pf(10)["x"][0, 0]) == 10.0
    assert float(pf(7)["x"][0, 0]) == 7.0  # out of the sequence: made here, the sequence is not disturbed
    assert [float(pf(i)["x"][0, 0]) for i in (11, 12, 13)] == [11.0, 12.0, 13.0]
    assert float(pf(14)["x"][0, 0]) == 14.0  # past the end: made here
    pf.close()
    here = [i for pid, i in calls if pid == os.getpid()]
    assert here == [7, 14]  # the rest were made (and counted) in the worker, not here


def test_an_error_in_a_batch_is_raised_as_the_sampler_raises_it():
    def batch(i: int) -> dict:
        if i == 2:
            raise UserError("case_007.nii.gz: image and label shapes differ")
        return {"x": torch.zeros(1)}

    pf = Prefetcher(batch, 0, 5, workers=1)
    pf(0)
    pf(1)
    with pytest.raises(UserError, match=r"^case_007.nii.gz: image and label shapes differ$"):
        pf(2)
    pf.close()


def test_a_dead_worker_is_said_once_and_the_batches_go_on():
    parent = os.getpid()

    def batch(i: int) -> dict:
        if i == 3 and os.getpid() != parent:
            os._exit(1)  # the worker dies (as if killed), not the batch
        return {"x": torch.full((1,), float(i))}

    said: list[str] = []
    pf = Prefetcher(batch, 0, 6, workers=1, notify=said.append)
    assert [float(pf(i)["x"]) for i in range(6)] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    pf.close()
    assert len(said) == 1 and said[0].startswith("data.workers: a background worker failed")


def test_two_workers_share_the_indices_and_more_workers_than_batches_are_not_started():
    calls: list = []
    pf = Prefetcher(_counting(calls), 0, 7, workers=2)
    assert [float(pf(i)["x"][0, 0]) for i in range(7)] == [float(i) for i in range(7)]
    pf.close()
    pf = Prefetcher(_counting(calls), 0, 2, workers=5)
    assert len(pf._procs) == 2
    assert [float(pf(i)["x"][0, 0]) for i in range(2)] == [0.0, 1.0]
    pf.close()
    assert calls == []  # every batch came from a worker


def _inside_a_daemon(out) -> None:
    said: list[str] = []
    pf = Prefetcher(lambda i: {"x": torch.full((1,), float(i))}, 0, 3, workers=1, notify=said.append)
    out.put(([float(pf(i)["x"]) for i in range(3)], said))


def test_where_no_worker_can_start_it_is_said_and_the_batches_come_anyway():
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    proc = ctx.Process(target=_inside_a_daemon, args=(out,), daemon=True)  # a daemon may not start children
    proc.start()
    values, said = out.get(timeout=60)
    proc.join(timeout=10)
    assert values == [0.0, 1.0, 2.0]
    assert len(said) == 1 and "cannot start one" in said[0]


def test_a_killed_run_leaves_no_lock_held_by_its_worker(tmp_path):
    import signal
    import subprocess
    import sys

    from frugalseg.files import FolderLock

    script = (
        "import sys, time, torch\n"
        "from frugalseg.files import FolderLock\n"
        "from frugalseg.data.prefetch import Prefetcher\n"
        f"lock = FolderLock({str(tmp_path / 'run')!r})\n"
        "pf = Prefetcher(lambda i: {'x': torch.zeros(1)}, 0, 100, workers=1)\n"
        "pf(0)\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    FolderLock(tmp_path / "run").release()  # at once: the worker, still alive for a moment, holds no lock


def _fit(phantoms, out, workers: int, interrupt_at: int = 0, resume: bool = False):
    torch.manual_seed(0)  # the network's initial weights
    cfg, stage = _sampler("mean_teacher", phantoms, 2, SMALL + ["data.patch_size=[32,32]", "train.steps=6",
                                                               "train.checkpoint_every=3", "optim.warmup_steps=2"])
    validate = None
    if interrupt_at:  # stopped (as by Ctrl-C) at step interrupt_at, after the checkpoint at step 3
        cfg.train.val_every = interrupt_at

        def validate():
            raise KeyboardInterrupt
    module = stage.module
    opt = build_optimizer(module.parameters(), cfg.optim)
    sched = build_scheduler(opt, cfg.train.steps, cfg.optim)
    fit(module, stage.sampler.batch, opt, sched, cfg.train, out, torch.device("cpu"), resume=resume,
        show_progress=False, workers=workers, validate=validate)
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_a_run_with_workers_and_resumed_equals_one_without(phantoms_2d, tmp_path):
    ref = _fit(phantoms_2d, tmp_path / "ref", workers=0)
    with pytest.raises(KeyboardInterrupt):
        _fit(phantoms_2d, tmp_path / "w", workers=1, interrupt_at=5)
    assert torch.load(tmp_path / "w" / "checkpoint.pt", weights_only=True)["step"] == 3
    got = _fit(phantoms_2d, tmp_path / "w", workers=1, resume=True)  # the workers start at step 3
    assert ref.keys() == got.keys() and any(k.startswith("teacher.") for k in ref)
    for key in ref:
        assert torch.equal(ref[key], got[key]), key


@pytest.mark.parametrize("value", ["-1", "many"])
def test_workers_must_be_auto_or_a_count(value):
    with pytest.raises(UserError, match="data.workers"):
        build_config(2, None, [f"data.workers={value}"])
