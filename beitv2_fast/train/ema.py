"""An exponential moving average of the trained weights (``--model-ema``, timm's ``ModelEma`` in the
official fine-tuning)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class WeightEma:
    """``average = decay * average + (1 - decay) * weight`` after each optimizer step, starting
    from the weights the run starts with.

    The averages are tensors like the weights (DTensor shards under FSDP2), not a copy of the
    module: evaluating or exporting them swaps them into the (compiled, sharded) model, and the
    checkpoint saves them sharded. Frozen weights never change, so only trained ones are kept.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.weights = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.averages = {name: p.detach().clone() for name, p in self.weights.items()}

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(list(self.averages.values()), list(self.weights.values()), 1.0 - self.decay)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The averages by name, for the checkpoint (loaded in place on resume)."""
        return {f"model_ema.{name}": average for name, average in self.averages.items()}

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the averages inside the block, its own weights again after it."""
        with torch.no_grad():
            own = {name: p.detach().clone() for name, p in self.weights.items()}
            for name, p in self.weights.items():
                p.copy_(self.averages[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.weights.items():
                    p.copy_(own[name])
