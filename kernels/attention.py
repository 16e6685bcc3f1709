"""Attention with a relative position bias shared by the batch.

Placeholder for the fused op of issue 3: the public signature is final, the body runs the
plain PyTorch definition from ``kernels/reference.py`` until the Triton kernels land.
"""

from __future__ import annotations

import torch

from . import reference
from .reference import relative_position_index

__all__ = ["relative_position_index", "relpos_attention", "relpos_bias"]


def relpos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v`` for ``q, k, v [B, H, N, Dh]`` and ``bias [H, N, N]``
    (or ``[1, H, N, N]``) broadcast over the batch; ``scale`` defaults to ``Dh ** -0.5``."""
    return reference.relpos_attention(q, k, v, bias, scale)


def relpos_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The bias ``[H, N, N]`` gathered from ``table [(2h-1)(2w-1)+3, H]`` by ``index [N, N]``."""
    return reference.relpos_bias(table, index)
