"""Composition root: config -> dataset, network, method, optimiser -> ``engine.fit`` -> model file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from frugalseg.config import Config, build_config, config_from_dict, configs_dir, read_yaml, save_config
from frugalseg.errors import UserError

RUN_MARKER = "run.json"


def prepare_dir(out: Path, resume: bool, force: bool, option: str = "--out") -> None:
    """Create ``out`` for a new run, or check it for ``--resume``. Never overwrites without ``--force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out}: exists and is not a folder")
    non_empty = out.is_dir() and any(out.iterdir())
    if resume:
        if not (out / RUN_MARKER).is_file():
            raise UserError(f"{option} {out}: nothing to resume (no {RUN_MARKER} in the folder)")
        return
    if non_empty:
        if not force:
            raise UserError(f"{option} {out}: already exists; pass --resume to continue it or --force to overwrite")
        if not (out / RUN_MARKER).is_file() and not (out / "demo.json").is_file():
            raise UserError(f"{option} {out}: --force only overwrites a frugalseg run folder, and this is not one")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{option} {out}: cannot write ({exc.strerror or exc})") from None


def _write_json(obj: Any, path: Path) -> None:
    from frugalseg.eval.evaluate import write_json_atomic

    write_json_atomic(obj, path)


def _versions() -> dict[str, str]:
    import monai
    import torch

    from frugalseg import __version__
    from frugalseg.engine.repro import git_revision

    return {"frugalseg": __version__, "git": git_revision(), "torch": torch.__version__,
            "monai": monai.__version__}


def train(
    data: Path | str,
    method: str,
    labeled: int | None,
    seed: int,
    out: Path | str,
    init: Path | str | None = None,
    config_file: Path | None = None,
    sets: list[str] | None = None,
    resume: bool = False,
    force: bool = False,
    show_progress: bool = True,
    extra_config: list[dict[str, Any]] | None = None,
    report=print,
) -> dict[str, Any]:
    """Train ``method`` with ``labeled`` volumes picked by ``seed``; write everything to ``out``.

    With ``labeled=None`` the method is a pre-training method and sees every training image, without labels
    (see :func:`pretrain`). ``out`` receives ``config.yaml`` (resolved), ``split.json`` (which cases were
    labelled), ``run.json`` (method, data, versions, git revision), ``log.jsonl`` + ``tb/``, ``checkpoint.pt``
    and finally ``model.pt``.
    """

    from frugalseg.data.preprocess import Preprocessor
    from frugalseg.data.readers import open_source
    from frugalseg.data.sampling import method_sampler
    from frugalseg.data.splits import few_label_split
    from frugalseg.engine import distributed as dist
    from frugalseg.engine.checkpoint import save_atomic
    from frugalseg.engine.optim import build_optimizer, build_scheduler
    from frugalseg.engine.repro import seed_everything, set_threads
    from frugalseg.engine.tracking import read_log
    from frugalseg.engine.trainer import fit, has_checkpoint
    from frugalseg.eval.inference import MODEL_FILE
    from frugalseg.nn.weights import load_pretrained
    from frugalseg.registry import METHODS, build_network, method_kind, resolve

    out = Path(out)
    device = dist.setup()  # joins the job when launched by torchrun; rank 0 alone writes files and reports
    main = dist.is_main()
    if not main:
        def report(message: str) -> None:
            return None
    resolve(METHODS, method, "--method")
    kind = method_kind(method)
    if labeled is None and kind != "pretrain":
        raise UserError(f"--method {method}: not a pre-training method (use `frugalseg train`)")
    if labeled is not None and kind == "pretrain":
        raise UserError(f"--method {method}: a pre-training method (use `frugalseg pretrain`)")
    source = open_source(data)
    if resume:
        prepare_dir(out, resume=True, force=False)
        meta = json.loads((out / RUN_MARKER).read_text())
        for key, value in (("method", method), ("labeled", labeled), ("seed", seed)):
            if meta.get(key) != value:
                raise UserError(f"--resume {out}: the run was started with {key}={meta.get(key)!r}, not {value!r}")
        if meta.get("status") == "finished":
            raise UserError(f"--resume {out}: this run already finished")
        cfg = config_from_dict(read_yaml(out / "config.yaml"), str(out / "config.yaml"))
        split = json.loads((out / "split.json").read_text())
        # a checkpoint already holds the initialised weights; without one the run restarts from the recorded init
        init = None if has_checkpoint(out) else meta.get("init")
    else:
        cfg = build_config(source.default_spatial_dims, config_file, sets, extra_config, source.format, method)
        split = few_label_split(source, labeled, seed) if labeled is not None else pretrain_split(source)
        if init is not None and not Path(init).is_file():
            raise UserError(f"--init {init}: weights file not found")
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
            prepare_dir(out, resume=False, force=False)  # raises the one-line error before any work

    # everything that can fail on the user's input happens before the run directory is written
    threads = set_threads(cfg.train.num_threads)
    seed_everything(seed, cfg.train.deterministic)
    pre = Preprocessor(cfg.data.normalisation, tuple(cfg.data.percentiles),
                       tuple(cfg.data.spacing) if cfg.data.spacing else None, cfg.data.spatial_dims)
    if labeled is None:
        volumes = [pre(source.load(case)).without_label() for case in split["unlabelled_cases"]]
    else:
        volumes = [pre(source.load(case)) for case in split["labelled_cases"]]
    if cfg.data.spatial_dims == 3 and any(v.image.ndim != 4 for v in volumes):
        raise UserError(f"--data {source.root}: 2-D images cannot train a 3-D model (set data.spatial_dims=2)")
    net = build_network(cfg.model, cfg.data.spatial_dims, source.in_channels, source.num_classes)
    load_report = load_pretrained(net, init, cfg.model.init_parts) if init is not None else None
    module = check_stage(method, cfg, net)  # after --init: EMA targets start from the loaded weights
    module = dist.convert_batchnorm(module, device)  # batch statistics over every rank's shard under torchrun
    unlabelled = None
    if labeled is not None and getattr(module, "unlabelled_sampling", None) is not None:
        unlabelled = [pre(source.load(case)) for case in split["unlabelled_cases"]]  # semi-supervised: every image
    sampler = method_sampler(module, volumes, unlabelled, cfg.data.spatial_dims, cfg.data.patch_size,
                             cfg.data.batch_size, seed, cfg.data.foreground_oversample, cfg.data.augment)

    if resume and load_report is not None:
        report(f"--init {init}: {load_report.summary()} (no checkpoint yet: restarting from the initial weights)")
    if not resume:
        dist.barrier()  # every rank has checked --out before rank 0 creates or replaces it
        if main:
            prepare_dir(out, resume=False, force=force)
        meta = {"method": method, "labeled": labeled, "seed": seed, "data": str(source.root),
                "format": source.format, "class_names": source.class_names, "in_channels": source.in_channels,
                "init": str(init) if init else None, "status": "running", **_versions()}
        if main:
            save_config(cfg, out / "config.yaml")
            _write_json(split, out / "split.json")
            _write_json(meta, out / RUN_MARKER)
            if load_report is not None:
                report(f"--init {init}: {load_report.summary()}")
                _write_json(load_report.to_dict(), out / "init_report.json")
        dist.barrier()
    optimizer = build_optimizer(module.parameters(), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.train.steps, cfg.optim)
    what = "pre-training" if labeled is None else f"N={labeled}"
    result = fit(module, sampler.batch, optimizer, scheduler, cfg.train, out, device, resume=resume,
                 show_progress=show_progress, description=f"{method} {what} seed={seed}", notify=report)
    summary = {"run_dir": str(out), "steps": result.steps, "seconds": 0.0, "final_loss": result.last_loss,
               "labelled_cases": split["labelled_cases"]}
    if not main:
        dist.barrier()  # wait for rank 0 to write model.pt
        return summary
    net_state = {k: v.detach().cpu().contiguous() for k, v in module.net.state_dict().items()}
    model_meta = {"config": cfg.to_dict(), "class_names": source.class_names, "in_channels": source.in_channels,
                  "method": method}
    save_atomic({"network": net_state, "meta": json.dumps(model_meta)}, out / MODEL_FILE)
    meta["status"] = "finished"
    meta["train_seconds"] = result.seconds  # across resumes (each invocation up to its last checkpoint)
    meta["threads"] = threads
    _write_json(meta, out / RUN_MARKER)
    log = read_log(out)
    if log:
        from frugalseg.eval.plots import learning_curve

        learning_curve(log, out / "learning_curve.png",
                       f"{method}, {'pre-training' if labeled is None else f'{labeled} labelled'}, seed {seed}")
    dist.barrier()
    summary["seconds"] = meta["train_seconds"]
    return summary


def check_stage(method: str, cfg: Config, net) -> Any:
    """Build ``method`` around ``net`` under ``cfg`` and check what it needs from the data; one-line errors."""
    from frugalseg.registry import build_method, check_method_dims

    check_method_dims(method, cfg.data.spatial_dims)
    module = build_method(method, net, cfg.method)
    div = getattr(net, "size_divisor", 1)  # decoder maps of a padding network are at the padded size
    if getattr(module, "uses_decoder_maps", False) and any(int(p) % div for p in cfg.data.patch_size):
        raise UserError(f"data.patch_size {list(cfg.data.patch_size)}: --method {method} on model.name "
                        f"{cfg.model.name} needs multiples of {div}")
    if cfg.selfreg.weight > 0:
        from frugalseg.methods.selfreg import SelfRegularised

        if getattr(module, "kind", "train") == "pretrain":
            raise UserError(f"config key 'selfreg.weight': SelfReg regularises training methods, not {method}")
        try:
            module = SelfRegularised(module, cfg.selfreg.weight, cfg.selfreg.scr_weight, cfg.selfreg.ifd_weight)
        except ValueError as exc:
            raise UserError(f"config key 'selfreg.weight': {exc}") from None
    parts = getattr(module, "sampling", {}).get("partitions", 0)
    if parts and cfg.data.batch_size % parts:
        raise UserError(f"--method {method}: data.batch_size ({cfg.data.batch_size}) must be a multiple of the "
                        f"{parts} partitions per volume")
    return module


def pretrain(data: Path | str, method: str, seed: int, out: Path | str, **kwargs: Any) -> dict[str, Any]:
    """Pre-train ``method`` on every training image of ``data`` (labels are never read); see :func:`train`.

    ``model.pt`` holds the network only (projection heads, predictors and teachers are dropped), ready for
    ``frugalseg train --init``.
    """
    return train(data, method, None, seed, out, **kwargs)


def pretrain_split(source) -> dict[str, Any]:
    """What a pre-training run sees: every training case, as images only."""
    return {"labeled": None, "format": source.format, "data": str(source.root), "labelled_cases": [],
            "unlabelled_cases": list(source.cases("train")), "val_cases": source.cases("val")}


def demo(out: Path | str, force: bool = False, show_progress: bool = True, report=print,
         steps: int | None = None) -> dict[str, Any]:
    """The main job on the embedded default: phantoms -> 2 labelled volumes -> evaluate on unseen phantoms."""
    from frugalseg.data.synthetic import write_phantoms
    from frugalseg.engine import distributed as dist
    from frugalseg.eval.evaluate import evaluate_model
    from frugalseg.eval.inference import load_model
    from frugalseg.eval.plots import overlay

    out = Path(out)
    dist.setup()  # under torchrun: rank 0 writes the phantoms and evaluates, every rank trains
    main = dist.is_main()
    if main:
        prepare_dir(out, resume=False, force=force)
        _write_json({"kind": "frugalseg demo"}, out / "demo.json")
        report(f"writing synthetic phantoms to {out / 'data'}")
        write_phantoms(out / "data", spatial_dims=2)
    dist.barrier()
    data = out / "data"
    layers = [read_yaml(configs_dir() / "demo.yaml")]
    if steps is not None:
        layers.append({"train": {"steps": steps, "checkpoint_every": steps}})
    summary = train(data, "supervised", labeled=2, seed=0, out=out / "run", show_progress=show_progress,
                    extra_config=layers, report=report)
    if not main:
        return {"train": summary, "eval": None}
    model = load_model(out / "run")
    results, kept = evaluate_model(model, data, "test", show_progress, keep_predictions=3)
    _write_json(results, out / "run" / "eval_test.json")
    overlay([(v.case_id, v, p) for v, p in kept], out / "prediction_overlay.png", model.class_names)
    shutil.copy(out / "run" / "learning_curve.png", out / "learning_curve.png")
    return {"train": summary, "eval": results}


def resolved_config(data: Path | str, config_file: Path | None, sets: list[str] | None) -> Config:
    """The configuration a ``train`` on ``data`` would use (for ``frugalseg config``)."""
    from frugalseg.data.readers import open_source

    source = open_source(data)
    return build_config(source.default_spatial_dims, config_file, sets, data_format=source.format)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
