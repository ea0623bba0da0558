"""Every registered method: a two-step CPU smoke test on synthetic data, in 2-D and 3-D, assembled exactly as a run
assembles it; and the contract every method keeps."""

import contextlib
import dataclasses

import pytest
import torch

from frugalseg.assemble import assemble
from frugalseg.config import build_config
from frugalseg.data.readers import open_source
from frugalseg.data.splits import few_label_split, pretrain_split
from frugalseg.engine.optim import build_optimizer, build_scheduler
from frugalseg.engine.trainer import fit
from frugalseg.methods.base import PRETRAIN, Method, MethodSpec
from frugalseg.registry import METHODS, method_class, method_spec

TINY = ["model.channels=[4,8,16,32]", "data.batch_size=4", "train.steps=2", "train.log_every=1",
        "data.augment.probability=0"]


def _teachers(method: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Sub-modules that take no gradient at all: EMA teachers / targets."""
    out = {}
    for name, module in method.named_children():
        params = list(module.parameters())
        if name != "net" and params and not any(p.requires_grad for p in params):
            out[name] = module
    return out


@contextlib.contextmanager
def _parts_called_apart(net: torch.nn.Module):
    """Records the names of ``net``'s parts (``encode``, ``decode``) called outside its own forward."""
    apart, depth = [], [0]

    def watch(name, fn):
        def call(*args, **kwargs):
            if not depth[0]:
                apart.append(name)
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
        return call

    for name in ("forward", "encode", "decode"):
        setattr(net, name, watch(name if name != "forward" else "", getattr(net, name)))
    try:
        yield apart
    finally:
        for name in ("forward", "encode", "decode"):
            delattr(net, name)
    apart[:] = [a for a in apart if a]


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("dims", [2, 3])
def test_two_steps(name, dims, phantoms_2d, phantoms_3d, tmp_path):
    if dims not in method_spec(name).spatial_dims:
        pytest.skip(f"{name} does not support {dims}-D data")
    data = phantoms_2d if dims == 2 else phantoms_3d
    src = open_source(data)
    patch = "[32,32]" if dims == 2 else "[24,24,24]"
    cfg = build_config(dims, None, [*TINY, f"data.spatial_dims={dims}", f"data.patch_size={patch}"],
                       data_format=src.format, method=name)
    probe = assemble(name, cfg, src)
    split = pretrain_split(src) if probe.spec.kind == PRETRAIN else few_label_split(src, 2, 0)
    stage = assemble(name, cfg, src, split, seed=0)
    method, sampler = stage.module, stage.sampler
    before = {k: v.clone() for k, v in method.net.state_dict().items()}
    opt = build_optimizer(method.parameters(), cfg.optim)
    fit(method, sampler.batch, opt, build_scheduler(opt, 2, cfg.optim), cfg.train, tmp_path,
        torch.device("cpu"), show_progress=False)
    with _parts_called_apart(method.net) as apart:
        out = method.training_step(dict(sampler.batch(9).items()), 1.0)
    assert torch.isfinite(out.loss)
    # what train.compile relies on: a step that calls encode / decode outside the network's forward declares it
    assert stage.spec.network_parts == bool(apart), apart
    moved = [k for k, v in method.net.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert moved, "no parameter moved"
    if stage.spec.kind == PRETRAIN:
        assert "label" not in sampler.batch(0)
    for name_t, teacher in _teachers(method).items():  # a teacher gets no gradient (it moves by EMA only)
        assert all(p.grad is None for p in teacher.parameters()), name_t


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_declares_its_record_and_typed_options(name):
    cls = method_class(name)
    assert issubclass(cls, Method)
    assert dataclasses.is_dataclass(cls.Options) and cls.Options.__dataclass_params__.frozen
    spec = cls.declare(cls.Options())
    assert isinstance(spec, MethodSpec) and spec.kind in ("pretrain", "train")
    assert set(spec.spatial_dims) <= {2, 3} and spec.spatial_dims
    if spec.unlabelled is not None:
        assert spec.kind == "train"


def test_a_bad_option_is_one_line_naming_the_key(phantoms_2d):
    from frugalseg.errors import UserError

    with pytest.raises(UserError, match=r"config key 'method.ema' must be in \[0, 1\), got 1.5"):
        build_config(2, None, ["method.ema=1.5"], method="mean_teacher")
    with pytest.raises(UserError, match=r"unknown config key 'method.nosuch' \(known: ema, consistency, rampup\)"):
        build_config(2, None, ["method.nosuch=1"], method="mean_teacher")
    with pytest.raises(UserError, match=r"config key 'method.per_class' expects int, got 'many'"):
        build_config(2, None, ["method.per_class=many"], method="patchcl")
    with pytest.raises(UserError, match=r"unknown config key 'method.x' \(known: none: this method has no options\)"):
        build_config(2, None, ["method.x=1"], method="supervised")


def test_a_bug_inside_a_method_is_not_reported_as_a_bad_option(phantoms_2d, monkeypatch):
    """A TypeError raised while building a method is a bug: it surfaces as itself, not as "bad option"."""
    from frugalseg.methods import mean_teacher

    def broken(self, net, options=None):
        raise TypeError("a bug")

    monkeypatch.setattr(mean_teacher.MeanTeacher, "__init__", broken)
    cfg = build_config(2, None, TINY + ["data.patch_size=[32,32]"], method="mean_teacher")
    with pytest.raises(TypeError, match="a bug"):
        assemble("mean_teacher", cfg, open_source(phantoms_2d))


@pytest.mark.parametrize("name", ["supervised", "mean_teacher"])
def test_selfreg_switches_on_for_a_training_method(name, phantoms_2d, tmp_path):
    import json

    from frugalseg.run import train

    sets = ["train.steps=2", "train.log_every=1", "data.batch_size=2", "model.channels=[4,8,16]",
            "data.spatial_dims=2", "data.patch_size=[32,32]", "selfreg.weight=0.5"]
    train(phantoms_2d, name, 1, 0, tmp_path / "run", sets=sets, show_progress=False)
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logs and all(x["loss_selfreg_ifd"] > 0 and x["loss_selfreg_scr"] > 0 for x in logs)


def test_train_compile_leaves_a_method_that_calls_the_networks_parts_eager_and_says_so(phantoms_2d, tmp_path,
                                                                                       monkeypatch):
    """UniMatch decodes the encoder's features itself and calls the whole network on its strong views: with the
    forward compiled, a BatchNorm ran compiled and eagerly in one step and the backward failed ("modified by an
    inplace operation"). Such a method trains eagerly under train.compile, and says so."""
    import json

    from frugalseg.engine import trainer
    from frugalseg.run import train

    def compile_cheaply(net, notify=None):  # the same graphs as inductor's, without generating C++
        net.compile(backend="aot_eager")
        return True

    monkeypatch.setattr(trainer, "compile_network", compile_cheaply)
    src = open_source(phantoms_2d)
    cfg = build_config(2, None, [*TINY, "data.patch_size=[32,32]", "train.compile=true", "model.norm=batch"],
                       data_format=src.format, method="unimatch")
    stage = assemble("unimatch", cfg, src, few_label_split(src, 2, 0), seed=0)
    assert stage.spec.network_parts
    said = []
    opt = build_optimizer(stage.module.parameters(), cfg.optim)
    result = fit(stage.module, stage.sampler.batch, opt, build_scheduler(opt, 2, cfg.optim), cfg.train, tmp_path,
                 torch.device("cpu"), show_progress=False, notify=said.append)
    assert torch.isfinite(torch.tensor(result.last_loss))
    assert said == ["train.compile: UniMatch calls the network's encoder and decoder apart, which compiling the "
                    "network does not cover; training eagerly"]
    assert stage.module.net._compiled_call_impl is None and not result.compiled
    # run.json says whether the network ran compiled: yes for a method that calls it whole, no for UniMatch
    for name, compiled in (("supervised", True), ("unimatch", False)):
        train(phantoms_2d, name, 1, 0, tmp_path / name, show_progress=False,
              sets=[*TINY, "data.spatial_dims=2", "data.patch_size=[32,32]", "train.compile=true", "train.steps=1"])
        assert json.loads((tmp_path / name / "run.json").read_text())["compiled"] is compiled
