"""A training process killed with SIGKILL at a random step and resumed ends with the uninterrupted run's weights."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SETS = ["data.spatial_dims=2", "data.patch_size=[32,32]", "data.batch_size=4", "model.channels=[8,16,32]",
        "train.steps=12", "train.log_every=1", "train.checkpoint_every=2", "optim.warmup_steps=2",
        "train.num_threads=1", "train.deterministic=true"]


def _args(data: Path, method: str, out: Path) -> list[str]:
    args = [sys.executable, "-m", "frugalseg", "train", "--data", str(data), "--method", method, "--labelled", "2",
            "--out", str(out), "--quiet", "--keep-checkpoint"]
    for s in SETS:
        args += ["--set", s]
    return args


def _logged_step(run: Path) -> int:
    try:
        lines = (run / "log.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0  # a line being written


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("method", ["supervised", "mean_teacher", "unimatch", "bcp"])
def test_sigkill_at_a_random_step_then_resume_is_bitwise_equal(phantoms_2d, tmp_path, method):
    ref = subprocess.run(_args(phantoms_2d, method, tmp_path / "ref"), cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert ref.returncode == 0, ref.stderr
    kill_at = random.Random().randint(3, 9)
    run = tmp_path / "killed"
    proc = subprocess.Popen(_args(phantoms_2d, method, run), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and _logged_step(run) < kill_at and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (run / "model.pt").exists(), f"the run finished before the kill at step {kill_at}"
    resumed = subprocess.run(_args(phantoms_2d, method, run) + ["--resume"], cwd=REPO, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)["method"]
    b = torch.load(run / "checkpoint.pt", weights_only=True)["method"]
    assert a.keys() == b.keys()
    if method in ("mean_teacher", "bcp"):
        assert any(k.startswith("teacher.") for k in a)  # the EMA teacher is part of what must match
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after SIGKILL at step {kill_at} + --resume"
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # every step logged once


def test_benchmark_sigkilled_mid_cell_then_rerun_equals_uninterrupted(phantoms_2d, tmp_path):
    args = [sys.executable, "-m", "frugalseg", "benchmark", "--data", str(phantoms_2d), "--recipes", "mean-teacher",
            "--labeled", "1,2", "--seeds", "0"]
    for s in SETS:
        args += ["--set", s]
    ref = subprocess.run([*args, "--out", str(tmp_path / "ref")], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    cell = out / "runs" / "mean-teacher" / "n2_s0"  # the second cell: the first one finishes before the kill
    kill_at = random.Random().randint(3, 9)
    proc = subprocess.Popen([*args, "--out", str(out)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and _logged_step(cell) < kill_at and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (out / "runs" / "mean-teacher" / "n1_s0" / "cell.json").is_file()
    assert not (cell / "cell.json").exists(), f"the cell finished before the kill at step {kill_at}"
    again = subprocess.run([*args, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    a = (tmp_path / "ref" / "results.csv").read_text().splitlines()
    b = (out / "results.csv").read_text().splitlines()
    assert [r.split(",")[:5] for r in a] == [r.split(",")[:5] for r in b]  # recipe, N, seed, split, Dice
    wa = torch.load(tmp_path / "ref" / "runs" / "mean-teacher" / "n2_s0" / "model.pt", weights_only=True)["network"]
    wb = torch.load(cell / "model.pt", weights_only=True)["network"]
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
