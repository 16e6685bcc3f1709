"""Kernel benchmarks: each op against the unfused baselines, measured side by side in one run.

    python bench/kernels.py codebook                  # BEiT v2 shape: M = 256 x 196, K = 8192, D = 32
    python bench/kernels.py codebook --m 4096 --dtype fp32
    python bench/kernels.py masked_ce                 # MIM head fwd+bwd: M = 256 x 75, C = 768, V = 8192
    python bench/kernels.py masked_ce --c 1024        # ViT-L
    python bench/kernels.py attention                 # fwd, bwd, fwd+bwd: B = 256, H = 12, N = 197, Dh = 64
    python bench/kernels.py attention --batch 128 --heads 16   # ViT-L
    python bench/kernels.py attention --batch 4       # on the CPU (fp32)

Times are medians with 20th/80th percentiles (``triton.testing.do_bench`` on CUDA,
``torch.utils.benchmark`` on the CPU). Peak memory is the extra memory one call needs beyond
its inputs: ``torch.cuda.max_memory_allocated`` on CUDA, the process's peak resident set
(VmHWM, reset before the call, in a fresh process per provider) on the CPU. Every row is
printed and appended to ``bench/results/kernels.csv`` with the device, versions, commit and date.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import functools
import multiprocessing
import os
import platform
import subprocess
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402
from kernels import _dispatch, reference  # noqa: E402

RESULTS_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kernels.csv")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class Case:
    """One op at one shape: the providers to time and the work they do."""

    op: str
    shape: str
    dtype: str
    providers: dict[str, Callable[[], object]]
    bytes_moved: int  # the minimum traffic: read the inputs once, write the outputs once
    flops: int
    baseline: str  # the provider speed-ups are measured against


# --------------------------------------------------------------------------------------------
# Codebook lookup
# --------------------------------------------------------------------------------------------
def distance_argmin(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The reference's lookup (microsoft/unilm beit2/norm_ema_quantizer.py): the full squared
    distance matrix, then argmin."""
    z = F.normalize(z, dim=-1)
    d = z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * torch.einsum("md,kd->mk", z, codebook)
    return d.argmin(dim=1)


def codebook_case(args, device: torch.device) -> Case:
    dtype = DTYPES[args.dtype]
    z = torch.randn(args.m, args.d, device=device, dtype=dtype)
    codebook = F.normalize(torch.randn(args.k, args.d, device=device), dim=-1).to(dtype)
    providers = {
        "distance+argmin (unilm)": lambda: distance_argmin(z, codebook),
        "matmul+argmax": lambda: reference.codebook_lookup(z, codebook),
    }
    if device.type == "cuda":
        compiled = torch.compile(distance_argmin)
        providers["torch.compile(distance+argmin)"] = lambda: compiled(z, codebook)
        available = {"triton": _dispatch.TRITON_AVAILABLE, "cuda": _dispatch.CUDA_EXTENSION_AVAILABLE, "torch": True}
        for backend in (name for name, ok in available.items() if ok):
            providers[f"ours[{backend}]"] = _with_backend(backend, lambda: kernels.codebook_lookup(z, codebook))
    else:
        providers["ours[torch, chunked]"] = lambda: kernels.codebook_lookup(z, codebook)
    element = torch.finfo(dtype).bits // 8
    return Case(
        op="codebook",
        shape=f"M={args.m} K={args.k} D={args.d}",
        dtype=args.dtype,
        providers=providers,
        bytes_moved=(args.m + args.k) * args.d * element + args.m * (8 + 4),
        flops=2 * args.m * args.k * args.d,
        baseline="distance+argmin (unilm)",
    )


def _with_backend(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with kernels.set_backend(backend):
            return fn()

    return run


# --------------------------------------------------------------------------------------------
# Masked linear cross-entropy (forward + backward)
# --------------------------------------------------------------------------------------------
def _forward_backward(loss_fn: Callable, *leaves: torch.Tensor) -> Callable[[], object]:
    """One training step of the head: forward, backward, then drop the gradients so that each
    call allocates (and the peak counts) them afresh."""

    def step():
        loss = loss_fn(*leaves)
        loss = loss[0] if isinstance(loss, tuple) else loss
        loss.backward()
        for leaf in leaves:
            leaf.grad = None

    return step


def _with_gradient_in_forward(enabled: bool, fn: Callable[[], object]) -> Callable[[], object]:
    from kernels import masked_ce

    def run():
        previous, masked_ce.GRADIENT_IN_FORWARD = masked_ce.GRADIENT_IN_FORWARD, enabled
        try:
            return fn()
        finally:
            masked_ce.GRADIENT_IN_FORWARD = previous

    return run


def masked_ce_case(args, device: torch.device) -> Case:
    dtype = DTYPES[args.dtype]
    m, c, v = args.m, args.c, args.v
    x = torch.randn(m, c, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, c, device=device) / c**0.5).to(dtype).requires_grad_()
    bias = torch.zeros(v, device=device, dtype=dtype, requires_grad=True)
    target = torch.randint(0, v, (m,), device=device)

    def ours(a, w, b):
        return kernels.masked_linear_cross_entropy(a, w, b, target)

    def unfused(a, w, b):  # the reference MIM loss: logits, fp32 cross-entropy, argmax for the accuracy
        return reference.masked_linear_cross_entropy(a, w, b, target)

    leaves = (x, weight, bias)
    providers = {"linear+cross_entropy (reference)": _forward_backward(unfused, *leaves)}
    if device.type == "cuda":
        providers["torch.compile(reference)"] = _forward_backward(torch.compile(unfused), *leaves)
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            providers["Liger fused_linear_cross_entropy"] = _forward_backward(
                lambda a, w, b: liger_fused_linear_cross_entropy(a, w, target, bias=b), *leaves
            )
        except ImportError:
            pass
        try:
            from cut_cross_entropy import linear_cross_entropy

            providers["Cut Cross-Entropy"] = _forward_backward(
                lambda a, w, b: linear_cross_entropy(a, w, target, bias=b), *leaves
            )
        except ImportError:
            pass
        available = {"triton": _dispatch.TRITON_AVAILABLE, "torch": True}
        for backend in (name for name, ok in available.items() if ok):
            step = _with_backend(backend, _forward_backward(ours, *leaves))
            providers[f"ours[{backend}]"] = _with_gradient_in_forward(True, step)
            providers[f"ours[{backend}, recompute in backward]"] = _with_gradient_in_forward(False, step)
    else:
        providers["ours[torch, chunked]"] = _with_gradient_in_forward(True, _forward_backward(ours, *leaves))
        providers["ours[torch, chunked, recompute in backward]"] = _with_gradient_in_forward(
            False, _forward_backward(ours, *leaves)
        )
    element = torch.finfo(dtype).bits // 8
    return Case(
        op="masked_ce",
        shape=f"M={m} C={c} V={v} fwd+bwd",
        dtype=args.dtype,
        providers=providers,
        # read x, weight, bias and target, write their gradients
        bytes_moved=2 * (m * c + v * c + v) * element + m * 8,
        flops=6 * m * c * v,  # logits, dlogits @ weight, dlogits^T @ x
        baseline="linear+cross_entropy (reference)",
    )


# --------------------------------------------------------------------------------------------
# Attention with a relative position bias shared by the batch: forward, backward, both
# --------------------------------------------------------------------------------------------
def _sdpa_with_backend(backend):
    from torch.nn.attention import sdpa_kernel

    def attend(q, k, v, bias):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias[None])

    return attend


def _flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention)

    def attend(q, k, v, bias):
        return compiled(q, k, v, score_mod=lambda score, b, h, q_idx, kv_idx: score + bias[h, q_idx, kv_idx])

    return attend


def _xformers_attention():
    import xformers.ops as xops

    def attend(q, k, v, bias):
        # xformers wants [B, N, H, Dh], a full [B, H, N, N] bias when it needs its gradient (no
        # broadcast) and rows aligned to 8 elements: the copies a user of it would make.
        b, h, n, _ = q.shape
        padded = F.pad(bias, (0, -n % 8)).expand(b, -1, -1, -1).contiguous()[..., :n]
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), padded)
        return out.transpose(1, 2)

    return attend


def _attention_passes(attend, q, k, v, bias) -> dict[str, Callable[[], object]]:
    """Forward (recording for the backward, as in training), backward alone (of one retained
    forward) and forward + backward of ``attend``; gradients are dropped after each call."""
    leaves = [t for t in (q, k, v, bias) if t is not None]
    grad_out = torch.randn_like(q)
    retained = []

    def drop_grads():
        for leaf in leaves:
            leaf.grad = None

    def forward():
        return attend(q, k, v, bias)

    def backward():
        if not retained:
            retained.append(attend(q, k, v, bias))
        retained[0].backward(grad_out, retain_graph=True)
        drop_grads()

    def forward_backward():
        attend(q, k, v, bias).backward(grad_out)
        drop_grads()

    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward_backward}


def attention_case(args, device: torch.device) -> list[Case]:
    dtype = DTYPES[args.dtype]
    b, h, n, d = args.batch, args.heads, args.seq, args.head_dim
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    bias = torch.randn(h, n, n, device=device, dtype=dtype).requires_grad_()

    def ours(backend: str, deterministic: bool = False):
        def attend(*inputs):
            with kernels.set_backend(backend):
                return kernels.relpos_attention(*inputs, deterministic=deterministic)

        return attend

    def sdpa_float_mask(qq, kk, vv, bb):  # what timm's Beit does
        return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=bb[None])

    def sdpa_no_bias(qq, kk, vv, bb):
        return F.scaled_dot_product_attention(qq, kk, vv)

    # name -> (a function making the attention function, whether it takes the bias). A provider
    # that fails here (not installed, backend refused) is reported and left out.
    candidates = {
        "eager (unilm)": (lambda: reference.relpos_attention, True),
        "SDPA float mask": (lambda: sdpa_float_mask, True),
    }
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend

        for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
            candidates[f"SDPA float mask [{backend.name.lower()}]"] = (
                functools.partial(_sdpa_with_backend, backend),
                True,
            )
        candidates["FlexAttention score_mod (compiled)"] = (_flex_attention, True)
        candidates["xformers (bias expanded)"] = (_xformers_attention, True)
        flash = functools.partial(_sdpa_with_backend, SDPBackend.FLASH_ATTENTION)
        candidates["SDPA flash, no bias (ceiling)"] = (flash, False)
        candidates["ours[triton]"] = (lambda: ours("triton"), True)
        candidates["ours[triton, deterministic]"] = (lambda: ours("triton", deterministic=True), True)
        if _dispatch.CUDA_EXTENSION_AVAILABLE:
            candidates["ours[cuda]"] = (lambda: ours("cuda"), True)
    else:
        candidates["SDPA, no bias (ceiling)"] = (lambda: sdpa_no_bias, False)
    candidates["ours[torch]"] = (lambda: ours("torch"), True)

    providers = {name: {} for name in ("fwd", "bwd", "fwd+bwd")}
    for name, (make, takes_bias) in candidates.items():
        try:
            passes = _attention_passes(make(), q, k, v, bias if takes_bias else None)
            passes["fwd+bwd"]()  # compiles, and proves the provider runs here
        except Exception as exc:  # noqa: BLE001 - an unavailable baseline is reported, not fatal
            print(f"attention: skipping {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue
        for pass_name, fn in passes.items():
            providers[pass_name][name] = fn

    element = torch.finfo(dtype).bits // 8
    head_bytes = b * h * n * d * element
    bias_bytes = h * n * n * element
    forward_bytes = 4 * head_bytes + bias_bytes + b * h * n * 4  # q, k, v, bias in; out, LSE out
    backward_bytes = 8 * head_bytes + 2 * bias_bytes + b * h * n * 8  # q, k, v, out, dO, bias in; grads out
    flops = 4 * b * h * n * n * d  # the two forward products; the backward has five (2.5x)
    work = {"fwd": (forward_bytes, flops), "bwd": (backward_bytes, 5 * flops // 2)}
    work["fwd+bwd"] = (forward_bytes + backward_bytes, 7 * flops // 2)
    return [
        Case(
            op="attention",
            shape=f"B={b} H={h} N={n} Dh={d} {pass_name}",
            dtype=args.dtype,
            providers=providers[pass_name],
            bytes_moved=work[pass_name][0],
            flops=work[pass_name][1],
            baseline="SDPA float mask",
        )
        for pass_name in providers
    ]


CASES = {"codebook": codebook_case, "masked_ce": masked_ce_case, "attention": attention_case}
# Rows when --m is not given: codebook, the tokens of 256 images; masked_ce, their 75 masked patches each.
DEFAULT_ROWS = {"codebook": 256 * 196, "masked_ce": 256 * 75}


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------
def time_ms(fn: Callable[[], object], device: torch.device) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    import torch.utils.benchmark as benchmark

    fn()  # warm-up
    measurement = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=2.0)
    times = torch.tensor(measurement.times) * 1e3
    return measurement.median * 1e3, times.quantile(0.2).item(), times.quantile(0.8).item()


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def make_cases(op: str, args: argparse.Namespace, device: torch.device) -> list[Case]:
    """The cases of ``op``: one, or one per pass (attention: fwd, bwd, fwd+bwd)."""
    cases = CASES[op](args, device)
    return cases if isinstance(cases, list) else [cases]


def _cpu_peak_child(op: str, args: argparse.Namespace, case_index: int, provider: str, queue) -> None:
    torch.manual_seed(0)
    fn = make_cases(op, args, torch.device("cpu"))[case_index].providers[provider]
    fn()  # one-time library start-up (thread pools, BLAS buffers) is not the op's memory
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak resident set to the current one
    before = _rss_kib("VmRSS")
    fn()
    queue.put((_rss_kib("VmHWM") - before) / 1024)


def peak_extra_mib(
    op: str,
    args: argparse.Namespace,
    provider: str,
    fn: Callable[[], object],
    device: torch.device,
    case_index: int = 0,
) -> float:
    """Memory one call needs beyond its inputs, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    context = multiprocessing.get_context("spawn")  # a fresh process: nothing cached from other providers
    queue = context.Queue()
    child = context.Process(target=_cpu_peak_child, args=(op, args, case_index, provider, queue))
    # Large blocks through mmap, so that freed memory leaves the resident set and each
    # allocation of the measured call shows in the peak.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        child.start()
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"memory measurement of {provider} failed with exit code {child.exitcode}")
    return queue.get()


def environment(device: torch.device) -> dict[str, str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "commit": commit or "unknown",
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
    }


def run_case(case: Case, args: argparse.Namespace, device: torch.device, case_index: int = 0) -> list[dict]:
    env = environment(device)
    rows = []
    for provider, fn in case.providers.items():
        median, p20, p80 = time_ms(fn, device)
        peak = peak_extra_mib(case.op, args, provider, fn, device, case_index)
        rows.append(
            {
                **env,
                "op": case.op,
                "shape": case.shape,
                "dtype": case.dtype,
                "provider": provider,
                "ms": round(median, 4),
                "ms_p20": round(p20, 4),
                "ms_p80": round(p80, 4),
                "GB/s": round(case.bytes_moved / median / 1e6, 2),
                "TFLOP/s": round(case.flops / median / 1e9, 3),
                "peak_extra_MiB": round(peak, 1),
            }
        )
    baseline = next(r for r in rows if r["provider"] == case.baseline)
    for row in rows:
        row["speedup"] = round(baseline["ms"] / row["ms"], 2)
        row["memory_vs_baseline"] = (
            round(row["peak_extra_MiB"] / baseline["peak_extra_MiB"], 4) if baseline["peak_extra_MiB"] else ""
        )
    return rows


def print_table(rows: list[dict]) -> None:
    head = rows[0]
    print(
        f"\n{head['op']} {head['shape']} {head['dtype']} on {head['device']} (torch {head['torch']}, triton {head['triton']})"
    )
    columns = [
        "provider",
        "ms",
        "ms_p20",
        "ms_p80",
        "GB/s",
        "TFLOP/s",
        "peak_extra_MiB",
        "speedup",
        "memory_vs_baseline",
    ]
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths, strict=True)))


def append_csv(rows: list[dict], path: str = RESULTS_CSV) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("op", choices=sorted(CASES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--m", type=int, default=None, help="rows (default: codebook 256 x 196, masked_ce 256 x 75)")
    parser.add_argument("--k", type=int, default=8192, help="codes")
    parser.add_argument("--d", type=int, default=32, help="code dimension")
    parser.add_argument("--c", type=int, default=768, help="masked_ce: features (ViT-B 768, ViT-L 1024)")
    parser.add_argument("--v", type=int, default=8192, help="masked_ce: classes (the tokenizer's codes)")
    parser.add_argument("--batch", type=int, default=256, help="attention: batch (ViT-B pretraining 256, ViT-L 128)")
    parser.add_argument("--heads", type=int, default=12, help="attention: heads (ViT-B 12, ViT-L 16)")
    parser.add_argument("--seq", type=int, default=197, help="attention: tokens (224 px: 197, 384 px: 577)")
    parser.add_argument("--head-dim", type=int, default=64, help="attention: head dimension")
    parser.add_argument("--no-csv", action="store_true", help="print only; do not append to bench/results/kernels.csv")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    args.m = DEFAULT_ROWS.get(args.op, 256 * 196) if args.m is None else args.m
    torch.manual_seed(0)
    for index, case in enumerate(make_cases(args.op, args, device)):
        rows = run_case(case, args, device, index)
        print_table(rows)
        if not args.no_csv:
            append_csv(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
