"""Composition root: config -> dataset, network, method, optimiser -> ``engine.fit`` -> model file."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from frugalseg.config import Config, build_config, config_from_dict, configs_dir, read_yaml, save_config
from frugalseg.errors import UserError
from frugalseg.files import LOCK_FILE

RUN_MARKER = "run.json"


# what frugalseg writes into a run folder; --force removes a folder only when everything in it is one of these
RUN_ENTRIES = {"config.yaml", "split.json", RUN_MARKER, "log.jsonl", "tb", "checkpoint.pt", "checkpoint.prev.pt",
               "checkpoint.damaged.pt", "model.pt", "best.pt", "learning_curve.png", "init_report.json", "cell.json",
               LOCK_FILE, "stages"}
STAGES = "stages"  # where `train --recipe` keeps the stages before the last
RUN_PATTERNS = ("eval_*.json", ".tmp-*")
RUN_KEYS = ("method", "seed", "status", "frugalseg")  # keys every run.json of ours holds
DEMO_MARKER = "demo.json"
DEMO_ENTRIES = {DEMO_MARKER, "data", "run", "learning_curve.png", "prediction_overlay.png", LOCK_FILE}


def _ours(out: Path) -> str | None:
    """Why ``out`` is not a folder frugalseg made (``None`` when it is): a run folder (its ``run.json`` holds our
    keys, every entry is one we write) or a demo folder."""
    if (out / DEMO_MARKER).is_file():
        try:
            ok = json.loads((out / DEMO_MARKER).read_text()).get("kind") == "frugalseg demo"
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            return f"its {DEMO_MARKER} was not written by frugalseg"
        foreign = sorted(p.name for p in out.iterdir() if p.name not in DEMO_ENTRIES)
        return f"it holds {foreign[0]!r}, which frugalseg did not write" if foreign else None
    if not (out / RUN_MARKER).exists() and (out / STAGES).is_dir() and {p.name for p in out.iterdir()} <= {
            STAGES, LOCK_FILE}:  # a recipe run stopped before its last stage: only its stages so far
        for stage in (out / STAGES).iterdir():
            why = _ours(stage) if stage.is_dir() else f"it holds {stage.name!r}, which frugalseg did not write"
            if why is not None:
                return f"{STAGES}/{stage.name}: {why}"
        return None
    try:
        meta = json.loads((out / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return f"it has no readable {RUN_MARKER}"
    if not isinstance(meta, dict) or any(k not in meta for k in RUN_KEYS):
        return f"its {RUN_MARKER} was not written by frugalseg"
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name not in RUN_ENTRIES and not any(fnmatch.fnmatch(p.name, pat) for pat in RUN_PATTERNS))
    return f"it holds {foreign[0]!r}, which frugalseg did not write" if foreign else None


def _entries(out: Path, recipe: bool = False) -> list[Path]:
    """What ``out`` holds besides the lock (and, for the last stage of a recipe, the stages before it)."""
    skip = {LOCK_FILE, STAGES} if recipe else {LOCK_FILE}
    return [p for p in out.iterdir() if p.name not in skip] if out.is_dir() else []


def check_out(out: Path, force: bool, recipe: bool = False) -> None:
    """Refuse a new run into ``out``, in one line and before any work, when it holds something and ``--force`` is
    not given, or when ``--force`` is given for a folder frugalseg did not make (``prepare_dir`` empties it later,
    under the lock)."""
    if not out.exists() or (out.is_dir() and not _entries(out, recipe)):
        return
    if not force:
        prepare_dir(out, resume=False, force=False, recipe=recipe)  # raises its one-line error
    elif out.is_dir() and (why := _ours(out)) is not None:
        raise UserError(f"--out {out}: --force only overwrites a frugalseg run folder, and this is not one ({why})")


def prepare_dir(out: Path, resume: bool, force: bool, option: str = "--out", recipe: bool = False) -> None:
    """Check ``out`` for a new run (or for ``--resume``) and empty it when ``--force`` allows. Never overwrites
    without ``--force``, and ``--force`` only ever empties a folder frugalseg made, with nothing of the user's in it.
    The caller holds the folder's lock (``files.FolderLock``)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out}: exists and is not a folder")
    if resume:
        if not (out / RUN_MARKER).is_file():
            raise UserError(f"{option} {out}: nothing to resume (no {RUN_MARKER} in the folder)")
        return
    if _entries(out, recipe):
        if not force:
            raise UserError(f"{option} {out}: already exists; pass --resume to continue it or --force to overwrite")
        why = _ours(out)
        if why is not None:
            raise UserError(f"{option} {out}: --force only overwrites a frugalseg run folder, and this is not one "
                            f"({why})")
        for entry in _entries(out):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{option} {out}: cannot write ({exc.strerror or exc})") from None


def _versions() -> dict[str, str]:
    import monai
    import torch

    from frugalseg import __version__
    from frugalseg.engine.repro import git_revision

    return {"frugalseg": __version__, "git": git_revision(), "torch": torch.__version__,
            "monai": monai.__version__}


@dataclass
class RunRequest:
    """One stage to run into ``out``: ``method`` on ``data`` with ``seed``.

    ``labelled`` is N, the number of labelled volumes a training method reads (picked by ``seed``); a pre-training
    method reads every training image without labels and takes none. The method's record decides which applies.
    """

    data: Path | str
    method: str
    seed: int
    out: Path | str
    labelled: int | None = None
    init: Path | str | None = None
    config_file: Path | None = None
    sets: list[str] = field(default_factory=list)
    extra_config: list[dict[str, Any]] = field(default_factory=list)
    resume: bool = False
    force: bool = False
    unlabelled: Path | str | None = None  # a folder of extra unlabelled scans
    device: str = "auto"  # --device: auto (a CUDA GPU if there is one), cpu, cuda, cuda:i
    keep_checkpoint: bool = False  # keep checkpoint.pt (the full training state) once the run has finished
    in_recipe: bool = False  # the last stage of `train --recipe`: its folder also holds the earlier stages


MAX_SEED = 2**32 - 1


def check_seed(seed: int, option: str = "--seed") -> None:
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"{option} {seed}: a seed must be between 0 and {MAX_SEED}")


def run_stage(req: RunRequest, show_progress: bool = True, report=print) -> dict[str, Any]:
    """Run one stage into ``req.out``: ``config.yaml`` (resolved), ``split.json`` (which cases were read with
    labels), ``run.json`` (method, data, versions, git revision), ``log.jsonl`` + ``tb/``, ``checkpoint.pt`` and
    finally ``model.pt`` (the network only: heads, predictors and teachers are dropped, ready for ``--init``).

    Everything that can fail on the user's input (options, the data's every case header, the folder, a resume's
    agreement with what the run recorded) fails before anything is written. The folder is locked for the run.
    """
    from frugalseg.assemble import declared
    from frugalseg.data.readers import open_source
    from frugalseg.data.splits import few_label_split, pretrain_split
    from frugalseg.engine import distributed as dist
    from frugalseg.files import FolderLock
    from frugalseg.methods.base import PRETRAIN
    from frugalseg.registry import method_class

    out, method, seed, labelled = Path(req.out), req.method, req.seed, req.labelled
    check_seed(seed)
    device = dist.setup(req.device)  # joins the job when launched by torchrun; rank 0 alone writes and reports
    main = dist.is_main()
    if not main:
        def report(message: str) -> None:
            return None
    method_class(method)  # an unknown name is refused before the data is opened
    source = open_source(req.data, req.unlabelled)
    cfg = build_config(source.default_spatial_dims, req.config_file, req.sets, req.extra_config, source.format,
                       method)
    kind = declared(method, cfg)[2].kind
    if labelled is None and kind != PRETRAIN:
        raise UserError(f"--method {method}: not a pre-training method (use `frugalseg train`)")
    if labelled is not None and kind == PRETRAIN:
        raise UserError(f"--method {method}: a pre-training method (use `frugalseg pretrain`)")
    if req.resume:
        prepare_dir(out, resume=True, force=False)
        cfg, split, meta, init = _resumable(out, req, cfg, source)
    else:
        split = few_label_split(source, labelled, seed) if labelled is not None else pretrain_split(source)
        init, meta = req.init, None
        if init is not None and not Path(init).is_file():
            raise UserError(f"--init {init}: weights file not found")
        check_out(out, req.force, recipe=req.in_recipe)
    source.check_cases(source.cases("all"))  # a damaged case of any split is found now, not after training
    lock = FolderLock(out) if main else None
    try:
        return _run_locked(req, cfg, source, split, init, meta, device, show_progress, report)
    except BaseException:
        if lock is not None:
            lock.release(remove_if_unused=True)
            lock = None
        raise
    finally:
        if lock is not None:
            lock.release()


def _resumable(out: Path, req: RunRequest, requested, source):
    """What a ``--resume`` continues from: the recorded configuration, split, ``run.json`` and initial weights —
    refused in one line when the request differs from what the run recorded, when the run finished, or when its
    checkpoints are gone after it had made progress."""
    from frugalseg.engine.tracking import read_log
    from frugalseg.engine.trainer import has_checkpoint

    meta = json.loads((out / RUN_MARKER).read_text())
    for key, value in (("method", req.method), ("labelled", req.labelled), ("seed", req.seed)):
        if _recorded(meta, key) != value:
            raise UserError(f"--resume {out}: the run was started with {key}={_recorded(meta, key)!r}, "
                            f"not {value!r}")
    if meta.get("status") == "finished":
        raise UserError(f"--resume {out}: this run already finished")
    if Path(meta.get("data", "")).resolve() != source.root.resolve():
        raise UserError(f"--resume {out}: the run was started on --data {meta.get('data')}, not {source.root}")
    recorded = meta.get("unlabelled")
    if (recorded is None) != (req.unlabelled is None) or (
            recorded is not None and Path(recorded).resolve() != Path(req.unlabelled).resolve()):
        raise UserError(f"--resume {out}: the run was started with --unlabelled {recorded}, not {req.unlabelled}")
    cfg = config_from_dict(read_yaml(out / "config.yaml"), str(out / "config.yaml"))
    if cfg != requested:
        key, was, now = _first_difference(cfg.to_dict(), requested.to_dict())
        raise UserError(f"--resume {out}: the run was started with config key '{key}' = {was!r}, not {now!r} "
                        "(resume with the same --set/--config, or start another run)")
    if req.init is not None and str(req.init) != str(meta.get("init")):
        raise UserError(f"--resume {out}: the run was started with --init {meta.get('init')}, not {req.init}")
    split = json.loads((out / "split.json").read_text())
    logged = [e["step"] for e in read_log(out) if "loss" in e]
    if not has_checkpoint(out) and logged and max(logged) >= cfg.train.checkpoint_every:
        raise UserError(f"--resume {out}: its checkpoints are gone (the run had reached step {max(logged)}); "
                        "restarting would silently begin again from step 0 - start a new run with --force instead")
    # a checkpoint already holds the initialised weights; without one the run restarts from the recorded init
    init = None if has_checkpoint(out) else meta.get("init")
    return cfg, split, meta, init


def _first_difference(a: dict, b: dict, prefix: str = "") -> tuple[str, Any, Any]:
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            if x != y:
                return _first_difference(x, y, f"{prefix}{key}.")
        elif x != y:
            return f"{prefix}{key}", x, y
    return prefix.rstrip("."), a, b


def _run_locked(req: RunRequest, cfg, source, split, init, meta, device, show_progress, report) -> dict[str, Any]:
    from frugalseg.assemble import assemble
    from frugalseg.data.prefetch import resolve_workers
    from frugalseg.engine import distributed as dist
    from frugalseg.engine.optim import build_optimizer, build_scheduler
    from frugalseg.engine.repro import seed_everything, set_threads
    from frugalseg.engine.tracking import read_log
    from frugalseg.engine.trainer import BEST, CHECKPOINT, PREVIOUS, fit
    from frugalseg.eval.inference import MODEL_FILE
    from frugalseg.files import load_checkpoint, save_atomic, write_json_atomic
    from frugalseg.hardware import resolve_precision

    out, method, seed, labelled = Path(req.out), req.method, req.seed, req.labelled
    main = dist.is_main()
    for note in source.notes:
        report(note)
    threads = set_threads(cfg.train.num_threads)
    seed_everything(seed, cfg.train.deterministic)
    stage = assemble(method, cfg, source, split, seed, init)  # after --init: EMA targets start from the weights
    module = dist.convert_batchnorm(stage.module, device)  # batch statistics over every rank's shard (torchrun)
    load_report = stage.load_report

    if req.resume and load_report is not None:
        report(f"--init {init}: {load_report.summary()} (no checkpoint yet: restarting from the initial weights)")
    precision = resolve_precision(cfg.train.precision, device)
    if req.resume and meta.get("precision", precision) != precision:  # train.precision=auto on other hardware
        report(f"--resume {out}: the run started in {meta['precision']} and continues in {precision} on this "
               f"machine (train.precision={cfg.train.precision}); run.json records both")
        precision = f"{meta['precision']}, then {precision}"
    if not req.resume:
        dist.barrier()  # every rank has checked --out before rank 0 creates or replaces it
        if main:
            prepare_dir(out, resume=False, force=req.force, recipe=req.in_recipe)
        meta = {"method": method, "labelled": labelled, "seed": seed, "data": str(source.root),
                "unlabelled": str(req.unlabelled) if req.unlabelled is not None else None,
                "format": source.format, "class_names": source.class_names, "in_channels": source.in_channels,
                "init": str(init) if init else None, "precision": precision, "status": "running", **_versions()}
        if main:
            save_config(cfg, out / "config.yaml")
            write_json_atomic(split, out / "split.json")
            write_json_atomic(meta, out / RUN_MARKER)
            if load_report is not None:
                report(f"--init {init}: {load_report.summary()}")
                write_json_atomic(load_report.to_dict(), out / "init_report.json")
        dist.barrier()
    optimizer = build_optimizer(module.parameters(), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.train.steps, cfg.optim)
    what = "pre-training" if labelled is None else f"N={labelled}"
    validate = None
    if cfg.train.val_every > 0 and main:
        from frugalseg.eval.evaluate import validator

        validate = validator(module.net, cfg, source, device)
    workers = resolve_workers(cfg.data.workers, device)
    result = fit(module, stage.sampler.batch, optimizer, scheduler, cfg.train, out, device, resume=req.resume,
                 show_progress=show_progress, description=f"{method} {what} seed={seed}", notify=report,
                 validate=validate, workers=workers)
    summary = {"run_dir": str(out), "steps": result.steps, "seconds": 0.0, "final_loss": result.last_loss,
               "labelled_cases": split["labelled_cases"]}
    if not main:
        dist.barrier()  # wait for rank 0 to write model.pt
        return summary
    net_state = {k: v.detach().cpu().contiguous() for k, v in module.net.state_dict().items()}
    model_meta = {"config": cfg.to_dict(), "class_names": source.class_names, "in_channels": source.in_channels,
                  "method": method, "kept": "last", "orientation": "RAS", "spacing": stage.spacing}
    if cfg.train.keep == "best" and (out / BEST).is_file():  # the weights of the best validation score
        best = load_checkpoint(out / BEST)
        net_state = best["network"]
        model_meta.update(kept="best", kept_step=int(best["step"]), kept_val_dice=float(best["val_dice"]))
        meta["kept"] = {"step": int(best["step"]), "val_dice": float(best["val_dice"])}
    save_atomic({"network": net_state, "meta": json.dumps(model_meta)}, out / MODEL_FILE)
    meta["status"] = "finished"
    meta["train_seconds"] = result.seconds  # across resumes (each invocation up to its last checkpoint)
    meta["threads"] = threads
    meta["data_workers"] = workers
    meta["device"] = str(device)
    meta["precision"] = precision
    meta["compiled"] = result.compiled  # train.compile asked and done (not for a method that calls the net's parts)
    write_json_atomic(meta, out / RUN_MARKER)
    if not req.keep_checkpoint:  # the full training state is no longer needed once model.pt is written
        for name in (CHECKPOINT, PREVIOUS):
            (out / name).unlink(missing_ok=True)
    log = read_log(out)
    if log:
        from frugalseg.eval.plots import learning_curve

        learning_curve(log, out / "learning_curve.png",
                       f"{method}, {'pre-training' if labelled is None else f'{labelled} labelled'}, seed {seed}")
    dist.barrier()
    summary["seconds"] = meta["train_seconds"]
    return summary


def run_recipe(req: RunRequest, name: str, show_progress: bool = True, report=print) -> dict[str, Any]:
    """Run every stage of recipe ``name`` with ``req``'s data, N, seed and settings, each starting from the weights
    of the one before (``req.init``, if given, starts the first): the stages before the last in
    ``OUT/stages/<k>-<method>/``, the last in ``OUT`` itself. With ``req.resume`` finished stages are kept and an
    interrupted one continues. Each stage's own settings apply, and ``--set`` on top of them (as in a benchmark)."""
    from dataclasses import replace

    from frugalseg.engine import distributed as dist
    from frugalseg.files import FolderLock
    from frugalseg.methods.base import PRETRAIN
    from frugalseg.recipes import load_recipe
    from frugalseg.registry import method_spec

    recipe = load_recipe(name)
    out = Path(req.out)
    check_seed(req.seed)
    if req.labelled is None:
        raise UserError(f"--recipe {name}: a recipe trains with labelled volumes: give --labelled N")
    if not req.resume:
        check_out(out, req.force)
    if req.resume and not (out / STAGES).is_dir() and not (out / RUN_MARKER).is_file():
        raise UserError(f"--out {out}: nothing to resume (no stage of a recipe in the folder)")
    lock = FolderLock(out) if dist.is_main() else None
    try:
        if req.force and not req.resume and dist.is_main():
            prepare_dir(out, resume=False, force=True)  # an empty folder: every stage starts afresh
        init, summary = req.init, {}
        for k, st in enumerate(recipe.stages):
            last = k == len(recipe.stages) - 1
            stage_out = out if last else out / STAGES / f"{k + 1}-{st.method}"
            kind = method_spec(st.method, st.overrides.get("method")).kind
            stage_req = replace(req, method=st.method, out=stage_out, init=init, force=False, in_recipe=last,
                                labelled=None if kind == PRETRAIN else req.labelled,
                                extra_config=[*req.extra_config, *([st.overrides] if st.overrides else [])])
            meta_path = stage_out / RUN_MARKER
            finished = meta_path.is_file() and json.loads(meta_path.read_text()).get("status") == "finished"
            if not finished:
                stage_req.resume = meta_path.is_file()
                if stage_req.resume and not req.resume:
                    raise UserError(f"--out {out}: already holds an unfinished stage ({stage_out.name}); pass "
                                    "--resume to continue it or --force to start again")
                report(f"recipe {name}: stage {k + 1}/{len(recipe.stages)} {st.method}")
                summary = run_stage(stage_req, show_progress, report)
            init = stage_out / "model.pt"
        if not summary:
            raise UserError(f"--resume {out}: every stage of recipe {name} already finished")
        return summary
    except BaseException:
        if lock is not None:
            lock.release(remove_if_unused=True)
            lock = None
        raise
    finally:
        if lock is not None:
            lock.release()


def _recorded(meta: dict[str, Any], key: str) -> Any:
    """A value of ``run.json``, read under the spelling of runs made before ``labelled`` was spelled so."""
    if key == "labelled" and key not in meta:
        return meta.get("labeled")
    return meta.get(key)


def train(data: Path | str, method: str, labelled: int, seed: int, out: Path | str, init: Path | str | None = None,
          config_file: Path | None = None, sets: list[str] | None = None, resume: bool = False, force: bool = False,
          show_progress: bool = True, extra_config: list[dict[str, Any]] | None = None,
          report=print, unlabelled: Path | str | None = None, keep_checkpoint: bool = False) -> dict[str, Any]:
    """Train ``method`` with ``labelled`` volumes picked by ``seed``; see :func:`run_stage`."""
    req = RunRequest(data, method, seed, out, labelled, init, config_file, list(sets or []),
                     list(extra_config or []), resume, force, unlabelled, keep_checkpoint=keep_checkpoint)
    return run_stage(req, show_progress, report)


def pretrain(data: Path | str, method: str, seed: int, out: Path | str, init: Path | str | None = None,
             config_file: Path | None = None, sets: list[str] | None = None, resume: bool = False,
             force: bool = False, show_progress: bool = True, extra_config: list[dict[str, Any]] | None = None,
             report=print, unlabelled: Path | str | None = None) -> dict[str, Any]:
    """Pre-train ``method`` on every training image of ``data`` (labels are never read); see :func:`run_stage`."""
    req = RunRequest(data, method, seed, out, None, init, config_file, list(sets or []), list(extra_config or []),
                     resume, force, unlabelled)
    return run_stage(req, show_progress, report)


def demo(out: Path | str, force: bool = False, show_progress: bool = True, report=print,
         steps: int | None = None) -> dict[str, Any]:
    """The main job on the embedded default: phantoms -> 2 labelled volumes -> evaluate on unseen phantoms."""
    from frugalseg.data.synthetic import write_phantoms
    from frugalseg.engine import distributed as dist
    from frugalseg.eval.evaluate import evaluate_model
    from frugalseg.eval.inference import load_model
    from frugalseg.eval.plots import overlay
    from frugalseg.files import write_json_atomic

    out = Path(out)
    dist.setup()  # under torchrun: rank 0 writes the phantoms and evaluates, every rank trains
    main = dist.is_main()
    if main:
        prepare_dir(out, resume=False, force=force)
        write_json_atomic({"kind": "frugalseg demo"}, out / "demo.json")
        report(f"writing synthetic phantoms to {out / 'data'}")
        write_phantoms(out / "data", spatial_dims=2)
    dist.barrier()
    data = out / "data"
    layers = [read_yaml(configs_dir() / "demo.yaml")]
    if steps is not None:
        layers.append({"train": {"steps": steps, "checkpoint_every": steps}})
    summary = train(data, "supervised", labelled=2, seed=0, out=out / "run", show_progress=show_progress,
                    extra_config=layers, report=report)
    if not main:
        return {"train": summary, "eval": None}
    model = load_model(out / "run")
    results, kept = evaluate_model(model, data, "test", show_progress, keep_predictions=3)
    write_json_atomic(results, out / "run" / "eval_test.json")
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
