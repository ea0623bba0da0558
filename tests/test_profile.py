"""The speed profile: FLOP counting against known values, the peak measurement, the table and the CLI."""

import json
import os
import platform
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from frugalseg import hardware
from frugalseg import profile as prof
from frugalseg.cli import app
from frugalseg.methods.base import StepOutput


class OneConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Conv2d(3, 5, 3, padding=1, bias=False)

    def training_step(self, batch, progress):
        return StepOutput(self.net(batch["image"]).square().mean())


def test_step_flops_counts_forward_and_backward_of_a_convolution():
    x = torch.randn(2, 3, 8, 8, requires_grad=False)
    forward = 2 * 2 * 8 * 8 * 3 * 5 * 9
    # backward: grad w.r.t. the weight only (the input needs none) = one more convolution's worth
    assert prof.step_flops(OneConv(), {"image": x}, bf16=False) == 2 * forward
    assert prof.step_flops(OneConv(), {"image": x.requires_grad_(True)}, bf16=False) == 3 * forward


def test_conv_throughput_is_flops_over_time(monkeypatch):
    ticks = iter(range(100))
    monkeypatch.setattr(prof.time, "perf_counter", lambda: next(ticks) * 0.5)  # every call takes 0.5 s
    flops = prof.conv_throughput((1, 2, 4, 4), 3, torch.float32, repeats=2)
    assert flops == pytest.approx(2 * 1 * 16 * 2 * 3 * 9 / 0.5)


def test_native_bf16_reads_cpu_flags(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert hardware.native_bf16()
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx512f"})
    assert not hardware.native_bf16()


def test_profile_cli_table_and_json(tmp_path, monkeypatch):
    fake_peak = {"conv2d_fp32_flops": 2e11, "conv2d_bf16_flops": 1e11, "conv3d_fp32_flops": 2e11,
                 "conv3d_bf16_flops": 1e11, "peak_flops": 2e11, "native_bf16": False}

    def fake_run(dims, method, steps, warmup, sets, threads):
        return {"config": f"default-{dims}d", "method": method, "patch": [8] * dims, "batch": 2, "precision": "fp32",
                "channels_last": True, "seconds_per_step": 0.5, "samples_per_second": 4.0, "data_fraction": 0.05,
                "flops_per_step": int(5e10), "achieved_flops": 1e11, "peak_rss_mb": 100.0}

    monkeypatch.setattr(prof, "_in_fresh_process", lambda fn, *a: fake_peak if fn is prof._peak_job else fake_run(*a))
    out = tmp_path / "p.json"
    result = CliRunner().invoke(app, ["profile", "--methods", "supervised", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["config"] for r in data["runs"]] == ["default-2d", "default-3d"]
    assert data["runs"][0]["fraction_of_peak"] == pytest.approx(0.5)
    assert "supervised" in result.output and "   50 " in result.output  # % of peak column
    again = CliRunner().invoke(app, ["profile", "--methods", "supervised", "--out", str(out)])
    assert again.exit_code == 2 and "exists (add --force" in again.output
    bad = CliRunner().invoke(app, ["profile", "--methods", "nope"])
    assert bad.exit_code == 2 and "--methods: unknown method 'nope'" in bad.output


def test_profile_cli_passes_set_to_every_config_and_rejects_a_bad_one(tmp_path, monkeypatch):
    fake_peak = {"conv2d_fp32_flops": 2e11, "conv2d_bf16_flops": 1e11, "conv3d_fp32_flops": 2e11,
                 "conv3d_bf16_flops": 1e11, "peak_flops": 2e11, "native_bf16": True}
    seen = []

    def fake_run(dims, method, steps, warmup, sets, threads):
        seen.append((dims, list(sets)))
        return {"config": f"default-{dims}d", "method": method, "patch": [8] * dims, "batch": 2, "precision": "bf16",
                "channels_last": True, "seconds_per_step": 0.5, "samples_per_second": 4.0, "data_fraction": 0.05,
                "flops_per_step": int(5e10), "achieved_flops": 1e11, "peak_rss_mb": 100.0}

    monkeypatch.setattr(prof, "_in_fresh_process", lambda fn, *a: fake_peak if fn is prof._peak_job else fake_run(*a))
    out = tmp_path / "p.json"
    ok = CliRunner().invoke(app, ["profile", "--methods", "supervised", "--set", "train.precision=bf16", "--out",
                                  str(out)])
    assert ok.exit_code == 0, ok.output
    assert seen == [(2, ["train.precision=bf16"]), (3, ["train.precision=bf16"])]
    assert json.loads(out.read_text())["set"] == ["train.precision=bf16"]
    assert "--set train.precision=bf16" in ok.output
    seen.clear()
    bad = CliRunner().invoke(app, ["profile", "--methods", "supervised", "--set", "train.nosuch=1"])
    assert bad.exit_code == 2 and "train.nosuch" in bad.output and "Traceback" not in bad.output
    assert seen == []  # rejected before anything was profiled


def test_profile_config_runs_a_real_step():
    row = prof.profile_config(2, "supervised", steps=1, warmup=0,
                              sets=["data.batch_size=2", "model.channels=[4,8]", "data.patch_size=[32,32]"])
    assert row["flops_per_step"] > 0 and row["seconds_per_step"] > 0
    assert 0 <= row["data_fraction"] < 1


def test_profile_times_the_step_fit_runs_on_the_stage_a_run_assembles(monkeypatch):
    """The profiled step is the trainer's own (StepRunner), on the module ``train`` would build: with
    ``--set selfreg.weight`` it is the SelfReg-wrapped method."""
    from frugalseg.engine.trainer import StepRunner
    from frugalseg.methods.selfreg import SelfRegularised

    calls = {"runner": 0, "selfreg": 0}
    real_call, real_step = StepRunner.__call__, SelfRegularised.training_step

    def counting_call(self, step, progress):
        calls["runner"] += 1
        return real_call(self, step, progress)

    def counting_step(self, batch, progress):
        calls["selfreg"] += 1
        return real_step(self, batch, progress)

    monkeypatch.setattr(StepRunner, "__call__", counting_call)
    monkeypatch.setattr(SelfRegularised, "training_step", counting_step)
    tiny = ["data.batch_size=2", "model.channels=[4,8]", "data.patch_size=[32,32]"]
    prof.profile_config(2, "supervised", steps=2, warmup=1, sets=tiny)
    assert calls == {"runner": 3, "selfreg": 0}
    prof.profile_config(2, "supervised", steps=2, warmup=1, sets=[*tiny, "selfreg.weight=0.1"])
    assert calls["runner"] == 6 and calls["selfreg"] == 4  # 3 steps + the FLOP-counting pass


def test_precision_auto_follows_the_hardware_and_old_runs_read_as_what_they_meant(monkeypatch):
    from frugalseg.config import config_from_dict

    cpu = torch.device("cpu")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx512f"})
    assert hardware.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    assert hardware.resolve_precision("auto", cpu) == "bf16"
    assert hardware.resolve_precision("fp32", cpu) == "fp32" and hardware.resolve_precision("bf16", cpu) == "bf16"
    assert config_from_dict({"train": {"bf16": True}}).train.precision == "bf16"
    assert config_from_dict({"train": {"bf16": False, "steps": 5}}).train.precision == "fp32"


def test_a_run_records_its_precision_and_the_profile_row_its_roof(phantoms_2d, tmp_path, monkeypatch):
    import json

    from frugalseg.run import train

    # the default precision follows the hardware: bf16 where the CPU multiplies it, fp32 elsewhere
    for native in (False, True):
        monkeypatch.setattr(hardware, "native_bf16", lambda native=native: native)
        train(phantoms_2d, "supervised", 1, 0, tmp_path / f"r{native}", show_progress=False,
              sets=["train.steps=1", "data.batch_size=2", "model.channels=[4,8]", "data.spatial_dims=2",
                    "data.patch_size=[32,32]"])
        ran = json.loads((tmp_path / f"r{native}" / "run.json").read_text())["precision"]
        assert ran == ("bf16" if native else "fp32")
    monkeypatch.undo()
    row = prof.profile_config(2, "supervised", steps=1, warmup=0,
                              sets=["data.batch_size=2", "model.channels=[4,8]", "data.patch_size=[32,32]"])
    assert row["precision"] == ("bf16" if hardware.native_bf16() else "fp32") and row["eval_volumes_per_second"] > 0


def test_evaluation_throughput_times_the_folded_network_evaluate_runs_and_leaves_the_trained_one(monkeypatch):
    from types import SimpleNamespace

    from frugalseg.config import build_config
    from frugalseg.eval import inference
    from frugalseg.registry import build_network

    cfg = build_config(2, None, [])
    net = build_network(cfg.model, 2, 1, 3).train()
    seen = []

    def fake_segment(model, vol):
        seen.append(model.net)
        return vol.image[0]

    monkeypatch.setattr(inference, "segment", fake_segment)
    vols = [SimpleNamespace(image=torch.zeros(1, 4, 8, 8).numpy())] * 2
    rate = prof.eval_throughput(net, cfg, vols, ["bg", "a", "b"], torch.device("cpu"), rounds=3)
    bn = torch.nn.modules.batchnorm._BatchNorm
    assert len(seen) == 1 + 3 * 2 and rate > 0  # one warm-up volume, then 3 rounds over both
    assert all(m is seen[0] and m is not net and not m.training for m in seen)
    assert not any(isinstance(m, bn) for m in seen[0].modules())  # folded, as load_model folds
    assert net.training and any(isinstance(m, bn) for m in net.modules())  # the trained network is untouched


def test_profile_against_an_earlier_profile_gives_the_speedup_per_method_and_config(tmp_path, monkeypatch):
    fake_peak = {"conv2d_fp32_flops": 2e11, "conv2d_bf16_flops": 1e11, "conv3d_fp32_flops": 2e11,
                 "conv3d_bf16_flops": 1e11, "peak_flops": 2e11, "native_bf16": False}
    calls = []

    def fake_run(dims, method, steps, warmup, sets, threads):
        calls.append(dims)
        return {"config": f"default-{dims}d", "method": method, "patch": [8] * dims, "batch": 2, "precision": "fp32",
                "channels_last": True, "seconds_per_step": 0.5, "samples_per_second": 4.0, "data_fraction": 0.05,
                "flops_per_step": int(5e10), "achieved_flops": 1e11, "peak_rss_mb": 100.0,
                "eval_volumes_per_second": 3.0}

    monkeypatch.setattr(prof, "_in_fresh_process", lambda fn, *a: fake_peak if fn is prof._peak_job else fake_run(*a))
    before = tmp_path / "before.json"  # only the 2-D row was profiled then: 1.6 s/step, 1.2 volumes/s
    before.write_text(json.dumps({"set": ["train.compile=false"], "runs": [
        {"method": "supervised", "config": "default-2d", "seconds_per_step": 1.6, "eval_volumes_per_second": 1.2},
        {"method": "bcp", "config": "default-2d", "seconds_per_step": 9.0}]}))
    out = tmp_path / "after.json"
    ok = CliRunner().invoke(app, ["profile", "--methods", "supervised", "--against", str(before), "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    rows = {r["config"]: r for r in json.loads(out.read_text())["runs"]}
    assert rows["default-2d"]["speedup"] == pytest.approx(3.2)  # 1.6 s -> 0.5 s
    assert rows["default-2d"]["eval_speedup"] == pytest.approx(2.5)  # 1.2 -> 3.0 volumes/s
    assert "speedup" not in rows["default-3d"]  # nothing to compare with
    line2d = next(x for x in ok.output.splitlines() if x.startswith("supervised") and "default-2d" in x)
    line3d = next(x for x in ok.output.splitlines() if x.startswith("supervised") and "default-3d" in x)
    assert line2d.split()[-2:] == ["3.20", "2.50"] and line3d.split()[-2:] == ["-", "-"]
    assert "--set train.compile=false" in ok.output
    calls.clear()
    for content in ("{not json", json.dumps({"runs": [{"method": "x"}]}), json.dumps([1, 2]),
                    json.dumps({"runs": [{"method": "supervised", "config": "default-2d", "seconds_per_step": 1,
                                          "eval_volumes_per_second": "fast"}]}),
                    json.dumps({"set": [3], "runs": []}), json.dumps({"set": "abc", "runs": []})):
        before.write_text(content)
        bad = CliRunner().invoke(app, ["profile", "--methods", "supervised", "--against", str(before)])
        assert bad.exit_code == 2 and "--against" in bad.output and "not a profile" in bad.output
        assert "Traceback" not in bad.output and len(bad.output.strip().splitlines()) == 1
    missing = CliRunner().invoke(app, ["profile", "--methods", "supervised", "--against", str(tmp_path / "no.json")])
    assert missing.exit_code == 2 and "cannot read" in missing.output
    assert calls == []  # refused before anything was profiled


def test_the_bf16_roof_is_measured_only_where_a_row_runs_bf16_or_the_hardware_has_it(monkeypatch):
    """On a CPU without bf16 instructions an emulated bf16 3-D convolution can take minutes on one core: a profile
    of fp32 rows does not measure it, and says so on its last line."""
    calls = []
    monkeypatch.setattr(prof, "conv_throughput", lambda shape, out, dtype, repeats=5: calls.append(dtype) or 1e11)
    peak = prof.measure_peak(("fp32",))
    assert calls == [torch.float32, torch.float32] and "conv2d_bf16_flops" not in peak
    assert prof.peak_precisions([{"precision": "fp32"}], native=False) == ("fp32",)
    assert prof.peak_precisions([{"precision": "bf16"}], native=False) == ("fp32", "bf16")
    assert prof.peak_precisions([{"precision": "fp32"}], native=True) == ("fp32", "bf16")

    asked = []

    def fake(fn, *args):
        if fn is prof._peak_job:
            asked.append(args[1])
            return {"conv2d_fp32_flops": 2e11, "conv3d_fp32_flops": 1e11, "peak_flops": 2e11, "native_bf16": False}
        dims = args[0]
        return {"config": f"default-{dims}d", "method": args[1], "patch": [8] * dims, "batch": 2,
                "precision": "fp32", "channels_last": True, "seconds_per_step": 0.5, "samples_per_second": 4.0,
                "data_fraction": 0.05, "flops_per_step": int(5e10), "achieved_flops": 1e11, "peak_rss_mb": 100.0}

    monkeypatch.setattr(prof, "_in_fresh_process", fake)
    monkeypatch.setattr(prof, "native_bf16", lambda: False)
    result = prof.profile_all(methods=["supervised"])
    assert asked == [("fp32",)]
    assert [r["fraction_of_peak"] for r in result["runs"]] == [pytest.approx(0.5), pytest.approx(1.0)]
    last = prof.format_table(result).splitlines()[-1]
    assert "bf16 -" in last and "bf16 not measured" in last and "2-D fp32 200" in last and "3-D fp32 100" in last


def test_a_config_that_fails_is_one_row_and_the_rest_is_still_profiled(tmp_path, monkeypatch):
    from frugalseg.errors import UserError

    fake_peak = {"conv2d_fp32_flops": 2e11, "conv3d_fp32_flops": 2e11, "peak_flops": 2e11, "native_bf16": False}

    def fake_run(dims, method, steps, warmup, sets, threads):
        if dims == 3:
            raise UserError("training diverged: loss is nan at step 2; lower optim.lr or check the input normalisation")
        return {"config": f"default-{dims}d", "method": method, "patch": [8] * dims, "batch": 2, "precision": "fp32",
                "channels_last": True, "seconds_per_step": 0.5, "samples_per_second": 4.0, "data_fraction": 0.05,
                "flops_per_step": int(5e10), "achieved_flops": 1e11, "peak_rss_mb": 100.0}

    monkeypatch.setattr(prof, "_in_fresh_process", lambda fn, *a: fake_peak if fn is prof._peak_job else fake_run(*a))
    out = tmp_path / "p.json"
    result = CliRunner().invoke(app, ["profile", "--methods", "supervised", "--out", str(out)])
    assert result.exit_code == 0, result.output
    runs = json.loads(out.read_text())["runs"]
    assert runs[0]["fraction_of_peak"] == pytest.approx(0.5)
    assert runs[1] == {"config": "default-3d", "method": "supervised",
                       "error": "training diverged: loss is nan at step 2; lower optim.lr or check the input "
                                "normalisation"}
    assert "default-3d  failed: training diverged: loss is nan at step 2" in result.output
    # a profile with a failed row is still a baseline: its measured rows get a speed-up, the failed one none
    again = CliRunner().invoke(app, ["profile", "--methods", "supervised", "--against", str(out)])
    assert again.exit_code == 0, again.output
    assert "  1.00      -" in again.output


_REUSE_PROBE = """
import resource, sys
import torch
from frugalseg.hardware import keep_freed_memory
kept = keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # allocate and touch 64 x 1 MiB, then free it all, as a training step does with its buffers
    blocks = [torch.ones(1 << 18) for _ in range(64)]
    del blocks
step()
before = faults()
for _ in range(5):
    step()
print(int(kept), (faults() - before) / 5)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_is_reused_instead_of_faulted_in_again_each_step():
    def probe(setting: str) -> tuple[int, float]:
        env = {**os.environ, "FRUGALSEG_MALLOC": setting}
        out = subprocess.run([sys.executable, "-c", _REUSE_PROBE], env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        return int(out[0]), float(out[1])

    kept, kept_faults = probe("")
    left, left_faults = probe("default")
    assert (kept, left) == (1, 0)
    # glibc's defaults map 1 MiB blocks afresh and return them on free: ~16k page faults per step of 64 MiB
    assert left_faults > 2000
    assert kept_faults < left_faults / 5


def test_the_table_names_the_rows_that_trained_eagerly_although_compilation_was_asked():
    row = {"patch": [8, 8], "batch": 2, "precision": "bf16", "seconds_per_step": 0.5, "samples_per_second": 4.0,
           "data_fraction": 0.05, "achieved_flops": 1e11, "fraction_of_peak": 0.5, "peak_rss_mb": 100.0}
    peak = {"conv2d_fp32_flops": 2e11, "conv3d_fp32_flops": 2e11, "peak_flops": 2e11, "native_bf16": False}
    runs = [{**row, "method": "supervised", "config": "default-2d", "compile": True, "compiled": True},
            {**row, "method": "unimatch", "config": "default-2d", "compile": True, "compiled": False},
            {**row, "method": "unimatch", "config": "default-3d", "compile": True, "compiled": False}]
    table = prof.format_table({"threads": 2, "torch": "x", "set": ["train.compile=true"], "peak": peak, "runs": runs})
    assert ("trained eagerly although train.compile is set (the step calls the network's parts, or compilation is "
            "unavailable): unimatch 2d, unimatch 3d") in table
    eager_asked = [{**r, "compile": False, "compiled": False} for r in runs]  # nothing asked: nothing to say
    table = prof.format_table({"threads": 2, "torch": "x", "set": [], "peak": peak, "runs": eager_asked})
    assert "trained eagerly" not in table


def test_a_config_that_fails_unexpectedly_keeps_its_traceback_and_the_profile_still_measures_the_rest(tmp_path,
                                                                                                      monkeypatch):
    fake_peak = {"conv2d_fp32_flops": 2e11, "conv3d_fp32_flops": 2e11, "peak_flops": 2e11, "native_bf16": False}

    def fake_run(dims, method, steps, warmup, sets, threads):
        if dims == 3:  # as a worker process's exception arrives: its traceback as the cause
            exc = RuntimeError("one of the variables needed for gradient computation has been modified\nmore")
            exc.__cause__ = Exception('Traceback (most recent call last):\n  File "step.py", line 1, in backward')
            raise exc
        return {"config": f"default-{dims}d", "method": method, "patch": [8] * dims, "batch": 2, "precision": "fp32",
                "channels_last": True, "seconds_per_step": 0.5, "samples_per_second": 4.0, "data_fraction": 0.05,
                "flops_per_step": int(5e10), "achieved_flops": 1e11, "peak_rss_mb": 100.0}

    monkeypatch.setattr(prof, "_in_fresh_process", lambda fn, *a: fake_peak if fn is prof._peak_job else fake_run(*a))
    out = tmp_path / "p.json"
    result = CliRunner().invoke(app, ["profile", "--methods", "supervised", "--out", str(out)])
    assert result.exit_code == 1
    runs = json.loads(out.read_text())["runs"]  # written whole: the measured row and the failed one
    assert runs[0]["fraction_of_peak"] == pytest.approx(0.5)
    assert runs[1] == {"config": "default-3d", "method": "supervised", "unexpected": True,
                       "error": "RuntimeError: one of the variables needed for gradient computation has been modified"}
    assert "supervised 3-D failed unexpectedly (please report it)" in result.output
    assert 'File "step.py", line 1, in backward' in result.output
    assert result.output.rstrip().splitlines()[-1] == (
        "error: 1 config(s) failed unexpectedly, with the traceback above: supervised default-3d; the other rows "
        "are measured")
