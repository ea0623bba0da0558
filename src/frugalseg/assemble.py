"""The one place that assembles a stage: (method name, config, data) -> the module, its sampler and its record.

``train``, ``pretrain``, the benchmark's pre-check, ``profile`` and the method tests all come through
:func:`assemble`. It resolves the method's name once, parses its options, checks its record
(:class:`~frugalseg.methods.base.MethodSpec`) against the configuration and the data, builds the network (loading
``--init`` weights before the method copies any teacher), wraps a regulariser (SelfReg) around a training method,
and builds the sampler the record asks for. Every problem is one :class:`~frugalseg.errors.UserError` line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frugalseg.config import Config, parse_options
from frugalseg.errors import Incompatible, UserError
from frugalseg.methods.base import PRETRAIN, Method, MethodSpec


@dataclass
class Stage:
    """What :func:`~frugalseg.engine.trainer.fit` runs: the method module, its batches and its record."""

    module: Method
    sampler: Any | None  # None when assembled without data (a configuration check)
    spec: MethodSpec
    load_report: Any | None = None  # what --init loaded (frugalseg.nn.weights.LoadReport)
    spacing: list[float] | None = None  # the median voxel spacing of the volumes read (as stored, before resampling)


def declared(method: str, cfg: Config, option: str = "--method") -> tuple[type, Any, MethodSpec]:
    """The method class, its parsed options and its record under ``cfg`` (no network is built)."""
    from frugalseg.registry import method_class

    cls = method_class(method, option)
    options = parse_options(cls.Options, cfg.method)
    return cls, options, cls.declare(options)


def check_spec(method: str, spec: MethodSpec, cfg: Config, size_divisor: int = 1) -> None:
    """Refuse a configuration the record rules out, in one line naming the option to change."""
    dims = cfg.data.spatial_dims
    if cfg.data.batch_size < spec.min_batch_size:
        raise UserError(f"--method {method}: needs data.batch_size >= {spec.min_batch_size}, got {cfg.data.batch_size}")
    if dims not in spec.spatial_dims:
        allowed = spec.spatial_dims
        raise UserError(f"--method {method}: works on {'/'.join(map(str, allowed))}-D data only "
                        f"(set data.spatial_dims={allowed[0]})")
    for stream in (spec.stream, spec.unlabelled):
        if stream is not None and stream.partitions and cfg.data.batch_size % stream.partitions:
            raise UserError(f"--method {method}: data.batch_size ({cfg.data.batch_size}) must be a multiple of the "
                            f"{stream.partitions} partitions per volume")
    if spec.decoder_maps and any(int(p) % size_divisor for p in cfg.data.patch_size):
        raise UserError(f"data.patch_size {list(cfg.data.patch_size)}: --method {method} on model.name "
                        f"{cfg.model.name} needs multiples of {size_divisor}")
    if cfg.selfreg.weight > 0 and spec.kind == PRETRAIN:
        raise UserError(f"config key 'selfreg.weight': SelfReg regularises training methods, not {method}")


def assemble(method: str, cfg: Config, source, split: dict[str, Any] | None = None, seed: int = 0,
             init: Path | str | None = None) -> Stage:
    """Build the stage of ``method`` under ``cfg`` on ``source`` (a :class:`~frugalseg.data.readers.DataSource`).

    ``split`` says which cases the stage reads (``labelled_cases``, ``unlabelled_cases``; see
    :mod:`frugalseg.data.splits`); without it nothing is read and no sampler is built (a configuration check, as
    the benchmark makes for every stage before it starts). ``init`` is a weights file loaded into the network
    before the method is built, so that EMA teachers start from it.
    """
    from frugalseg.nn.weights import load_pretrained
    from frugalseg.registry import build_network

    cls, options, spec = declared(method, cfg)
    check_spec(method, spec, cfg)
    volumes = unlabelled = spacing = None
    if split is not None:  # the data first: everything that can fail on the user's input, before any work
        volumes, unlabelled, spacing = _read(spec, cfg, source, split)
    net = build_network(cfg.model, cfg.data.spatial_dims, source.in_channels, source.num_classes)
    check_spec(method, spec, cfg, getattr(net, "size_divisor", 1))
    load_report = load_pretrained(net, init, cfg.model.init_parts) if init is not None else None
    try:
        module = cls(net, options)
    except Incompatible as exc:
        raise UserError(f"--method {method}: {exc}") from None
    if cfg.selfreg.weight > 0:  # a regulariser wraps the method and declares what it declares
        from frugalseg.methods.selfreg import SelfRegularised

        try:
            module = SelfRegularised(module, cfg.selfreg.weight, cfg.selfreg.scr_weight, cfg.selfreg.ifd_weight)
        except Incompatible as exc:
            raise UserError(f"config key 'selfreg.weight': {exc}") from None
    sampler = None
    if volumes is not None:
        from frugalseg.data.sampling import build_sampler

        d = cfg.data
        try:
            sampler = build_sampler(spec, volumes, unlabelled, d.spatial_dims, d.patch_size, d.batch_size, seed,
                                    d.foreground_oversample, d.augment)
        except Incompatible as exc:
            raise UserError(f"--method {method}: {exc}") from None
    return Stage(module, sampler, spec, load_report, spacing)


def _read(spec: MethodSpec, cfg: Config, source, split: dict[str, Any]):
    """The preprocessed volumes of the stage: labelled (training) or label-free (pre-training) ones, and every
    training image without its label when the method declares an unlabelled stream."""
    import numpy as np

    from frugalseg.data.preprocess import Preprocessor

    d = cfg.data
    pre = Preprocessor(d.normalisation, tuple(d.percentiles), tuple(d.spacing) if d.spacing else None,
                       d.spatial_dims)
    spacings = []

    def read(case: str, with_label: bool):
        vol = source.load(case, with_label=with_label)
        spacings.append(vol.spacing)
        return pre(vol) if with_label else pre(vol).without_label()

    if spec.kind == PRETRAIN:
        volumes = [read(case, False) for case in split["unlabelled_cases"]]
    else:
        volumes = [read(case, True) for case in split["labelled_cases"]]
    unlabelled = None
    if spec.unlabelled is not None:
        unlabelled = [read(case, False) for case in split["unlabelled_cases"]]
    if d.spatial_dims == 3 and any(v.image.ndim != 4 for v in [*volumes, *(unlabelled or [])]):
        raise UserError(f"--data {source.root}: 2-D images cannot train a 3-D model (set data.spatial_dims=2)")
    dims = min(len(sp) for sp in spacings)
    spacing = [float(x) for x in np.median(np.array([sp[:dims] for sp in spacings]), axis=0)]
    return volumes, unlabelled, spacing
