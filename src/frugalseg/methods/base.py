"""The method contract: what a method declares, what it returns, and the one base class every method derives from.

A method is a small ``nn.Module`` that owns its student (``net``, the network that is kept and evaluated) and
whatever else it trains or averages (heads, EMA teachers, queues). It states in one frozen record,
:class:`MethodSpec`, everything the rest of the house needs to know about it — whether it reads labels, which
dimensionalities it supports, how its batches are sampled, whether some of its parameters may get no gradient —
and its options in one small frozen dataclass (``Options``), validated like the rest of the configuration. The
training loop, the samplers and the checks read the record; nothing is discovered by probing attributes.

See ``docs/contributing.md`` for how to add a method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn

from frugalseg.data.mixing import BoxSpec
from frugalseg.errors import Incompatible

__all__ = ["PRETRAIN", "TRAIN", "BoxSpec", "Incompatible", "Method", "MethodSpec", "NoOptions", "StepOutput", "Stream"]

PRETRAIN = "pretrain"
TRAIN = "train"


@dataclass(frozen=True)
class Stream:
    """How one stream of training images is sampled (2-D slices or 3-D patches, see ``data.sampling``).

    Attributes:
        views: 1, or 2 for two views of the same crops (``image`` and ``view2``).
        shared_spatial: with two views, one spatial transform for both (voxels correspond), independent intensity.
        weak_view2: with ``shared_spatial``, the second view gets no intensity augmentation (a teacher's input).
        partitions: ``S > 0`` for batches of ``batch / S`` volumes with one slice from each of their ``S``
            partitions along the slice axis (Chaitanya et al.'s G^D batches; 2-D only).
        strong_views: ``k > 0``: ``image`` is the weak view (spatial augmentation only) and ``strong1`` ..
            ``strong<k>`` are strongly perturbed copies under the same spatial transform (colour jitter, blur).
    """

    views: int = 1
    shared_spatial: bool = False
    weak_view2: bool = False
    partitions: int = 0
    strong_views: int = 0


@dataclass(frozen=True)
class MethodSpec:
    """What a method needs from the data, the loop and the checks.

    Attributes:
        kind: ``pretrain`` (every training image, labels never read) or ``train`` (the N labelled volumes).
        spatial_dims: dimensionalities the method supports.
        stream: sampling of the main stream (pre-training images, or the labelled volumes of a training method).
        unlabelled: sampling of a second stream over every training image without its label (``u_`` keys of the
            batch), for semi-supervised methods; ``None`` when the method reads labelled volumes only.
        partial_graph: some trainable parameters may get no gradient in a step (an encoder-only pre-training of a
            U-Net, a head that waits for a warm-up): distributed training then looks for them.
        decoder_maps: the method reads decoder feature maps, which must match the patch size (checked against the
            network's ``size_divisor``).
        sampler: a factory ``(volumes, patch_size, seed, spatial_dims, batch_size) -> sampler`` for views that are
            not patches (VoCo's bases, PCRLv2's sub-crops); ``None`` for the patch sampler described by ``stream``.
        boxes: random boxes added to every batch (``box``, ``box2``, ...: CutMix / copy-paste masks, see
            :class:`~frugalseg.data.mixing.BoxSpec`), or ``None``.
        min_batch_size: the smallest ``data.batch_size`` the method works with (pairs within a batch, BatchNorm
            over the batch in a head).
        network_parts: the step calls the network's ``encode`` / ``decode`` apart, not only the network as a whole.
            ``train.compile`` compiles the network's forward, which such a step would mostly not use, and a
            BatchNorm run both compiled and eagerly in one step breaks its backward (the compiled graph writes the
            running statistics the eager pass saved): such a method trains eagerly, and says so.
    """

    kind: Literal["pretrain", "train"]
    spatial_dims: tuple[int, ...] = (2, 3)
    stream: Stream = field(default_factory=Stream)
    unlabelled: Stream | None = None
    partial_graph: bool = False
    decoder_maps: bool = False
    sampler: Callable[..., Any] | None = None
    boxes: BoxSpec | None = None
    min_batch_size: int = 1
    network_parts: bool = False

    def __post_init__(self) -> None:
        if self.kind not in (PRETRAIN, TRAIN):
            raise ValueError(f"kind must be {PRETRAIN!r} or {TRAIN!r}, got {self.kind!r}")
        if self.kind == PRETRAIN and self.unlabelled is not None:
            raise ValueError("a pre-training method reads every image already: it has no unlabelled stream")


@dataclass(frozen=True)
class NoOptions:
    """A method without options."""


@dataclass
class StepOutput:
    """The loss to back-propagate and scalars to log (already detached floats or 0-d tensors)."""

    loss: torch.Tensor
    logs: dict[str, float | torch.Tensor] = field(default_factory=dict)


class Method(nn.Module):
    """Base of every method: ``net``, ``options``, ``spec`` and the two calls the loop makes.

    A subclass sets ``Options`` (a frozen dataclass with the paper's defaults; its ``__post_init__`` raises
    ``ValueError`` for a value out of range) and implements :meth:`declare` and :meth:`training_step`. It never
    calls backward, steps an optimiser, moves devices, logs, or reads the trainer.
    """

    Options: ClassVar[type] = NoOptions

    def __init__(self, net: nn.Module, options: Any = None) -> None:
        super().__init__()
        self.net = net
        self.options = options if options is not None else type(self).Options()
        if not isinstance(self.options, type(self).Options):
            raise TypeError(f"{type(self).__name__} takes {type(self).Options.__name__}, got {type(options).__name__}")
        self.spec: MethodSpec = type(self).declare(self.options)

    @classmethod
    def declare(cls, options: Any) -> MethodSpec:
        """The method's record under ``options`` (a class method: known before any network is built)."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, torch.Tensor], progress: float) -> StepOutput:
        """The loss of one step; ``progress`` in [0, 1] drives ramps and schedules."""
        raise NotImplementedError

    def after_optimizer_step(self, progress: float) -> None:
        """Called after every optimiser step (EMA teachers move here); nothing by default."""
