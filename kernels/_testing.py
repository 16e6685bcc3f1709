"""Test helpers shared by every op: the tolerance rule, ahead-of-time compilation for sm_80 and
sm_90 without a GPU, and the shape sweeps.

The tolerance rule is flash-attention's (tests/test_flash_attn.py): in bf16/fp16 a kernel's
error against an fp32 reference may be at most twice the error of the plain PyTorch reference
run in the same low precision, plus a small atol at the scale of the values. In fp32 both are
compared directly with an absolute plus relative tolerance.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch

# Sizes the ops must get right: odd, prime, one, and BEiT's own (197 = 14*14 + 1 tokens).
SEQ_LENS = (1, 7, 197, 257)
HEAD_DIMS = (32, 64, 80)
ODD_ROWS = (0, 1, 7, 33, 197)
LOW_PRECISION = (torch.bfloat16, torch.float16)
FP32_TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return (actual.float() - expected.float()).abs().max().item()


def assert_close(
    actual: torch.Tensor,
    reference: torch.Tensor,
    lowp_reference: torch.Tensor | None = None,
    *,
    name: str,
    dtype: torch.dtype | None = None,
    factor: float = 2.0,
    atol: float | None = None,
    rtol: float = FP32_TOLERANCE["rtol"],
) -> None:
    """Check ``actual`` against the fp32 ``reference`` with the dtype's rule.

    Args:
        actual: the kernel's output, in any dtype.
        reference: the same quantity from the reference run on fp32 inputs.
        lowp_reference: the reference run in ``actual``'s low precision; required for
            bf16/fp16, where the allowed error is ``factor`` times its error plus ``atol``.
        name: what is compared, for the failure message.
        dtype: the precision the inputs were in; by default ``actual.dtype`` (give it for
            outputs that are fp32 whatever the inputs, such as a loss).
        atol: absolute slack; by default the dtype's machine epsilon at the scale of the
            reference (fp32: 1e-5).
        rtol: relative slack for fp32 only.
    """
    assert actual.shape == reference.shape, f"{name}: shape {tuple(actual.shape)} != reference {tuple(reference.shape)}"
    error = max_error(actual, reference)
    scale = reference.float().abs().max().item() if reference.numel() else 0.0
    dtype = actual.dtype if dtype is None else dtype
    if dtype == torch.float32:
        bound = (FP32_TOLERANCE["atol"] if atol is None else atol) + rtol * scale
        detail = f"atol + rtol * max|ref| = {bound:.3g}"
    else:
        assert lowp_reference is not None, f"{name}: checking {dtype} needs the reference run in {dtype}"
        baseline = max_error(lowp_reference, reference)
        slack = torch.finfo(dtype).eps * scale + 1e-6 if atol is None else atol
        bound = factor * baseline + slack
        detail = f"{factor} x torch {dtype} error {baseline:.3g} + atol {slack:.3g}"
    assert error <= bound, f"{name}: max error {error:.3g} exceeds {detail}"


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` whose last dimension has stride 2 (same values, not contiguous)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    view.copy_(t)
    return view


# --------------------------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU needed)
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AotSpec:
    """One kernel configuration to compile: ``kernel`` is ``"module:function"`` of a jit function."""

    kernel: str
    signature: dict[str, str]  # Triton type per runtime argument, e.g. {"X": "*bf16", "N": "i32"}
    constexprs: dict[str, object]
    arch: int  # 80 (A100) or 90 (H100/H200)
    num_warps: int = 4
    num_stages: int = 3
    # Arguments the JIT would see as multiples of 16 (torch's aligned pointers, strides like 768):
    # without the hint bf16 loads are not vectorised and the k-loop is not pipelined.
    divisible_by_16: tuple[str, ...] = ()
    maxnreg: int | None = None  # ptxas's register cap per thread (triton.Config(maxnreg=...))


@dataclasses.dataclass(frozen=True)
class KernelResources:
    """What ptxas made of one kernel configuration."""

    spec: AotSpec
    registers: int
    shared_bytes: int
    spill_bytes: int  # local memory per thread: register spills (and local arrays)
    stack_bytes: int
    wgmma_count: int  # Hopper's warpgroup matrix instructions in the PTX (0: mma.sync or FMA)

    def __str__(self) -> str:
        s = self.spec
        return (
            f"{s.kernel} sm_{s.arch} {s.constexprs} warps={s.num_warps} stages={s.num_stages}: "
            f"{self.registers} registers, {self.shared_bytes} B shared, {self.spill_bytes} B spilled, "
            f"{self.stack_bytes} B stack, "
            f"{self.wgmma_count} wgmma"
        )


# Shared memory one block may use: sm_80 (A100) 163 KiB, sm_90 (H100/H200) 227 KiB, rounded down.
SHARED_LIMIT_KIB = {80: 160, 90: 224}


def assert_fits_the_sm(resources: list[KernelResources], shared_limit_kib: dict[int, int] = SHARED_LIMIT_KIB) -> None:
    """No register spills or stack, and shared memory within ``shared_limit_kib[arch]``."""
    for r in resources:
        print(r)
    spilled = [str(r) for r in resources if r.spill_bytes or r.stack_bytes]
    assert not spilled, "register spills:\n" + "\n".join(spilled)
    too_big = [str(r) for r in resources if r.shared_bytes > shared_limit_kib[r.spec.arch] * 1024]
    assert not too_big, "more shared memory than allowed:\n" + "\n".join(too_big)


def _cuobjdump() -> str:
    import triton.backends.nvidia as nvidia

    bundled = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    found = bundled if os.path.exists(bundled) else shutil.which("cuobjdump")
    if found is None:
        raise RuntimeError("cuobjdump not found: it ships with triton's NVIDIA backend or the CUDA toolkit")
    return found


def _compile_one(spec: AotSpec) -> KernelResources:
    import triton
    from triton.backends.compiler import GPUTarget

    module, name = spec.kernel.split(":")
    kernel = getattr(importlib.import_module(module), name)
    names = list(spec.signature)
    attrs = {(names.index(arg),): [["tt.divisibility", 16]] for arg in spec.divisible_by_16}
    source = triton.compiler.ASTSource(fn=kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    if spec.maxnreg is not None:
        options["maxnreg"] = spec.maxnreg
    compiled = triton.compile(source, target=GPUTarget("cuda", spec.arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True
        ).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return KernelResources(
        spec=spec,
        registers=int(fields["REG"]),
        shared_bytes=compiled.metadata.shared,
        spill_bytes=int(fields["LOCAL"]),
        stack_bytes=int(fields["STACK"]),
        wgmma_count=len(re.findall(r"^\s*wgmma\.mma_async", compiled.asm["ptx"], flags=re.MULTILINE)),
    )


def aot_compile(specs: list[AotSpec]) -> list[KernelResources]:
    """Compile Triton kernels for ``sm_<arch>`` without a GPU and read their resource usage.

    Under ``TRITON_INTERPRET=1`` every ``@triton.jit`` function in this process is an
    interpreter object, so the compilation then runs in a child process without it.
    """
    from ._dispatch import triton_interpret

    if not triton_interpret():
        return [_compile_one(spec) for spec in specs]
    request = json.dumps([dataclasses.asdict(spec) for spec in specs])
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    child = subprocess.run(
        [sys.executable, "-m", "kernels._testing"], input=request, capture_output=True, text=True, env=env
    )
    if child.returncode != 0:
        raise RuntimeError(f"ahead-of-time compilation failed:\n{child.stderr[-4000:]}")
    return [KernelResources(spec=spec, **fields) for spec, fields in zip(specs, json.loads(child.stdout), strict=True)]


def triton_dtype(dtype: torch.dtype) -> str:
    """Triton's spelling of a torch dtype in kernel signatures (``"bf16"``)."""
    return {
        torch.float32: "fp32",
        torch.bfloat16: "bf16",
        torch.float16: "fp16",
        torch.int64: "i64",
        torch.int32: "i32",
    }[dtype]


if __name__ == "__main__":  # the child process of aot_compile: specs on stdin, resources on stdout
    results = [_compile_one(AotSpec(**spec)) for spec in json.load(sys.stdin)]
    json.dump([{k: v for k, v in dataclasses.asdict(r).items() if k != "spec"} for r in results], sys.stdout)
