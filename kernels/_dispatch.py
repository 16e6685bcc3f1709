"""Backend selection for the ops in this package.

Every op module declares one table, ``IMPLEMENTATIONS``: backend name -> :class:`Implementation`
(its forward and backward callables and an availability test). The backends are the Triton
kernels, the optional CUDA C++ extension built from ``csrc/`` and the plain PyTorch path; an op
lists those it has. ``auto`` picks the first available one of :data:`PREFERENCE`;
``BEITV2_KERNELS`` sets the starting value and :func:`set_backend` changes it (also as a context
manager). CPU tensors always take the PyTorch path, except that the Triton kernels run on them
under ``TRITON_INTERPRET=1`` when the backend is ``triton`` (how CI tests the kernels without a GPU).

Adding a backend: its name in :data:`BACKENDS` and :data:`PREFERENCE` with a probe here, one
entry in each op's table, and the ``backend`` fixture of ``tests/conftest.py``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from collections.abc import Callable

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")
PREFERENCE = ("triton", "cuda", "torch")  # what "auto" picks on CUDA tensors: the first available
ENV_VAR = "BEITV2_KERNELS"


def _backend_from_env() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(
            f"environment variable {ENV_VAR}={value!r} is not a kernel backend; "
            f"expected one of {', '.join(BACKENDS)} (or unset it for 'auto')"
        )
    return value


_backend = _backend_from_env()


def triton_interpret() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _probe_triton() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (it ships with CUDA builds of torch)"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken install must not break `import kernels`
        return False, f"triton failed to import: {exc}"
    return True, f"triton {triton.__version__}"


def _probe_cuda_extension() -> tuple[bool, str]:
    try:
        importlib.import_module("kernels._C")
    except ImportError as exc:
        return False, (
            f"the CUDA extension kernels._C is not built ({exc}); build it with "
            "BEITV2_BUILD_CUDA=1 pip install --no-build-isolation -e ."
        )
    if not hasattr(torch.ops, "beitv2_cuda"):
        return False, "kernels._C loaded but registered no beitv2_cuda ops"
    return True, "kernels._C (csrc/) is built"


TRITON_AVAILABLE, TRITON_STATUS = _probe_triton()


def _patch_interpreter_bf16_dot() -> None:
    """Make ``tl.dot`` on bfloat16 operands correct in Triton's CPU interpreter.

    The interpreter stores bf16 as uint16 bit patterns and its ``create_dot`` multiplies those
    integers (seen in triton 3.8). Widening bf16 to fp32 is exact, so the patched product is
    what a GPU computes with fp32 accumulation. Only active under ``TRITON_INTERPRET=1``.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot
    if getattr(original, "_beitv2_patched", False):
        return

    def widen(handle):
        if handle.dtype != tl.bfloat16:
            return handle
        as_fp32 = (handle.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(as_fp32, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot._beitv2_patched = True
    interpreter.InterpreterBuilder.create_dot = create_dot


if TRITON_AVAILABLE and triton_interpret():
    _patch_interpreter_bf16_dot()
CUDA_EXTENSION_AVAILABLE, CUDA_EXTENSION_STATUS = _probe_cuda_extension()


def triton_status() -> tuple[bool, str]:
    """Availability test of the Triton backend."""
    return TRITON_AVAILABLE, TRITON_STATUS


def cuda_extension_status(op: str) -> Callable[[], tuple[bool, str]]:
    """Availability test of the CUDA C++ backend of ``op`` (``torch.ops.beitv2_cuda.<op>``)."""

    def status() -> tuple[bool, str]:
        if not CUDA_EXTENSION_AVAILABLE:
            return False, CUDA_EXTENSION_STATUS
        if not hasattr(torch.ops.beitv2_cuda, op):
            return False, f"kernels._C registers no beitv2_cuda::{op}; rebuild it from csrc/"
        return True, CUDA_EXTENSION_STATUS

    return status


def _always() -> tuple[bool, str]:
    return True, "plain PyTorch"


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One backend's kernels of an op: what the op's custom ops call, and whether they can run here."""

    forward: Callable
    backward: Callable | None = None  # None where the op's backward is backend-independent
    available: Callable[[], tuple[bool, str]] = _always


def get_backend() -> str:
    """The backend requested: one of ``auto``, ``triton``, ``cuda``, ``torch``."""
    return _backend


def _check_available(backend: str) -> None:
    if backend == "triton" and not TRITON_AVAILABLE:
        raise RuntimeError(f"kernel backend 'triton' is unavailable: {TRITON_STATUS}")
    if backend == "cuda" and not CUDA_EXTENSION_AVAILABLE:
        raise RuntimeError(f"kernel backend 'cuda' is unavailable: {CUDA_EXTENSION_STATUS}")


class set_backend:
    """Select the kernel backend (process-wide: autograd runs backward passes on its own threads).

    Works as a plain call, ``kernels.set_backend("triton")``, and as a context manager,
    ``with kernels.set_backend("torch"): ...``, which restores the previous backend on exit.

    Args:
        backend: ``"auto"`` (the fastest available), ``"triton"``, ``"cuda"`` (the C++
            extension from ``csrc/``) or ``"torch"`` (plain PyTorch, the reference arithmetic).
    """

    def __init__(self, backend: str):
        if not isinstance(backend, str) or backend.lower() not in BACKENDS:
            raise ValueError(f"set_backend: argument 'backend' must be one of {', '.join(BACKENDS)}; got {backend!r}")
        backend = backend.lower()
        _check_available(backend)
        global _backend
        self._previous, _backend = _backend, backend

    def __enter__(self) -> set_backend:
        return self

    def __exit__(self, *exc_info) -> None:
        global _backend
        _backend = self._previous


def resolve(device: torch.device, implementations: dict[str, Implementation]) -> str:
    """The backend an op with ``implementations`` runs for tensors on ``device``.

    ``auto`` skips backends the op lacks or that are unavailable; an explicit request for one
    the op lacks raises.
    """
    backend = get_backend()
    if device.type != "cuda":
        interpreted = backend == "triton" and triton_interpret() and "triton" in implementations
        return "triton" if interpreted else "torch"
    if backend == "auto":
        for name in PREFERENCE:
            if name == "triton" and triton_interpret():
                continue  # the interpreter is for tests on the CPU, never the fast path
            if name in implementations and implementations[name].available()[0]:
                return name
    if backend not in implementations:
        raise RuntimeError(
            f"kernel backend {backend!r} has no version of this op; use one of {', '.join(implementations)} or 'auto'"
        )
    available, reason = implementations[backend].available()
    if not available:
        raise RuntimeError(f"kernel backend {backend!r} is unavailable: {reason}")
    return backend


def select(device: torch.device, implementations: dict[str, Implementation]) -> Implementation:
    """The table entry :func:`resolve` chooses."""
    return implementations[resolve(device, implementations)]


def explain(device_type: str, implementations: dict[str, Implementation]) -> tuple[str, str]:
    """``(implementation, reason)`` for the environment report."""
    backend = get_backend()
    if device_type == "cpu":
        if backend == "triton" and triton_interpret() and "triton" in implementations:
            return "triton", "backend 'triton' with TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors"
        return "torch", "CPU tensors use the chunked PyTorch kernel"
    if not torch.cuda.is_available():
        return "-", "no CUDA device visible"
    try:
        chosen = resolve(torch.device("cuda"), implementations)
    except RuntimeError as exc:
        return "error", str(exc)
    if chosen == "torch" and backend != "torch":
        return chosen, f"backend={backend!r}; no faster backend is available"
    return chosen, f"backend={backend!r}; {implementations[chosen].available()[1]}"
