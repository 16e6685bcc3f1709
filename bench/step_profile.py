"""Where a training step's device time goes: the profiler's kernels by category, the top kernels,
and the phase times (``beitv2_fast.train.step.phase``), as Markdown for the GPU suite's report.

On CUDA the rows are kernels (device time); on the CPU, where there are no kernels, the profiler's
operators (self CPU time), so a dry run exercises the same code.
"""

from __future__ import annotations

from collections.abc import Iterable

# In order: the first category whose patterns occur in the lower-cased name wins (our kernels
# before the generic attention and GEMM names; Triton matmul templates are GEMMs, not fusions).
CATEGORY_PATTERNS = (
    ("our attention", ("relpos_attention",)),
    (
        "masked CE",
        ("masked_linear_cross_entropy", "masked_ce", "_logits_kernel", "_finish_rows_kernel", "_grad_weight_kernel"),
    ),  # fmt: skip
    ("codebook", ("codebook",)),
    ("SDPA/flash", ("flash", "fmha", "efficient_attention", "scaled_dot_product", "cudnn_attention")),
    ("optimizer", ("adam", "multi_tensor_apply", "_foreach_", "clip_grad")),
    (
        "cuBLAS GEMMs",
        (
            "gemm",
            "cublas",
            "cutlass",
            "nvjet",
            "xmma",
            "wgmma",
            "triton_tem_",
            "aten::mm",
            "aten::addmm",
            "aten::bmm",
            "aten::baddbmm",
            "aten::convolution",
        ),
    ),  # fmt: skip
    ("inductor-fused elementwise", ("triton_poi_", "triton_red_", "triton_per_")),
)
CATEGORIES = tuple(name for name, _ in CATEGORY_PATTERNS) + ("other",)


def kernel_category(name: str) -> str:
    """The category of a kernel (or operator) name; ``other`` when none matches."""
    lowered = name.lower()
    return next((category for category, patterns in CATEGORY_PATTERNS if any(p in lowered for p in patterns)), "other")


def time_by_category(kernels: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Total time of ``(name, time)`` pairs per category, every category present (in order)."""
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for name, elapsed in kernels:
        totals[kernel_category(name)] += elapsed
    return totals


def profiled_kernels(profiler, cuda: bool) -> list[tuple[str, float]]:
    """``(name, microseconds)`` of every kernel (CUDA: device time) or operator (CPU: self time)
    recorded by a finished ``torch.profiler.profile``."""
    from torch.autograd import DeviceType

    rows = []
    for event in profiler.key_averages():
        if cuda:
            if event.device_type == DeviceType.CUDA and event.self_device_time_total > 0:
                rows.append((event.key, event.self_device_time_total))
        elif event.self_cpu_time_total > 0:
            rows.append((event.key, event.self_cpu_time_total))
    return rows


def summary_markdown(kernels: list[tuple[str, float]], steps: int, phases: dict[str, float], cuda: bool) -> str:
    """Phase times, time by category and the 15 longest kernels, per step, as Markdown."""
    what = "device time of CUDA kernels" if cuda else "self CPU time of operators (no kernels on the CPU)"
    total = sum(t for _, t in kernels) or 1.0
    lines = []
    if phases:
        lines += ["| phase | ms per step |", "|---|---|"]
        lines += [f"| {name} | {ms / steps:.2f} |" for name, ms in phases.items()]
        lines.append("")
    lines += [f"| category ({what}) | ms per step | share |", "|---|---|---|"]
    for category, elapsed in time_by_category(kernels).items():
        lines.append(f"| {category} | {elapsed / steps / 1e3:.2f} | {100 * elapsed / total:.1f}% |")
    lines += ["", "| top 15 | category | ms per step | share |", "|---|---|---|---|"]
    for name, elapsed in sorted(kernels, key=lambda row: -row[1])[:15]:
        short = name if len(name) <= 90 else name[:87] + "..."
        short = short.replace("|", "\\|")
        lines.append(
            f"| `{short}` | {kernel_category(name)} | {elapsed / steps / 1e3:.3f} | {100 * elapsed / total:.1f}% |"
        )
    return "\n".join(lines) + "\n"
