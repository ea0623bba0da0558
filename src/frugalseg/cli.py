"""The ``frugalseg`` command line. Each command parses, calls one library function and prints the result.

Bad input ends with one line on stderr naming the file or option and exit code 2.
"""

from __future__ import annotations

import functools
import signal
import sys
from pathlib import Path

import typer

from frugalseg.errors import EXIT_USAGE, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Label-efficient medical image segmentation.")


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


class Terminated(BaseException):
    """SIGTERM received (a scheduler or torchrun stopping the job)."""


def _terminated(signum, frame) -> None:
    raise Terminated()


def _guard(fn):
    """Turn user errors, I/O errors and Ctrl-C into one line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            signal.signal(signal.SIGTERM, _terminated)
        except ValueError:  # not the main thread (e.g. called from a test runner thread)
            pass
        try:
            return fn(*args, **kwargs)
        except Terminated:
            _fail(_ranked("stopped by SIGTERM (under torchrun: another process of the job failed); "
                          "a training run continues with --resume"), 143)
        except UserError as exc:
            _fail(_ranked(str(exc)))
        except KeyboardInterrupt:
            _fail("interrupted (a training run continues with --resume)", 130)
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
        typer.echo(message, err=True)


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


DataOpt = typer.Option(..., "--data", help="Dataset folder (Decathlon/nnU-Net raw or SSL4MIS HDF5).")
SetOpt = typer.Option(None, "--set", help="Override a config key, e.g. --set train.steps=500 (repeatable).")


@app.command()
@_guard
def train(
    data: Path = DataOpt,
    method: str = typer.Option("supervised", "--method", help="A registered method (see `frugalseg methods`)."),
    labelled: int = typer.Option(..., "--labelled", "--labeled", help="Number of labelled training volumes."),
    seed: int = typer.Option(0, "--seed", help="Seed: picks the labelled volumes and drives training."),
    out: Path = typer.Option(..., "--out", help="Run directory to create."),
    init: Path | None = typer.Option(None, "--init", help="Pre-trained weights to start from."),
    config: Path | None = typer.Option(None, "--config", help="YAML file of config overrides."),
    set_: list[str] | None = SetOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing run directory."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Train a network with N labelled volumes."""
    from frugalseg.run import train as run_train

    summary = run_train(data, method, labelled, seed, out, init, config, set_ or [], resume, force,
                        show_progress=not quiet, report=_say)
    _out(f"trained {summary['steps']} steps in {summary['seconds']:.0f} s "
               f"(labelled: {', '.join(summary['labelled_cases'])}); model in {summary['run_dir']}/model.pt")


@app.command()
@_guard
def pretrain(
    data: Path = DataOpt,
    method: str = typer.Option(..., "--method", help="A pre-training method (see `frugalseg methods`)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the run."),
    out: Path = typer.Option(..., "--out", help="Run directory to create."),
    init: Path | None = typer.Option(None, "--init", help="Weights to start from (e.g. an earlier stage)."),
    config: Path | None = typer.Option(None, "--config", help="YAML file of config overrides."),
    set_: list[str] | None = SetOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing run directory."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Pre-train on every training image of --data (labels are never read); then `train --init OUT/model.pt`."""
    from frugalseg.run import pretrain as run_pretrain

    summary = run_pretrain(data, method, seed, out, init=init, config_file=config, sets=set_ or [], resume=resume,
                           force=force, show_progress=not quiet, report=_say)
    _out(f"pre-trained {summary['steps']} steps in {summary['seconds']:.0f} s; "
               f"weights in {summary['run_dir']}/model.pt")


@app.command()
@_guard
def evaluate(
    run_dir: Path = typer.Argument(..., help="A finished run directory."),
    data: Path = DataOpt,
    split: str = typer.Option("val", "--split", help="val | test | all (| train)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Dice and HD95 per case and class; writes RUN_DIR/eval_<split>.json."""
    from frugalseg.eval.evaluate import evaluate_run

    results = evaluate_run(run_dir, data, split, show_progress=not quiet)
    typer.echo(_table(results, f"{run_dir} on {split}:"))
    typer.echo(f"written {Path(run_dir) / f'eval_{split}.json'}")


@app.command()
@_guard
def predict(
    run_dir: Path = typer.Argument(..., help="A finished run directory, or a model exported with `export`."),
    input: Path = typer.Argument(..., help="Input image (NIfTI)."),
    output: Path = typer.Argument(..., help="Output label map (NIfTI); same shape and affine as the input."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
) -> None:
    """Segment one image."""
    from frugalseg.eval.predict import predict_file

    predict_file(run_dir, input, output, force, report=_say)
    typer.echo(f"written {output}")


@app.command()
@_guard
def export(
    run_dir: Path = typer.Argument(..., help="A finished run directory."),
    output: Path = typer.Argument(..., help="The ONNX file to write (needs the onnx extra)."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
) -> None:
    """Export the trained network as ONNX; `predict` accepts the file in place of the run directory."""
    from frugalseg.eval.export import export_onnx

    diff = export_onnx(run_dir, output, force)
    typer.echo(f"written {output} (ONNX Runtime matches PyTorch within {diff:.1e} on a test input)")


@app.command("import-weights")
@_guard
def import_weights(
    source: Path = typer.Argument(..., help="Released weights file (read with weights_only=True)."),
    output: Path = typer.Argument(..., help="frugalseg weights file to write (for --init)."),
    format_: str = typer.Option(..., "--format", help="voco | monai-ssl | pcrlv2"),
    in_channels: int | None = typer.Option(None, "--in-channels",
                                              help="Adapt the input convolution(s) to this many image channels."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT."),
) -> None:
    """Convert released weights (VoCo, MONAI SwinUNETR SSL, PCRLv2) strictly, with a report; then `train --init`."""
    from frugalseg.nn.importers import write_imported

    report = write_imported(source, format_, output, force, in_channels)
    typer.echo(f"{report.summary()}; written {output}")
    typer.echo(f"use: frugalseg train ... --init {output} {report.use_hint()}")


@app.command()
def methods() -> None:
    """List the registered methods."""
    from frugalseg.methods.base import PRETRAIN
    from frugalseg.registry import METHODS, method_class

    for name in METHODS:
        cls = method_class(name)
        kind = "pre-train" if cls.declare(cls.Options()).kind == PRETRAIN else "train"
        about = sys.modules[cls.__module__].__doc__ or cls.__doc__ or ""  # the module says what the method is
        typer.echo(f"{name:<16} {kind:<10} {_first_sentence(about)}")


@app.command()
@_guard
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the demo's data, run and figures."),
    force: bool = typer.Option(False, "--force", help="Overwrite a previous demo folder."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Training steps (default: configs/demo.yaml)."),
) -> None:
    """The main job on synthetic phantoms: train with 2 labelled volumes, evaluate on unseen phantoms."""
    from frugalseg.run import demo as run_demo

    result = run_demo(out, force, show_progress=not quiet, report=_say, steps=steps)
    if result["eval"] is None:  # a rank other than 0 of a torchrun job
        return
    typer.echo(_table(result["eval"], "Dice on unseen test phantoms (supervised, 2 labelled volumes):"))
    typer.echo(f"figures: {out / 'learning_curve.png'}, {out / 'prediction_overlay.png'}")


@app.command()
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
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Run the few-label protocol: every recipe x N x seed, evaluated; writes csv, report and plots."""
    from frugalseg.benchmark import parse_list, run_benchmark

    rows = run_benchmark(data, parse_list(recipes, "--recipes"), parse_list(labelled, "--labelled", int),
                         parse_list(seeds, "--seeds", int), out, split, eval_data, set_ or [],
                         show_progress=not quiet, report=_say)
    _out((out / "report.md").read_text())
    _out(f"{len(rows)} cells; written {out / 'results.csv'}, {out / 'report.md'} and plots")


@app.command()
def recipes() -> None:
    """List the recipes in configs/recipes."""
    from frugalseg.recipes import available, load_recipe

    names = available()
    width = max((len(n) for n in names), default=0) + 1
    for name in names:
        typer.echo(f"{name:<{width}} {load_recipe(name).description}")


@app.command()
@_guard
def profile(
    out: Path | None = typer.Option(None, "--out", help="Also write the figures as JSON here."),
    steps: int = typer.Option(8, "--steps", help="Timed steps per config (after 2 warm-up steps)."),
    methods: str | None = typer.Option(None, "--methods", help="Comma-separated methods (default: all)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out."),
    dims: str = typer.Option("2,3", "--dims", help="Which default configs: 2, 3 or 2,3."),
    set_: list[str] | None = SetOpt,
) -> None:
    """Step time, samples/s, data wait, peak RSS and FLOP/s vs this machine's peak, per method, 2-D and 3-D.

    --set applies to every profiled config, e.g. --set train.bf16=true to time bf16 autocast.
    """
    import json

    from frugalseg.config import build_config
    from frugalseg.files import write_atomic
    from frugalseg.profile import format_table, profile_all
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
    result = profile_all(steps, chosen, dims=which, progress=_say, sets=set_ or [])
    typer.echo(format_table(result))
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(out, lambda f: f.write(json.dumps(result, indent=1).encode()))
        except OSError as exc:
            raise UserError(f"--out {out}: cannot write ({exc.strerror or exc})") from None
        typer.echo(f"written {out}")


@app.command("config")
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
