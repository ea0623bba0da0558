"""Typed configuration: dataclass defaults <- preset YAML <- ``--config`` file <- ``--set key=value``.

Unknown keys and wrongly typed values are rejected with a :class:`~frugalseg.errors.UserError` naming the key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from frugalseg.errors import OptionError, UserError


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 floats: ``1e-3`` is a number (PyYAML's YAML 1.1 reads it as the string '1e-3')."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


@dataclass
class AugmentConfig:
    """Batched spatial and intensity augmentation (one ``affine_grid`` + ``grid_sample`` per batch)."""

    rotate_degrees: float = 15.0
    scale: list[float] = field(default_factory=lambda: [0.85, 1.25])
    flip: bool = False
    elastic: float = 0.0
    gamma: list[float] = field(default_factory=lambda: [0.7, 1.5])
    brightness: float = 0.1
    contrast: list[float] = field(default_factory=lambda: [0.75, 1.25])
    noise_std: float = 0.05
    probability: float = 0.8
    # the strong views of semi-supervised methods (UniMatch's colour jitter and blur, on grey images)
    strong_probability: float = 0.8
    strong_brightness: float = 0.5
    strong_contrast: float = 0.5
    blur_probability: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])


@dataclass
class DataConfig:
    """How volumes become training batches."""

    spatial_dims: int = 2
    patch_size: list[int] = field(default_factory=lambda: [160, 160])
    batch_size: int = 16
    normalisation: str = "zscore"
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    spacing: list[float] | None = None
    foreground_oversample: float = 0.33
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # background processes that make training batches ahead of the step using them (0: the training process
    # makes each batch when the step asks for it); the batches are the same either way. "auto" = 1 where a core
    # would otherwise idle (training on a GPU, or fewer training threads than cores), 0 where the training threads
    # use every core: there a worker takes its time from the step (docs/results.md, "Background data workers")
    workers: int | str = "auto"


@dataclass
class ModelConfig:
    """Network choice and size."""

    name: str = "unet"
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 320])
    skip: bool = True
    norm: str = "batch"
    dropout: float = 0.0
    swin_feature_size: int = 24
    swin_v2: bool = True
    # which tensors of the --init weights are loaded: every one that matches by name and shape, or the encoder's
    # only (a pre-trained decoder of another layout, e.g. PCRLv2's skip-less one, would otherwise load in part)
    init_parts: str = "all"


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (linear warm-up then cosine / poly / constant)."""

    name: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 1e-4
    momentum: float = 0.99
    schedule: str = "poly"
    warmup_steps: int = 50
    poly_power: float = 0.9
    # AdamW as PyTorch's fused kernel (one pass over each tensor instead of one per operation): the same update to
    # rounding, ~2x faster (docs/results.md, "AdamW in one pass"); false = the per-operation AdamW of earlier versions
    fused: bool = True


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 2000
    accumulate: int = 1
    grad_clip: float = 12.0
    # bf16 autocast (weights stay fp32): "auto" = where the hardware multiplies bf16 (a CUDA GPU with bf16, a CPU
    # with AVX512-BF16 or AMX), fp32 elsewhere. The paired Dice check on ACDC and Hippocampus (docs/results.md, "bf16
    # by default where the hardware multiplies it") found bf16 within the seed spread of fp32, at ~2x the steps/min
    precision: str = "auto"
    # compile the network's forward and backward with torch.compile (inductor); falls back to eager, with a note,
    # where compilation is unavailable (no C compiler); operators it cannot trace run eagerly; a training step or a
    # validation whose compilation fails stops the run with one line. Methods whose step calls the network's encoder
    # and decoder apart (byol, gcl, lcl, patchcl, pcrlv2, unimatch, voco) train eagerly, with a note
    compile: bool = False
    channels_last: bool = True
    log_every: int = 10
    checkpoint_every: int = 250
    num_threads: int = 0
    deterministic: bool = False
    # mean Dice on the validation split every K steps (0 = never), logged and plotted beside the loss; which
    # weights become model.pt: the last (default: what a benchmark reports) or the best on validation
    val_every: int = 0
    keep: str = "last"


@dataclass
class EvalConfig:
    """Inference settings used by ``evaluate`` and ``predict``."""

    sw_overlap: float = 0.5
    sw_batch_size: int = 4
    slice_batch_size: int = 16


@dataclass
class SelfRegConfig:
    """SelfReg-UNet regulariser (Zhu et al., MICCAI 2024) on top of any training method with a U-Net; 0 = off."""

    weight: float = 0.0
    scr_weight: float = 1.0
    ifd_weight: float = 1.0


@dataclass
class Config:
    """A resolved run configuration (written to ``RUN_DIR/config.yaml``)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    method: dict[str, Any] = field(default_factory=dict)
    selfreg: SelfRegConfig = field(default_factory=SelfRegConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def configs_dir() -> Path:
    """The folder of shipped YAML files (inside the wheel, else the source checkout)."""
    packaged = Path(__file__).resolve().parent / "configs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "configs"


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check (and gently coerce: int -> float) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is Any:
        return True, value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            return False, value
        out = []
        for item in value:
            ok, v = _type_ok(item, inner)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if origin is dict:
        return isinstance(value, dict), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, int | float):
            return True, float(value)
        return False, value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _merge(obj: Any, updates: dict[str, Any], prefix: str, source: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise UserError(f"{source}: unknown config key '{dotted}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"{source}: config key '{dotted}' must be a mapping, got {value!r}")
            _merge(current, value, dotted + ".", source)
            continue
        if key == "method" and isinstance(value, dict):
            merged = dict(current)
            merged.update(value)
            setattr(obj, key, merged)
            continue
        ok, coerced = _type_ok(value, hints[key])
        if not ok:
            tname = getattr(hints[key], "__name__", str(hints[key])).replace("typing.", "")
            raise UserError(f"{source}: config key '{dotted}' expects {tname}, got {value!r}")
        setattr(obj, key, coerced)


def parse_options(cls: type, values: dict[str, Any], prefix: str = "method") -> Any:
    """Build a method's options dataclass ``cls`` from a config mapping: unknown keys, wrongly typed and out-of-range
    values are refused in one line naming ``<prefix>.<key>``."""
    if not isinstance(values, dict):
        raise UserError(f"config key '{prefix}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            known = ", ".join(names) or "none: this method has no options"
            raise UserError(f"unknown config key '{prefix}.{key}' (known: {known})")
        ok, coerced = _type_ok(value, hints[key])
        if not ok:
            tname = getattr(hints[key], "__name__", str(hints[key])).replace("typing.", "")
            raise UserError(f"config key '{prefix}.{key}' expects {tname}, got {value!r}")
        kwargs[key] = coerced
    try:
        return cls(**kwargs)
    except OptionError as exc:
        raise UserError(f"config key '{prefix}.{exc.option}' {exc.reason}") from None


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def parse_set(items: list[str]) -> list[dict[str, Any]]:
    """Parse ``--set a.b=value`` items (values are YAML scalars/lists) into nested dicts."""
    parsed = []
    for item in items:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise UserError(f"--set {item!r}: empty key")
        try:
            value = _load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed.append(_nest(key, value))
    return parsed


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, turning any problem into a one-line :class:`UserError`."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UserError(f"{path}: cannot read config file ({exc.strerror or exc})") from None
    try:
        data = _load(text) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must hold a mapping of keys")
    return data


def preset_path(spatial_dims: int) -> Path:
    return configs_dir() / f"default-{spatial_dims}d.yaml"


def dataset_preset_path(data_format: str) -> Path:
    return configs_dir() / f"dataset-{data_format}.yaml"


def method_preset_path(method: str) -> Path:
    return configs_dir() / f"method-{method}.yaml"


def build_config(
    spatial_dims: int,
    config_file: Path | None = None,
    overrides: list[str] | None = None,
    extra: list[dict[str, Any]] | None = None,
    data_format: str | None = None,
    method: str | None = None,
) -> Config:
    """Resolve a :class:`Config` from the default preset for ``spatial_dims``, a file and overrides.

    Order (later wins): dataclass defaults, ``configs/default-{2,3}d.yaml``, ``configs/dataset-<format>.yaml``
    when it exists for the data's layout (only if the run keeps that layout's default dimensionality),
    ``configs/method-<method>.yaml`` when it exists, ``extra`` mappings (e.g. a recipe stage), ``config_file``,
    ``--set`` overrides. A file or ``--set`` that sets
    ``data.spatial_dims`` switches the preset first.
    """
    default_dims = spatial_dims
    layers: list[tuple[str, dict[str, Any]]] = []
    for item in extra or []:
        layers.append(("recipe", item))
    if config_file is not None:
        layers.append((str(config_file), read_yaml(config_file)))
    sets = parse_set(overrides or [])
    for item in sets:
        layers.append(("--set", item))
    for _, layer in layers:
        dims = layer.get("data", {}).get("spatial_dims") if isinstance(layer.get("data"), dict) else None
        if dims is not None:
            if dims not in (2, 3):
                raise UserError(f"config key 'data.spatial_dims' must be 2 or 3, got {dims!r}")
            spatial_dims = dims
    cfg = Config()
    _merge(cfg, read_yaml(preset_path(spatial_dims)), "", str(preset_path(spatial_dims).name))
    if data_format is not None and spatial_dims == default_dims and dataset_preset_path(data_format).is_file():
        _merge(cfg, read_yaml(dataset_preset_path(data_format)), "", dataset_preset_path(data_format).name)
    if method is not None and method_preset_path(method).is_file():
        _merge(cfg, read_yaml(method_preset_path(method)), "", method_preset_path(method).name)
    for source, layer in layers:
        _merge(cfg, layer, "", source)
    validate(cfg)
    if method is not None:  # the method's options, typed and checked like the rest
        from frugalseg.registry import method_class

        parse_options(method_class(method).Options, cfg.method)
    return cfg


def config_from_dict(data: dict[str, Any], source: str = "config.yaml") -> Config:
    """Rebuild a :class:`Config` saved in a run directory (runs recorded ``train.bf16`` before ``train.precision``
    replaced it: read as the precision it meant)."""
    train = data.get("train") if isinstance(data, dict) else None
    if isinstance(train, dict) and "bf16" in train:
        train = {k: v for k, v in train.items() if k != "bf16"}
        train.setdefault("precision", "bf16" if data["train"]["bf16"] else "fp32")
        data = {**data, "train": train}
    cfg = Config()
    _merge(cfg, data, "", source)
    return cfg


_CHOICES = {
    "data.normalisation": ("zscore", "percentile", "minmax", "none", "ct:abdomen", "ct:head-neck", "ct:chest"),
    "model.norm": ("instance", "batch"),
    "model.init_parts": ("all", "encoder"),
    "optim.name": ("adamw", "sgd"),
    "optim.schedule": ("cosine", "poly", "constant"),
    "train.keep": ("last", "best"),
    "train.precision": ("auto", "fp32", "bf16"),
}


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    values = {
        "data.normalisation": cfg.data.normalisation,
        "model.norm": cfg.model.norm,
        "model.init_parts": cfg.model.init_parts,
        "optim.name": cfg.optim.name,
        "optim.schedule": cfg.optim.schedule,
        "train.keep": cfg.train.keep,
        "train.precision": cfg.train.precision,
    }
    for key, value in values.items():
        if value not in _CHOICES[key]:
            raise UserError(f"config key '{key}' must be one of {', '.join(_CHOICES[key])}, got {value!r}")
    if cfg.data.spatial_dims not in (2, 3):
        raise UserError(f"config key 'data.spatial_dims' must be 2 or 3, got {cfg.data.spatial_dims}")
    if len(cfg.data.patch_size) != cfg.data.spatial_dims:
        raise UserError(
            f"config key 'data.patch_size' needs {cfg.data.spatial_dims} values for spatial_dims="
            f"{cfg.data.spatial_dims}, got {cfg.data.patch_size}"
        )
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "train.steps": cfg.train.steps,
        "train.accumulate": cfg.train.accumulate,
        "train.log_every": cfg.train.log_every,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "optim.lr": cfg.optim.lr,
    }
    if cfg.train.val_every < 0:
        raise UserError(f"config key 'train.val_every' must be 0 (off) or positive, got {cfg.train.val_every}")
    if cfg.train.keep == "best" and cfg.train.val_every == 0:
        raise UserError("config key 'train.keep': best needs validation along the way (set train.val_every)")
    if cfg.data.workers != "auto" and (isinstance(cfg.data.workers, str) or cfg.data.workers < 0):
        raise UserError(f"config key 'data.workers' must be auto, 0 (none) or a positive number, "
                        f"got {cfg.data.workers!r}")
    if cfg.selfreg.weight < 0:
        raise UserError(f"config key 'selfreg.weight' must be 0 (off) or positive, got {cfg.selfreg.weight}")
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"config key '{key}' must be positive, got {value}")
    if any(p <= 0 for p in cfg.data.patch_size):
        raise UserError(f"config key 'data.patch_size' must be positive, got {cfg.data.patch_size}")
    if len(cfg.model.channels) < 2:
        raise UserError("config key 'model.channels' needs at least 2 levels")
    n_spacing = (2, 3) if cfg.data.spatial_dims == 2 else (3,)
    if cfg.data.spacing is not None and (
        len(cfg.data.spacing) not in n_spacing or any(s <= 0 for s in cfg.data.spacing)
    ):
        raise UserError(f"config key 'data.spacing' must be {' or '.join(map(str, n_spacing))} positive numbers, "
                        f"got {cfg.data.spacing}")


def save_config(cfg: Config, path: Path) -> None:
    from frugalseg.files import write_atomic

    write_atomic(path, lambda f: f.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode()))
