"""Input validation shared by the ops: every failure names the op, the argument, what was
expected and what was received, so that a wrong call never turns into a wrong answer."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(
    op: str,
    name: str,
    value: object,
    *,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    ndim: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Check that ``value`` is a tensor of one of ``dtypes`` with ``ndim`` dimensions."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor; got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise TypeError(f"{op}: argument '{name}' must have dtype {_names(dtypes)}; got {value.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            raise ValueError(
                f"{op}: argument '{name}' must have {' or '.join(map(str, allowed))} dimensions; "
                f"got shape {tuple(value.shape)}"
            )
    return value


def check_same_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    """Check that all given tensors live on one device and return it."""
    present = {name: t for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(present.items()))
    for name, t in present.items():
        if t.device != first.device:
            raise ValueError(
                f"{op}: argument '{name}' is on {t.device} but '{first_name}' is on {first.device}; "
                "move them to one device"
            )
    return first.device


def check_same_dtype(op: str, **tensors: torch.Tensor | None) -> torch.dtype:
    """Check that all given tensors share one dtype and return it."""
    present = {name: t for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(present.items()))
    for name, t in present.items():
        if t.dtype != first.dtype:
            raise TypeError(
                f"{op}: argument '{name}' has dtype {t.dtype} but '{first_name}' has {first.dtype}; "
                "cast them to one dtype"
            )
    return first.dtype


def check_dim_size(op: str, name: str, t: torch.Tensor, dim: int, expected: int, meaning: str) -> None:
    """Check one dimension of ``t`` against the size another argument implies."""
    if t.shape[dim] != expected:
        raise ValueError(
            f"{op}: argument '{name}' must have size {expected} in dimension {dim} ({meaning}); "
            f"got shape {tuple(t.shape)}"
        )


def check_range(op: str, name: str, value: int, low: int, high: int) -> None:
    """Check ``low <= value <= high`` for a size the kernels support."""
    if not low <= value <= high:
        raise ValueError(f"{op}: argument '{name}' must be between {low} and {high}; got {value}")
