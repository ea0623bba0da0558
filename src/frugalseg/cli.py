"""The ``frugalseg`` command line. Each command parses, calls one library function and prints the result.

Bad input ends with one line on stderr naming the file or option and exit code 2.
"""

from __future__ import annotations

import functools
import signal
import sys
from pathlib import Path

import typer
import typer.core

from frugalseg.errors import EXIT_USAGE, UserError


class _FlagHelp:
    """``--help`` shown as the flag it is (no ``<bool>`` type column), like every other flag of the CLI."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class _Command(_FlagHelp, typer.core.TyperCommand):
    pass


class _Group(_FlagHelp, typer.core.TyperGroup):
    pass


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=_Group,
                  help="Label-efficient medical image segmentation.")


def _version(value: bool) -> None:
    if value:
        from frugalseg import __version__

        typer.echo(f"frugalseg {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", help="Print the version and exit.", metavar="",
                                       callback=_version, is_eager=True)) -> None:
    """Label-efficient medical image segmentation."""
    from frugalseg.hardware import keep_freed_memory

    keep_freed_memory()  # every command that computes allocates the same large buffers again and again


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


class Terminated(BaseException):
    """SIGTERM received (a scheduler or torchrun stopping the job)."""


def _terminated(signum, frame) -> None:
    raise Terminated()


def _redeliver_termination(default_hook):
    """An ``sys.unraisablehook`` for :class:`Terminated`: a SIGTERM whose handler ran inside a finaliser or a weakref
    callback (where Python prints the exception and carries on) is sent again, silently, from a helper thread once
    the hook has returned (sent from inside it, its handler would run in the hook and be swallowed as well) instead
    of being lost with a traceback on the terminal; anything else goes to ``default_hook``."""

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, Terminated):
            import os
            import threading

            threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGTERM)).start()
            return
        default_hook(unraisable)

    hook.redelivers_termination = True
    return hook


def _guard(fn):
    """Turn user errors, I/O errors and Ctrl-C into one line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            signal.signal(signal.SIGTERM, _terminated)
        except ValueError:  # not the main thread (e.g. called from a test runner thread)
            pass
        else:
            if not getattr(sys.unraisablehook, "redelivers_termination", False):
                sys.unraisablehook = _redeliver_termination(sys.unraisablehook)
        try:
            return fn(*args, **kwargs)
        except Terminated:
            _fail(_ranked("stopped by SIGTERM (under torchrun: another process of the job failed); "
                          f"{_how_to_continue(fn.__name__)}"), 143)
        except UserError as exc:
            _fail(_ranked(str(exc)))
        except KeyboardInterrupt:
            _fail(f"interrupted; {_how_to_continue(fn.__name__)}", 130)
        except OSError as exc:
            where = exc.filename or "output"
            _fail(_ranked(f"{where}: {exc.strerror or exc}"))
        except RuntimeError as exc:
            if not _lost_peer(exc):
                raise
            _fail(_ranked("another process of this torchrun job stopped or stopped answering "
                          f"({str(exc).splitlines()[0][:120]}); restart the job with --resume"), 1)
        finally:
            from frugalseg.engine.distributed import teardown

            teardown()

    return wrapper


def _how_to_continue(command: str) -> str:
    if command == "benchmark":
        return "the same benchmark command continues it (finished cells are kept, a cell resumes from its checkpoint)"
    if command in ("train", "pretrain"):
        return "the same command with --resume continues it"
    if command == "predict":
        return "the files written so far are complete; the same command continues with the others"
    return "no file was left half-written"


def _ranked(message: str) -> str:
    """Messages of ranks other than 0 of a torchrun job say which rank they come from."""
    import os

    rank = os.environ.get("RANK", "0")
    return message if rank in ("", "0") else f"[rank {rank}] {message}"


def _lost_peer(exc: RuntimeError) -> bool:
    """A collective failed because another rank of the job died or stopped answering."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    text = str(exc).lower()
    return isinstance(exc, getattr(dist, "DistError", ())) or "gloo" in text or "nccl" in text


def _main_rank() -> bool:
    import os

    return os.environ.get("RANK", "0") in ("", "0")


def _say(message: str) -> None:
    if _main_rank():  # under torchrun, rank 0 speaks for the job
        print(message, file=sys.stderr, flush=True)  # flushed: a log file off a terminal follows the run


def _out(message: str) -> None:
    if _main_rank():
        typer.echo(message)


def _first_sentence(doc: str) -> str:
    """The first sentence of a docstring, however it is wrapped."""
    text = " ".join(doc.replace("``", "`").split())
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def _table(results: dict, title: str) -> str:
    names = list(results["per_class_dice"])
    width = max(12, *(len(c["case"]) for c in results["cases"]))
    lines = [title, f"{'case':<{width}} " + " ".join(f"{n:>10}" for n in names) + f" {'mean':>8}"]
    for c in results["cases"]:
        vals = [c["dice"][n] for n in names]
        lines.append(f"{c['case']:<{width}} " + " ".join(f"{v:>10.3f}" for v in vals)
                     + f" {sum(vals) / len(vals):>8.3f}")
    lines.append(f"{'mean':<{width}} " + " ".join(f"{results['per_class_dice'][n]:>10.3f}" for n in names)
                 + f" {results['mean_dice']:>8.3f}")
    unit = results.get("hd95_unit", "mm")
    unit = {"voxel": "voxels (the files store no spacing)"}.get(unit, unit)
    lines.append(f"mean Dice {results['mean_dice']:.4f} (sd over volumes {results['sd_dice']:.4f}), "
                 f"mean HD95 {results['mean_hd95']:.2f} {unit}, {results['n_cases']} volumes")
    return "\n".join(lines)


def _flag(name: str, help: str):
    """A boolean switch, shown in --help as a flag (no value)."""
    return typer.Option(False, name, help=help, metavar="")


DataOpt = typer.Option(..., "--data", help="Dataset folder: imagesTr/ (+ labelsTr/ for the labelled images), a "
                                          "Decathlon/nnU-Net dataset.json, or SSL4MIS HDF5.")
SetOpt = typer.Option(None, "--set", help="Override a config key, e.g. --set train.steps=500 (repeatable).")
UnlabelledOpt = typer.Option(None, "--unlabelled", help="A folder of extra unlabelled scans (NIfTI) to train on.")
DeviceOpt = typer.Option("auto", "--device", help="auto (a CUDA GPU if there is one), cpu, cuda or cuda:<i>.")
KeepOpt = _flag("--keep-checkpoint", "Keep checkpoint.pt (the full training state) after the run finishes.")


@app.command(cls=_Command)
@_guard
def train(
    data: Path = DataOpt,
    method: str | None = typer.Option(None, "--method", help="A registered method (see `frugalseg methods`); "
                                                              "default supervised."),
    recipe: str | None = typer.Option(None, "--recipe", help="Run every stage of a recipe (see `frugalseg recipes`) "
                                                              "instead of one method, e.g. bcp."),
    labelled: int = typer.Option(..., "--labelled", "--labeled", help="Number of labelled training volumes."),
    seed: int = typer.Option(0, "--seed", help="Seed: picks the labelled volumes and drives training."),
    out: Path = typer.Option(..., "--out", help="Run directory to create."),
    init: Path | None = typer.Option(None, "--init", help="Pre-trained weights to start from."),
    config: Path | None = typer.Option(None, "--config", help="YAML file of config overrides."),
    set_: list[str] | None = SetOpt,
    unlabelled: Path | None = UnlabelledOpt,
    resume: bool = _flag("--resume", "Continue the run in --out from its last checkpoint (same command)."),
    force: bool = _flag("--force", "Replace an existing run folder (only one frugalseg made)."),
    device: str = DeviceOpt,
    keep_checkpoint: bool = KeepOpt,
    quiet: bool = _flag("--quiet", "No progress output."),
) -> None:
    """Train a network with N labelled volumes (and the unlabelled ones, for a semi-supervised method)."""
    from frugalseg.run import RunRequest, run_recipe, run_stage

    if method is not None and recipe is not None:
        raise UserError("--method and --recipe: give one (a recipe names its methods)")
    req = RunRequest(data, method or "supervised", seed, out, labelled, init, config, set_ or [], [], resume, force,
                     unlabelled, device, keep_checkpoint)
    if recipe is not None:
        summary = run_recipe(req, recipe, show_progress=not quiet, report=_say)
    else:
        summary = run_stage(req, show_progress=not quiet, report=_say)
    _out(f"trained {summary['steps']} steps in {summary['seconds']:.0f} s "
               f"(labelled: {', '.join(summary['labelled_cases'])}); model in {summary['run_dir']}/model.pt")


@app.command(cls=_Command)
@_guard
def pretrain(
    data: Path = DataOpt,
    method: str = typer.Option(..., "--method", help="A pre-training method (see `frugalseg methods`)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the run."),
    out: Path = typer.Option(..., "--out", help="Run directory to create."),
    init: Path | None = typer.Option(None, "--init", help="Weights to start from (e.g. an earlier stage)."),
    config: Path | None = typer.Option(None, "--config", help="YAML file of config overrides."),
    set_: list[str] | None = SetOpt,
    unlabelled: Path | None = UnlabelledOpt,
    resume: bool = _flag("--resume", "Continue the run in --out from its last checkpoint (same command)."),
    force: bool = _flag("--force", "Replace an existing run folder (only one frugalseg made)."),
    device: str = DeviceOpt,
    keep_checkpoint: bool = KeepOpt,
    quiet: bool = _flag("--quiet", "No progress output."),
) -> None:
    """Pre-train on every training image of --data (labels are never read); then `train --init OUT/model.pt`."""
    from frugalseg.run import RunRequest, run_stage

    req = RunRequest(data, method, seed, out, None, init, config, set_ or [], [], resume, force, unlabelled,
                     device, keep_checkpoint)
    summary = run_stage(req, show_progress=not quiet, report=_say)
    _out(f"pre-trained {summary['steps']} steps in {summary['seconds']:.0f} s; "
               f"weights in {summary['run_dir']}/model.pt")


@app.command(cls=_Command)
@_guard
def evaluate(
    run_dir: Path = typer.Argument(..., help="A finished run directory."),
    data: Path = DataOpt,
    split: str = typer.Option("val", "--split", help="val | test | all (| train)."),
    device: str = DeviceOpt,
    quiet: bool = _flag("--quiet", "No progress output."),
) -> None:
    """Dice and HD95 per case and class; writes RUN_DIR/eval_<split>.json."""
    from frugalseg.eval.evaluate import evaluate_run

    results = evaluate_run(run_dir, data, split, show_progress=not quiet, report=_say, device=device)
    typer.echo(_table(results, f"{run_dir} on {split}:"))
    typer.echo(f"written {Path(run_dir) / f'eval_{split}.json'}")


@app.command(cls=_Command)
@_guard
def predict(
    run_dir: Path = typer.Argument(..., help="A finished run directory, or a model exported with `export`."),
    input: Path = typer.Argument(..., help="A scan (NIfTI) or a folder of scans (nnU-Net's case_0000.nii.gz... "
                                           "channel files are one case)."),
    output: Path = typer.Argument(..., help="The label map (NIfTI), or a folder for a folder of scans; each keeps "
                                            "its input's grid, affine and orientation."),
    tta: str | None = typer.Option(None, "--tta", help="flip: average the probabilities over the mirrorings of "
                                                       "every spatial axis the network sees."),
    save_probabilities: bool = _flag("--probabilities", "Also write <case>_probabilities.nii.gz (4-D float, "
                                                        "classes along the last axis)."),
    force: bool = _flag("--force", "Redo scans whose output exists (an input is never overwritten)."),
    device: str = DeviceOpt,
    quiet: bool = _flag("--quiet", "No progress output."),
) -> None:
    """Segment a scan or a folder of scans; the model is loaded once, finished scans are skipped."""
    from frugalseg.eval.predict import predict as run_predict

    if tta not in (None, "flip"):
        raise UserError(f"--tta {tta!r}: the one test-time augmentation is 'flip'")
    summary = run_predict(run_dir, input, output, force, tta == "flip", save_probabilities, report=_say,
                          show_progress=not quiet, device=device)
    if len(summary.written) == 1 and not summary.skipped and not summary.failed and not Path(input).is_dir():
        typer.echo(f"written {summary.written[0]}")
    else:
        typer.echo(summary.line())
    if summary.failed:
        _fail(f"{len(summary.failed)} of {len(summary.failed) + len(summary.written)} scans failed (named above)")


@app.command(cls=_Command)
@_guard
def export(
    run_dir: Path = typer.Argument(..., help="A finished run directory."),
    output: Path = typer.Argument(..., help="The ONNX file to write (needs the onnx extra)."),
    force: bool = _flag("--force", "Overwrite OUTPUT if it exists."),
) -> None:
    """Export the trained network as ONNX; `predict` accepts the file in place of the run directory."""
    from frugalseg.eval.export import export_onnx

    diff = export_onnx(run_dir, output, force)
    typer.echo(f"written {output} (ONNX Runtime matches PyTorch within {diff:.1e} on a test input)")


@app.command("init-dataset", cls=_Command)
@_guard
def init_dataset(
    images: Path = typer.Argument(..., help="Folder of scans (NIfTI), inside --out (e.g. OUT/imagesTr)."),
    labels: Path | None = typer.Argument(None, help="Folder of label maps for some of the scans, named like them."),
    out: Path = typer.Option(..., "--out", help="The dataset folder that receives dataset.json."),
    class_labels: str | None = typer.Option(None, "--labels", help='Class names, e.g. "1=LV,2=RV" (default: read '
                                                                   "off the label maps)."),
    modality: str = typer.Option("MRI", "--modality", help="The scans' modality (MRI, CT...)."),
    force: bool = _flag("--force", "Overwrite an existing dataset.json."),
) -> None:
    """Write OUT/dataset.json for a folder of scans of which some are labelled (the others train unlabelled)."""
    from frugalseg.data.layout import init_dataset as write

    meta = write(images, labels, out, class_labels, modality, force)
    n_labelled = sum("label" in e for e in meta["training"])
    typer.echo(f"written {out / 'dataset.json'}: {len(meta['training'])} scans, {n_labelled} labelled, classes "
               + ", ".join(f"{k}={v}" for k, v in meta["labels"].items() if k != "0"))


@app.command("import-weights", cls=_Command)
@_guard
def import_weights(
    source: Path = typer.Argument(..., help="Released weights file (read with weights_only=True)."),
    output: Path = typer.Argument(..., help="frugalseg weights file to write (for --init)."),
    format_: str = typer.Option(..., "--format", help="voco | monai-ssl | pcrlv2"),
    in_channels: int | None = typer.Option(None, "--in-channels",
                                              help="Adapt the input convolution(s) to this many image channels."),
    force: bool = _flag("--force", "Overwrite OUTPUT."),
) -> None:
    """Convert released weights (VoCo, MONAI SwinUNETR SSL, PCRLv2) strictly, with a report; then `train --init`."""
    from frugalseg.nn.importers import write_imported

    report = write_imported(source, format_, output, force, in_channels)
    typer.echo(f"{report.summary()}; written {output}")
    typer.echo(f"use: frugalseg train ... --init {output} {report.use_hint()}")


@app.command(cls=_Command)
def methods() -> None:
    """List the registered methods."""
    from frugalseg.methods.base import PRETRAIN
    from frugalseg.registry import METHODS, method_class

    for name in METHODS:
        cls = method_class(name)
        kind = "pre-train" if cls.declare(cls.Options()).kind == PRETRAIN else "train"
        about = sys.modules[cls.__module__].__doc__ or cls.__doc__ or ""  # the module says what the method is
        typer.echo(f"{name:<16} {kind:<10} {_first_sentence(about)}")


@app.command(cls=_Command)
@_guard
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the demo's data, run and figures."),
    force: bool = _flag("--force", "Overwrite a previous demo folder."),
    quiet: bool = _flag("--quiet", "No progress bar."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Training steps (default: configs/demo.yaml)."),
) -> None:
    """The main job on synthetic phantoms: train with 2 labelled volumes, evaluate on unseen phantoms."""
    from frugalseg.run import demo as run_demo

    result = run_demo(out, force, show_progress=not quiet, report=_say, steps=steps)
    if result["eval"] is None:  # a rank other than 0 of a torchrun job
        return
    typer.echo(_table(result["eval"], "Dice on unseen test phantoms (supervised, 2 labelled volumes):"))
    typer.echo(f"figures: {out / 'learning_curve.png'}, {out / 'prediction_overlay.png'}")


@app.command(cls=_Command)
@_guard
def benchmark(
    data: Path = DataOpt,
    recipes: str = typer.Option(..., "--recipes", help="Comma-separated recipe names (see `frugalseg recipes`)."),
    labelled: str = typer.Option("1,2,8", "--labelled", "--labeled",
                                 help="Comma-separated numbers of labelled volumes."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Comma-separated seeds."),
    out: Path = typer.Option(..., "--out", help="Benchmark folder (re-run the same command to resume)."),
    split: str = typer.Option("val", "--split", help="Evaluation split: val | test | all."),
    eval_data: Path | None = typer.Option(None, "--eval-data", help="Evaluate on this dataset (default: --data)."),
    set_: list[str] | None = SetOpt,
    unlabelled: Path | None = UnlabelledOpt,
    device: str = DeviceOpt,
    quiet: bool = _flag("--quiet", "No progress output."),
) -> None:
    """Run the few-label protocol: every recipe x N x seed, evaluated; writes csv, report and plots.

    Re-run the same command to continue an interrupted benchmark or to extend it with recipes, N or seeds."""
    from frugalseg.benchmark import parse_list, run_benchmark

    rows = run_benchmark(data, parse_list(recipes, "--recipes"), parse_list(labelled, "--labelled", int),
                         parse_list(seeds, "--seeds", int), out, split, eval_data, set_ or [],
                         show_progress=not quiet, report=_say, unlabelled=unlabelled, device=device)
    _out((out / "report.md").read_text())
    _out(f"{len(rows)} cells; written {out / 'results.csv'}, {out / 'report.md'} and plots")


@app.command(cls=_Command)
@_guard
def curve(
    runs: list[Path] = typer.Argument(..., help="Run folders trained with --set train.val_every=K."),
    out: Path = typer.Option(..., "--out", help="The figure to write (.png)."),
    labels: str | None = typer.Option(None, "--labels", help="Comma-separated legend labels, one per run."),
    force: bool = _flag("--force", "Overwrite --out."),
) -> None:
    """Validation Dice against training minutes (the stages a run started from included), one line per run."""
    from frugalseg.curves import plot_runs

    done = plot_runs(runs, [s.strip() for s in labels.split(",")] if labels else None, out, force)
    for label, points in done:
        typer.echo(f"{label}: " + ", ".join(f"{m:.1f} min {d:.3f}" for m, d in points))
    typer.echo(f"written {out}")


@app.command(cls=_Command)
def recipes() -> None:
    """List the recipes in configs/recipes."""
    from frugalseg.recipes import available, load_recipe

    names = available()
    width = max((len(n) for n in names), default=0) + 1
    for name in names:
        typer.echo(f"{name:<{width}} {load_recipe(name).description}")


@app.command(cls=_Command)
@_guard
def profile(
    out: Path | None = typer.Option(None, "--out", help="Also write the figures as JSON here."),
    steps: int = typer.Option(8, "--steps", help="Timed steps per config (after 2 warm-up steps)."),
    methods: str | None = typer.Option(None, "--methods", help="Comma-separated methods (default: all)."),
    force: bool = _flag("--force", "Overwrite --out."),
    dims: str = typer.Option("2,3", "--dims", help="Which default configs: 2, 3 or 2,3."),
    against: Path | None = typer.Option(None, "--against", help="An earlier profile's --out JSON: add the "
                                        "speed-up over it (step and evaluation) per method and config."),
    set_: list[str] | None = SetOpt,
) -> None:
    """Step time, samples/s, data wait, peak RSS and FLOP/s vs this machine's peak, per method, 2-D and 3-D.

    --set applies to every profiled config, e.g. --set train.precision=bf16 to time bf16 autocast;
    --against runs/profile.json (written by an earlier --out) gives the ratio to that run, e.g. to the defaults.
    """
    import json

    from frugalseg.config import build_config
    from frugalseg.files import write_atomic
    from frugalseg.profile import compare, format_table, profile_all, read_baseline
    from frugalseg.registry import METHODS

    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else list(METHODS)
    which = tuple(int(d) for d in dims.split(",") if d.strip() in ("2", "3"))
    if not which or len(which) != len([d for d in dims.split(",") if d.strip()]):
        raise UserError(f"--dims {dims!r}: expected 2, 3 or 2,3")
    for m in chosen:
        if m not in METHODS:
            raise UserError(f"--methods: unknown method {m!r} (choose from {', '.join(METHODS)})")
        for d in which:
            build_config(d, None, set_ or [], method=m)  # a bad --set fails here, before any profiling
    if out is not None and out.exists() and not force:
        raise UserError(f"--out {out}: exists (add --force to overwrite)")
    baseline = read_baseline(against) if against is not None else None  # a bad file fails before any profiling
    result = profile_all(steps, chosen, dims=which, progress=_say, sets=set_ or [])
    if baseline is not None:
        result = compare(result, baseline, str(against))
    typer.echo(format_table(result))
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(out, lambda f: f.write(json.dumps(result, indent=1).encode()))
        except OSError as exc:
            raise UserError(f"--out {out}: cannot write ({exc.strerror or exc})") from None
        typer.echo(f"written {out}")
    faults = [f"{r['method']} {r['config']}" for r in result["runs"] if r.get("unexpected")]
    if faults:
        _fail(f"{len(faults)} config(s) failed unexpectedly, with the traceback above: {', '.join(faults)}; the "
              "other rows are measured", 1)


@app.command("config", cls=_Command)
@_guard
def show_config(
    data: Path = DataOpt,
    config: Path | None = typer.Option(None, "--config", help="YAML file of config overrides."),
    set_: list[str] | None = SetOpt,
) -> None:
    """Print the resolved configuration a `train` on --data would use."""
    from frugalseg.run import dump_config, resolved_config

    typer.echo(dump_config(resolved_config(data, config, set_ or [])))


def main() -> None:  # pragma: no cover
    app(prog_name="frugalseg")
    sys.exit(0)
