"""Every registered method: a two-step CPU smoke test on synthetic data, in 2-D and 3-D."""

import pytest
import torch

from frugalseg.config import Config
from frugalseg.data.preprocess import Preprocessor
from frugalseg.data.readers import open_source
from frugalseg.data.sampling import method_sampler
from frugalseg.engine.optim import build_optimizer, build_scheduler
from frugalseg.engine.trainer import fit
from frugalseg.nn.unet import UNet
from frugalseg.registry import METHODS, build_method, method_kind, resolve


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("dims", [2, 3])
def test_two_steps(name, dims, phantoms_2d, phantoms_3d, tmp_path):
    data = phantoms_2d if dims == 2 else phantoms_3d
    src = open_source(data)
    vols = [Preprocessor()(src.load(c)) for c in src.cases("train")[:2]]
    if method_kind(name) == "pretrain":
        vols = [v.without_label() for v in vols]
    if dims not in getattr(resolve(METHODS, name, "m"), "spatial_dims", (2, 3)):
        pytest.skip(f"{name} does not support {dims}-D data")
    patch = (32, 32) if dims == 2 else (24, 24, 24)
    method = build_method(name, UNet(dims, 1, src.num_classes, (4, 8, 16, 32)), {})
    sampler = method_sampler(method, vols, vols, dims, patch, 4, 0, 0.33, None)
    before = {k: v.clone() for k, v in method.net.state_dict().items()}
    cfg = Config()
    cfg.train.steps, cfg.train.log_every = 2, 1
    opt = build_optimizer(method.parameters(), cfg.optim)
    fit(method, sampler.batch, opt, build_scheduler(opt, 2, cfg.optim), cfg.train, tmp_path,
        torch.device("cpu"), show_progress=False)
    out = method.training_step({k: v for k, v in sampler.batch(9).items()}, 1.0)
    assert torch.isfinite(out.loss)
    moved = [k for k, v in method.net.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert moved, "no parameter moved"
    if method_kind(name) == "pretrain":
        assert "label" not in sampler.batch(0)


@pytest.mark.parametrize("name", ["supervised", "mean_teacher"])
def test_selfreg_switches_on_for_a_training_method(name, phantoms_2d, tmp_path):
    import json

    from frugalseg.run import train

    sets = ["train.steps=2", "train.log_every=1", "data.batch_size=2", "model.channels=[4,8,16]",
            "data.spatial_dims=2", "data.patch_size=[32,32]", "selfreg.weight=0.5"]
    train(phantoms_2d, name, 1, 0, tmp_path / "run", sets=sets, show_progress=False)
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logs and all(x["loss_selfreg_ifd"] > 0 and x["loss_selfreg_scr"] > 0 for x in logs)
