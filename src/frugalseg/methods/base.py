"""What every method returns, and the (structural) interface the training loop relies on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class StepOutput:
    """The loss to back-propagate and scalars to log (already detached floats or 0-d tensors)."""

    loss: torch.Tensor
    logs: dict[str, float | torch.Tensor] = field(default_factory=dict)


class Method(Protocol):
    """A method is an ``nn.Module`` with ``net`` (the network that is kept and evaluated) and:

    * ``training_step(batch, progress) -> StepOutput`` - ``progress`` in [0, 1] drives ramps and schedules;
    * optionally ``after_optimizer_step(progress)`` - e.g. an EMA teacher update;
    * ``partial_graph = True`` when some trainable parameters get no gradient in some steps (an encoder-only
      pre-training of a U-Net, a head that waits for a warm-up): DistributedDataParallel then looks for them.

    It never calls backward, steps an optimiser, moves devices or logs.
    """

    net: torch.nn.Module

    def training_step(self, batch: dict[str, torch.Tensor], progress: float) -> StepOutput: ...
