import json
import math
from unittest import mock

import numpy as np
import pytest
import torch

from frugalseg.config import Config, OptimConfig
from frugalseg.data.sampling import PatchSampler
from frugalseg.data.synthetic import phantom
from frugalseg.data.volume import Volume
from frugalseg.engine.optim import build_optimizer, build_scheduler, lr_factor
from frugalseg.engine.trainer import fit
from frugalseg.errors import UserError
from frugalseg.files import load_checkpoint, save_atomic
from frugalseg.methods.supervised import Supervised
from frugalseg.nn.unet import UNet


def test_lr_schedules_known_values():
    cfg = OptimConfig(warmup_steps=10, schedule="cosine")
    assert lr_factor(0, 110, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 110, cfg) == pytest.approx(1.0)
    assert lr_factor(60, 110, cfg) == pytest.approx(0.5)
    assert lr_factor(110, 110, cfg) == pytest.approx(0.0, abs=1e-12)
    cfg = OptimConfig(warmup_steps=0, schedule="poly", poly_power=0.9)
    assert lr_factor(50, 100, cfg) == pytest.approx(0.5**0.9)


def _setup(steps=12, seed=0):
    torch.manual_seed(seed)
    image, label = phantom(3, (48, 48, 6), (1.5, 1.5, 6.0))
    vol = Volume("p", (image[None] - image.mean()) / image.std(), label.astype(np.int64), np.eye(4),
                 (1.5, 1.5, 6.0))
    cfg = Config()
    cfg.train.steps, cfg.train.log_every, cfg.train.checkpoint_every = steps, 2, 4
    cfg.train.precision = "fp32"
    cfg.optim.warmup_steps = 2
    sampler = PatchSampler([vol], 2, (32, 32), 4, seed=seed)
    method = Supervised(UNet(2, 1, 4, (8, 16, 32)))
    opt = build_optimizer(method.parameters(), cfg.optim)
    return method, sampler, opt, build_scheduler(opt, steps, cfg.optim), cfg


def test_fit_decreases_the_loss(tmp_path):
    method, sampler, opt, sched, cfg = _setup(steps=30)
    batch = sampler.batch(0)
    with torch.no_grad():
        before = method.training_step(batch, 0.0).loss.item()
    fit(method, sampler.batch, opt, sched, cfg.train, tmp_path, torch.device("cpu"), show_progress=False)
    method.eval()
    with torch.no_grad():
        after = method.training_step(batch, 1.0).loss.item()
    assert after < 0.7 * before
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "log.jsonl").exists()


def test_resumed_run_equals_uninterrupted(tmp_path):
    method, sampler, opt, sched, cfg = _setup()
    fit(method, sampler.batch, opt, sched, cfg.train, tmp_path / "a", torch.device("cpu"), show_progress=False)
    reference = {k: v.clone() for k, v in method.state_dict().items()}

    method, sampler, opt, sched, cfg = _setup()
    calls = {"n": 0}

    def dying(i):
        calls["n"] += 1
        if calls["n"] > 6:  # killed after step 6; the last checkpoint is at step 4
            raise KeyboardInterrupt
        return sampler.batch(i)

    with pytest.raises(KeyboardInterrupt):
        fit(method, dying, opt, sched, cfg.train, tmp_path / "b", torch.device("cpu"), show_progress=False)
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert ckpt["step"] == 4 and ckpt["seconds"] > 0
    ckpt["seconds"] = 1000.0  # as if the first invocation had trained for 1000 s up to its checkpoint
    save_atomic(ckpt, tmp_path / "b" / "checkpoint.pt")
    method, sampler, opt, sched, cfg = _setup()  # a fresh process: new objects, state from disk
    result = fit(method, sampler.batch, opt, sched, cfg.train, tmp_path / "b", torch.device("cpu"), resume=True,
                 show_progress=False)
    assert 1000.0 < result.seconds < 1000.0 + 600  # the training time counts every invocation
    last = json.loads((tmp_path / "b" / "log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 12 and 1000.0 < last["seconds"] <= result.seconds
    for key, value in method.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=1e-6, msg=key)
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in
             (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) == [2, 4, 6, 8, 10, 12]  # no duplicated log lines after resume


def test_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path):
    method, sampler, opt, sched, cfg = _setup()
    fit(method, sampler.batch, opt, sched, cfg.train, tmp_path / "a", torch.device("cpu"), show_progress=False)
    reference = {k: v.clone() for k, v in method.state_dict().items()}

    method, sampler, opt, sched, cfg = _setup()
    calls = {"n": 0}

    def dying(i):
        calls["n"] += 1
        if calls["n"] > 9:  # killed after step 9: checkpoints at 4 and 8 -> last 8, previous 4
            raise KeyboardInterrupt
        return sampler.batch(i)

    with pytest.raises(KeyboardInterrupt):
        fit(method, dying, opt, sched, cfg.train, tmp_path / "b", torch.device("cpu"), show_progress=False)
    run = tmp_path / "b"
    assert load_checkpoint(run / "checkpoint.prev.pt")["step"] == 4
    (run / "checkpoint.pt").write_bytes(b"PK\x03\x04 torn write")  # the last checkpoint is damaged
    said = []
    method, sampler, opt, sched, cfg = _setup()
    fit(method, sampler.batch, opt, sched, cfg.train, run, torch.device("cpu"), resume=True, show_progress=False,
        notify=said.append)
    assert len(said) == 1 and "checkpoint.pt: not a readable checkpoint (damaged, or not a PyTorch file)" in said[0]
    assert "resuming from checkpoint.prev.pt (step 4)" in said[0]
    assert (run / "checkpoint.damaged.pt").is_file()
    for key, value in method.state_dict().items():  # replaying steps 5-12 gives the uninterrupted result
        torch.testing.assert_close(value, reference[key], rtol=0, atol=1e-6, msg=key)


def test_checkpoint_write_is_atomic(tmp_path):
    path = tmp_path / "c.pt"
    save_atomic({"step": 1}, path)
    with mock.patch("torch.save", side_effect=OSError(28, "No space left on device")):
        with pytest.raises(OSError):
            save_atomic({"step": 2}, path)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind
    path.write_bytes(b"corrupt")
    with pytest.raises(UserError, match="c.pt: not a readable checkpoint \\(damaged, or not a PyTorch file\\)"):
        load_checkpoint(path)


def test_diverging_loss_stops_with_a_clear_error(tmp_path):
    method, sampler, opt, sched, cfg = _setup(steps=3)

    def nan_batches(i):
        b = sampler.batch(i)
        b["image"][:] = math.nan
        return b

    with pytest.raises(UserError, match="training diverged"):
        fit(method, nan_batches, opt, sched, cfg.train, tmp_path, torch.device("cpu"), show_progress=False)


def test_validation_along_the_way_is_logged_changes_nothing_and_keeps_the_best(phantoms_2d, tmp_path):
    from frugalseg.eval.inference import load_model
    from frugalseg.run import train

    # fp32: the kept model is scored again after BatchNorm folding, which under bf16 autocast rounds otherwise
    sets = ["train.steps=6", "train.log_every=2", "train.checkpoint_every=3", "data.batch_size=2",
            "model.channels=[4,8,16]", "data.spatial_dims=2", "data.patch_size=[32,32]", "optim.warmup_steps=2",
            "train.precision=fp32"]
    train(phantoms_2d, "supervised", 2, 0, tmp_path / "plain", sets=sets, show_progress=False)
    train(phantoms_2d, "supervised", 2, 0, tmp_path / "val", sets=[*sets, "train.val_every=2"], show_progress=False)
    train(phantoms_2d, "supervised", 2, 0, tmp_path / "best", sets=[*sets, "train.val_every=2", "train.keep=best"],
          show_progress=False)
    plain = load_checkpoint(tmp_path / "plain" / "model.pt")["network"]
    validated = load_checkpoint(tmp_path / "val" / "model.pt")["network"]
    for key in plain:  # validating draws no random number and updates no statistic
        assert torch.equal(plain[key], validated[key]), key
    log = [json.loads(line) for line in (tmp_path / "best" / "log.jsonl").read_text().splitlines()]
    vals = [e for e in log if "val_dice" in e]
    assert [e["step"] for e in vals] == [2, 4, 6] and all(0.0 <= e["val_dice"] <= 1.0 for e in vals)
    best = max(vals, key=lambda e: e["val_dice"])
    kept = json.loads((tmp_path / "best" / "run.json").read_text())["kept"]
    assert kept == {"step": best["step"], "val_dice": pytest.approx(best["val_dice"])}
    model = load_model(tmp_path / "best", torch.device("cpu"))
    from torch.nn.modules.batchnorm import _BatchNorm

    assert not any(isinstance(m, _BatchNorm) for m in model.net.modules())  # folded for inference, same score below
    from frugalseg.data.readers import open_source
    from frugalseg.eval.evaluate import validator

    score = validator(model.net, model.cfg, open_source(phantoms_2d), torch.device("cpu"))()["val_dice"]
    assert score == pytest.approx(best["val_dice"], abs=1e-9)  # model.pt holds the best weights
    assert (tmp_path / "best" / "learning_curve.png").stat().st_size > 0


def test_keep_best_without_validation_is_refused():
    from frugalseg.config import build_config

    with pytest.raises(UserError, match="config key 'train.keep': best needs validation along the way"):
        build_config(2, None, ["train.keep=best"])


def test_compiled_network_computes_what_the_eager_one_does_and_falls_back_where_compilation_fails(tmp_path,
                                                                                                  monkeypatch):
    from frugalseg.engine import trainer

    method, sampler, opt, sched, cfg = _setup(steps=3)
    batch = sampler.batch(0)
    with torch.no_grad():
        method.eval()
        eager = method.net(batch["image"])
    keys = set(method.net.state_dict())
    assert trainer.compile_network(method.net)
    with torch.no_grad():
        torch.testing.assert_close(method.net(batch["image"]), eager, atol=1e-4, rtol=1e-4)
    assert set(method.net.state_dict()) == keys  # compiled in place: no wrapper prefix in checkpoints
    method.train()
    cfg.train.compile = True
    result = fit(method, sampler.batch, opt, sched, cfg.train, tmp_path / "compiled", torch.device("cpu"),
                 show_progress=False)
    assert math.isfinite(result.last_loss) and result.last_loss > 0

    def broken(fn):
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(trainer.torch, "compile", broken)
    said = []
    assert not trainer.compile_network(torch.nn.Linear(2, 2), said.append)
    assert said == ["train.compile: compilation is unavailable here (RuntimeError); training eagerly"]


def test_a_compiled_run_is_not_spoilt_by_an_earlier_compilation_of_the_same_network_code(tmp_path):
    """Dynamo keys its cache on code: after the same U-Net code ran compiled at other shapes in this process (a
    benchmark's earlier cell), a new compiled run used to get symbolic shapes, which inductor failed on."""
    earlier = torch.compile(UNet(2, 1, 2, (8, 16, 32)), backend="eager")
    for size in (16, 24):
        earlier(torch.randn(2, 1, size, size))
    method, sampler, opt, sched, cfg = _setup(steps=3)
    cfg.train.compile = True
    result = fit(method, sampler.batch, opt, sched, cfg.train, tmp_path, torch.device("cpu"), show_progress=False)
    assert math.isfinite(result.last_loss) and result.last_loss > 0


def test_a_network_that_fails_to_compile_stops_the_run_in_one_line(tmp_path, monkeypatch):
    """Compilation is lazy: where the probe compiles but the network's step does not (an inductor error in its
    backward, as the 8-128 U-Net's was), fit stops with one line naming the switch, not a traceback."""
    from frugalseg.engine import trainer

    def failing_backend(gm, example_inputs):
        raise ValueError("Invalid ranges [0:-1]")

    def compile_with_a_failing_backend(net, notify=None):
        net.compile(backend=failing_backend)
        return True

    monkeypatch.setattr(trainer, "compile_network", compile_with_a_failing_backend)
    method, sampler, opt, sched, cfg = _setup(steps=2)
    cfg.train.compile = True
    with pytest.raises(UserError, match=r"^train\.compile: PyTorch could not compile this network "
                                        r"\(ValueError: Invalid ranges \[0:-1\]\); "
                                        r"run it without compilation \(--set train\.compile=false\)$"):
        fit(method, sampler.batch, opt, sched, cfg.train, tmp_path / "run", torch.device("cpu"), show_progress=False)


def test_a_validation_that_fails_to_compile_stops_the_run_in_one_line(tmp_path, monkeypatch):
    """Validation along the way runs the compiled network in eval mode, without gradients: a new graph, compiled
    then. Its failure ends the run in one line too; the training steps before it compiled and ran."""
    from frugalseg.engine import trainer

    validations = []

    def backend_without_eval_graphs(gm, example_inputs):
        if not torch.is_grad_enabled():
            raise ValueError("no graph without gradients")
        return gm.forward

    def compile_with_that_backend(net, notify=None):
        net.compile(backend=backend_without_eval_graphs)
        return True

    monkeypatch.setattr(trainer, "compile_network", compile_with_that_backend)
    method, sampler, opt, sched, cfg = _setup(steps=4)
    batch = sampler.batch(0)

    def validate():
        validations.append(len(validations))
        method.eval()
        with torch.no_grad():
            method.net(batch["image"])
        method.train()
        return {"val_dice": 0.5}

    cfg.train.compile, cfg.train.val_every = True, 2
    with pytest.raises(UserError, match=r"^train\.compile: PyTorch could not compile this network "
                                        r"\(ValueError: no graph without gradients\); "):
        fit(method, sampler.batch, opt, sched, cfg.train, tmp_path / "run", torch.device("cpu"), show_progress=False,
            validate=validate)
    assert validations == [0]  # the first validation, after two compiled training steps
