"""A stand-in for the two ``einops`` functions microsoft/unilm ``beit2/`` calls, used only when
``einops`` is not installed (the GPU machine has no network to install it).

Supports what the reference's patterns need: named axes, parenthesised groups (``(h w)``) and unit
axes (``()``); ``repeat`` adds axes that are named only on the right, with their sizes given as
keyword arguments. No ellipsis, no numeric axes.
"""

from __future__ import annotations

import math
import re

import torch

_TOKEN = re.compile(r"\(|\)|[A-Za-z_][A-Za-z0-9_]*")


def _groups(side: str) -> list[list[str]]:
    """``'b (h w) c'`` -> ``[['b'], ['h', 'w'], ['c']]``; ``'()'`` -> ``[[]]``."""
    groups: list[list[str]] = []
    open_group: list[str] | None = None
    for token in _TOKEN.findall(side):
        if token == "(":
            if open_group is not None:
                raise ValueError(f"einops_lite: nested parentheses in {side!r}")
            open_group = []
        elif token == ")":
            if open_group is None:
                raise ValueError(f"einops_lite: unbalanced parentheses in {side!r}")
            groups.append(open_group)
            open_group = None
        elif open_group is not None:
            open_group.append(token)
        else:
            groups.append([token])
    if open_group is not None:
        raise ValueError(f"einops_lite: unbalanced parentheses in {side!r}")
    return groups


def _axis_sizes(tensor: torch.Tensor, left: list[list[str]], sizes: dict[str, int], pattern: str) -> dict[str, int]:
    if len(left) != tensor.dim():
        raise ValueError(f"einops_lite: pattern {pattern!r} names {len(left)} axes; the tensor has {tensor.dim()}")
    known = dict(sizes)
    for group, length in zip(left, tensor.shape, strict=True):
        unknown = [name for name in group if name not in known]
        if len(unknown) > 1:
            raise ValueError(f"einops_lite: cannot infer the sizes of {unknown} in {pattern!r}")
        if unknown:
            known[unknown[0]] = length // math.prod(known[name] for name in group if name != unknown[0])
        if math.prod(known[name] for name in group) != length:
            raise ValueError(f"einops_lite: axis {group} of {pattern!r} does not match length {length}")
    return known


def _transform(tensor: torch.Tensor, pattern: str, sizes: dict[str, int], allow_new: bool) -> torch.Tensor:
    left_side, right_side = pattern.split("->")
    left, right = _groups(left_side), _groups(right_side)
    known = _axis_sizes(tensor, left, sizes, pattern)
    left_names = [name for group in left for name in group]
    right_names = [name for group in right for name in group]
    new = [name for name in right_names if name not in left_names]
    if (new and not allow_new) or any(name not in known for name in new):
        raise ValueError(f"einops_lite: {pattern!r} introduces axes {new} without sizes")
    if sorted(set(left_names) - set(right_names)):
        raise ValueError(f"einops_lite: {pattern!r} drops axes (reductions are not supported)")
    x = tensor.reshape([known[name] for name in left_names])
    x = x.permute([left_names.index(name) for name in right_names if name in left_names])
    for position, name in enumerate(right_names):
        if name in new:
            x = x.unsqueeze(position)
    x = x.expand([known[name] for name in right_names])
    return x.reshape([math.prod(known[name] for name in group) for group in right])


def rearrange(tensor: torch.Tensor, pattern: str, **sizes: int) -> torch.Tensor:
    """``einops.rearrange`` for patterns without ellipsis or reductions."""
    return _transform(tensor, pattern, sizes, allow_new=False)


def repeat(tensor: torch.Tensor, pattern: str, **sizes: int) -> torch.Tensor:
    """``einops.repeat``: axes named only on the right are new, of the given sizes."""
    return _transform(tensor, pattern, sizes, allow_new=True)
