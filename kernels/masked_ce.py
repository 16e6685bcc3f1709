"""Fused linear head + cross-entropy on the masked rows.

Placeholder for the fused op of issue 4: the public signature is final, the body runs the
plain PyTorch definition from ``kernels/reference.py`` until the Triton kernels land.
"""

from __future__ import annotations

import torch

from . import reference


def masked_linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, num_correct)`` of ``cross_entropy(x @ weight.T + bias, target)`` for ``x [M, C]``,
    ``weight [V, C]``, ``bias [V]`` or None and int64 ``target [M]``."""
    return reference.masked_linear_cross_entropy(x, weight, bias, target, ignore_index, reduction)
