"""What every op module shares: its custom-op registration, input layout helpers, the split of
work over the GPU's SMs, and the launch of a Triton kernel (autotuned, or under the interpreter).

Free of Triton imports: the Triton kernels live in ``kernels/_triton/<op>.py``, imported on
the first call that runs them (:func:`triton_kernel`), so ``import kernels`` never compiles or
defines a kernel and a CPU-only install works without Triton.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from . import _dispatch


def custom_op(name: str) -> Callable:
    """``torch.library.custom_op`` for an op without mutated inputs whose one Python body serves
    CPU and CUDA tensors (the body dispatches on the backend itself)."""
    return torch.library.custom_op(name, mutates_args=(), device_types=("cpu", "cuda"))


def unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension has unit stride (what the kernels need), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def splits_to_fill(device: torch.device, programs: int, most: int, *, waves: int, cpu: int = 1) -> int:
    """How many ways to split work whose other grid axes give ``programs`` programs, so that all
    of them fill the GPU's SMs about ``waves`` times over; at most ``most``, at least 1, and
    ``cpu`` for tensors off the GPU (the interpreter)."""
    if device.type != "cuda":
        return cpu
    return max(1, min(cdiv(waves * sm_count(device), max(programs, 1)), most))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s precision: exact products for fp32 inputs (tf32 is ignored for 16-bit ones)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def launch(autotuned, kernel, grid: Callable[[dict], tuple], args: tuple, constexprs: dict, interpreter_tiles: dict):
    """Run the autotuned kernel on a GPU, or the plain one with ``interpreter_tiles`` under the
    CPU interpreter, where autotuning would only cost time."""
    if _dispatch.triton_interpret():
        meta = {**interpreter_tiles, **constexprs}
        kernel[grid(meta)](*args, **meta)
    else:
        autotuned[grid](*args, **constexprs)


def triton_kernel(op_module: str, function: str) -> Callable:
    """A table entry calling ``kernels._triton.<op_module>.<function>``, imported on first use."""

    def run(*args, **kwargs):
        return getattr(importlib.import_module(f"._triton.{op_module}", __package__), function)(*args, **kwargs)

    run.__name__ = run.__qualname__ = f"_triton.{op_module}.{function}"
    return run
