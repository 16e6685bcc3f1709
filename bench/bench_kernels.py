"""Kernel benchmarks: each op against the unfused baselines, measured side by side in one run.

    python -m bench.bench_kernels codebook                  # BEiT v2 shape: M = 256 x 196, K = 8192, D = 32
    python -m bench.bench_kernels codebook --m 4096 --dtype fp32
    python -m bench.bench_kernels masked_ce                 # MIM head fwd, bwd, fwd+bwd: M = 256 x 75, C = 768, V = 8192
    python -m bench.bench_kernels masked_ce --c 1024        # ViT-L
    python -m bench.bench_kernels attention                 # fwd, bwd, fwd+bwd: B = 256, H = 12, N = 197, Dh = 64
    python -m bench.bench_kernels attention --batch 128 --heads 16   # ViT-L
    python -m bench.bench_kernels attention --batch 4       # on the CPU (fp32)
    python -m bench.bench_kernels all --batch 256           # the three ops at the pretraining shapes
    python -m bench.bench_kernels all --sweep batch=32,64,128,256     # shape sweeps, with PNG plots
    python -m bench.bench_kernels attention --sweep seq=50,197,257,577

Shapes follow the images: ``--batch`` images of ``--seq`` tokens (197: a 224 px image in 16 px
patches plus the class token) give the codebook ``batch x (seq - 1)`` rows, the masked head
``batch x round(0.38 (seq - 1))`` rows (75 of 196 patches are masked) and attention B = batch,
N = seq; ``--m`` sets the rows directly. ``--sweep NAME=V1,V2,...`` runs every op at each value of
``batch`` or ``seq`` and plots time and speed-up against the value (``bench/results/plots``).

Modes: the codebook lookup is forward only (the tokenizer runs without gradients); the masked head
and attention run ``fwd`` (recording for the backward, as in training), ``bwd`` (the backward of
one retained forward) and ``fwd+bwd``.

Times are medians with 20th/80th percentiles (``triton.testing.do_bench`` on CUDA,
``torch.utils.benchmark`` on the CPU). Peak memory is the extra memory one call needs beyond
its inputs: ``torch.cuda.max_memory_allocated`` on CUDA, the process's peak resident set
(VmHWM, reset before the call, in a fresh process per provider) on the CPU. Every row is
printed and appended to ``bench/results/kernels.csv`` with the device, versions, commit and date.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import multiprocessing
import os
import sys
import time
from collections.abc import Callable

import torch
import torch._functorch.config
import torch.nn.functional as F

import kernels
from kernels import _dispatch, reference

from . import _common

# The "bwd" pass replays the backward of one retained forward (retain_graph=True), which
# compiled providers (FlexAttention) refuse while AOTAutograd donates their saved buffers.
torch._functorch.config.donated_buffer = False

RESULTS_CSV = os.path.join(_common.RESULTS_DIR, "kernels.csv")
PLOTS_DIR = os.path.join(_common.RESULTS_DIR, "plots")
MASKED_FRACTION = 75 / 196  # the BEiT v2 recipe masks 75 of 196 patches
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
    mode: str = "fwd"  # fwd | bwd | fwd+bwd
    floor_ms: float | None = None  # the op's lower bound on this device, where one is stated
    missing: dict[str, str] = dataclasses.field(default_factory=dict)  # baseline -> why it has no row of figures


# --------------------------------------------------------------------------------------------
# Codebook lookup
# --------------------------------------------------------------------------------------------
def distance_argmin(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The reference's lookup (microsoft/unilm beit2/norm_ema_quantizer.py): the full squared
    distance matrix, then argmin."""
    z = F.normalize(z, dim=-1)
    d = z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * torch.einsum("md,kd->mk", z, codebook)
    return d.argmin(dim=1)


# Per GPU: SM clock (Hz) and 32-bit lanes per SM per clock, for the running-max bound below.
SM_ISSUE = {"H100": (1.98e9, 128), "H200": (1.98e9, 128), "A100": (1.41e9, 64)}


def codebook_floor_ms(m: int, k: int, d: int, device: torch.device) -> float | None:
    """max(FLOP time, running-max time): 2 M K D FLOPs at the dense bf16 tensor-core peak, and
    M K scores each taking at least one instruction (a max) per lane; None where either is unknown."""
    if device.type != "cuda":
        return None
    from beitv2_fast.train.metrics import peak_flops

    peak = peak_flops(device)
    name = torch.cuda.get_device_name(device)
    issue = next((v for key, v in SM_ISSUE.items() if key in name), None)
    if peak is None or issue is None:
        return None
    clock, lanes = issue
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return 1e3 * max(2 * m * k * d / peak, m * k / (sms * lanes * clock))


def _cycling(inputs: list[torch.Tensor], fn: Callable[[torch.Tensor], object]) -> Callable[[], object]:
    """Each call takes the next input set, so repeated calls do not find it in the L2 cache."""
    turn = itertools.count()
    return lambda: fn(inputs[next(turn) % len(inputs)])


def codebook_case(args, device: torch.device) -> Case:
    dtype = DTYPES[args.dtype]
    z_bytes = args.m * args.d * torch.finfo(dtype).bits // 8
    # Enough input sets to cover twice the L2 cache (the codebook, 0.5 MB, stays cached as in a real step).
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    sets = max(1, min(32, -(-2 * l2 // max(z_bytes, 1))))
    zs = [torch.randn(args.m, args.d, device=device, dtype=dtype) for _ in range(sets)]
    codebook = F.normalize(torch.randn(args.k, args.d, device=device), dim=-1).to(dtype)
    providers = {
        "distance+argmin (unilm)": _cycling(zs, lambda z: distance_argmin(z, codebook)),
        "matmul+argmax": _cycling(zs, lambda z: reference.codebook_lookup(z, codebook)),
    }
    if device.type == "cuda":
        compiled = torch.compile(distance_argmin)
        providers["torch.compile(distance+argmin)"] = _cycling(zs, lambda z: compiled(z, codebook))
        available = {"triton": _dispatch.TRITON_AVAILABLE, "cuda": _dispatch.CUDA_EXTENSION_AVAILABLE, "torch": True}
        for backend in (name for name, ok in available.items() if ok):
            lookup = _cycling(zs, lambda z: kernels.codebook_lookup(z, codebook))
            providers[f"ours[{backend}]"] = _with_backend(backend, lookup)
    else:
        providers["ours[torch, chunked]"] = _cycling(zs, lambda z: kernels.codebook_lookup(z, codebook))
    element = torch.finfo(dtype).bits // 8
    return Case(
        op="codebook",
        shape=f"M={args.m} K={args.k} D={args.d} fwd",
        dtype=args.dtype,
        providers=providers,
        bytes_moved=(args.m + args.k) * args.d * element + args.m * (8 + 4),
        flops=2 * args.m * args.k * args.d,
        baseline="distance+argmin (unilm)",
        floor_ms=codebook_floor_ms(args.m, args.k, args.d, device),
    )


def _with_backend(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with kernels.set_backend(backend):
            return fn()

    return run


# --------------------------------------------------------------------------------------------
# Training passes: forward, backward, both
# --------------------------------------------------------------------------------------------
def _training_passes(
    forward: Callable[..., object], leaves: list[torch.Tensor], grad_output: torch.Tensor | None = None
) -> dict[str, Callable[[], object]]:
    """Forward (recording for the backward, as in training), backward alone (of one retained
    forward) and forward + backward of ``forward(*leaves)``; its output, or the first element of
    a tuple, is differentiated (against ``grad_output``, or as a scalar loss). Gradients are
    dropped after each call so that every call allocates (and the peak counts) them afresh."""
    retained = []

    def differentiated(output):
        return output[0] if isinstance(output, tuple) else output

    def drop_grads():
        for leaf in leaves:
            leaf.grad = None

    def forward_pass():
        return forward(*leaves)

    def backward_pass():
        if not retained:
            retained.append(differentiated(forward(*leaves)))
        retained[0].backward(grad_output, retain_graph=True)
        drop_grads()

    def forward_backward():
        differentiated(forward(*leaves)).backward(grad_output)
        drop_grads()

    return {"fwd": forward_pass, "bwd": backward_pass, "fwd+bwd": forward_backward}


def _wrapped(passes: dict[str, Callable[[], object]], wrap: Callable) -> dict[str, Callable[[], object]]:
    return {name: wrap(fn) for name, fn in passes.items()}


def _with_gradient_in_forward(enabled: bool, fn: Callable[[], object]) -> Callable[[], object]:
    from kernels import masked_ce

    def run():
        previous, masked_ce.GRADIENT_IN_FORWARD = masked_ce.GRADIENT_IN_FORWARD, enabled
        try:
            return fn()
        finally:
            masked_ce.GRADIENT_IN_FORWARD = previous

    return run


def _pass_cases(op: str, shape: str, args, providers: dict[str, dict], work: dict, baseline: str) -> list[Case]:
    """One Case per pass from ``providers[name][pass]`` and ``work[pass] = (bytes, flops)``."""
    return [
        Case(
            op=op,
            shape=f"{shape} {mode}",
            dtype=args.dtype,
            providers={name: passes[mode] for name, passes in providers.items()},
            bytes_moved=work[mode][0],
            flops=work[mode][1],
            baseline=baseline,
            mode=mode,
        )
        for mode in ("fwd", "bwd", "fwd+bwd")
    ]


# --------------------------------------------------------------------------------------------
# Masked linear cross-entropy
# --------------------------------------------------------------------------------------------
def masked_ce_case(args, device: torch.device) -> list[Case]:
    """One head's masked rows (fwd, bwd, fwd+bwd), then the shared-LM-head case: both heads'
    rows through one call (fwd+bwd only, to keep the suite short)."""
    shared = [case for case in _masked_ce_cases(args, 2 * args.m, device, "shared LM head, ") if case.mode == "fwd+bwd"]
    return _masked_ce_cases(args, args.m, device, "") + shared


def _masked_ce_cases(args, m: int, device: torch.device, label: str) -> list[Case]:
    dtype = DTYPES[args.dtype]
    c, v = args.c, args.v
    missing = {}
    x = torch.randn(m, c, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, c, device=device) / c**0.5).to(dtype).requires_grad_()
    bias = torch.zeros(v, device=device, dtype=dtype, requires_grad=True)
    target = torch.randint(0, v, (m,), device=device)

    def ours(a, w, b):
        return kernels.masked_linear_cross_entropy(a, w, b, target)

    def unfused(a, w, b):  # the reference MIM loss: logits, fp32 cross-entropy, argmax for the accuracy
        return reference.masked_linear_cross_entropy(a, w, b, target)

    leaves = [x, weight, bias]
    providers = {"linear+cross_entropy (reference)": _training_passes(unfused, leaves)}
    if device.type == "cuda":
        providers["torch.compile(reference)"] = _training_passes(torch.compile(unfused), leaves)
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            providers["Liger fused_linear_cross_entropy"] = _training_passes(
                lambda a, w, b: liger_fused_linear_cross_entropy(a, w, target, bias=b), leaves
            )
        except ImportError:
            missing["Liger fused_linear_cross_entropy"] = "not installed (liger-kernel)"
        try:
            from cut_cross_entropy import linear_cross_entropy

            providers["Cut Cross-Entropy"] = _training_passes(
                lambda a, w, b: linear_cross_entropy(a, w, target, bias=b), leaves
            )
        except ImportError:
            missing["Cut Cross-Entropy"] = "not installed (cut-cross-entropy)"
        backends = [name for name, ok in {"triton": _dispatch.TRITON_AVAILABLE, "torch": True}.items() if ok]
        names = {backend: backend for backend in backends}
    else:
        names = {"torch": "torch, chunked"}
    for backend, name in names.items():
        for gradient_in_forward, suffix in ((True, ""), (False, ", recompute in backward")):
            # Each provider its own passes: the backward pass retains a forward made its way.
            passes = _wrapped(_training_passes(ours, leaves), functools.partial(_with_backend, backend))
            providers[f"ours[{name}{suffix}]"] = _wrapped(
                passes, functools.partial(_with_gradient_in_forward, gradient_in_forward)
            )
    element = torch.finfo(dtype).bits // 8
    inputs = (m * c + v * c + v) * element + m * 8  # x, weight, bias, target
    work = {
        "fwd": (inputs + 8, 2 * m * c * v),  # the logits; out: loss and count
        "bwd": (inputs + (m * c + v * c + v) * element, 4 * m * c * v),  # dlogits @ weight, dlogits^T @ x
    }
    work["fwd+bwd"] = (work["bwd"][0], 6 * m * c * v)
    cases = _pass_cases(
        "masked_ce", f"{label}M={m} C={c} V={v}", args, providers, work, "linear+cross_entropy (reference)"
    )
    for case in cases:
        case.missing = missing
    return cases


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

    # One compiled function with the score_mod closure inside and the bias as a graph input,
    # not a new lambda per call handed to a compiled flex_attention; no block mask (the attention
    # is dense, so nothing is built per call). _compiles_once checks that the timed calls do not
    # compile.
    def attend(q, k, v, bias):
        def add_bias(score, b, h, q_idx, kv_idx):
            return score + bias[h, q_idx, kv_idx]

        return flex_attention(q, k, v, score_mod=add_bias)

    return torch.compile(attend, fullgraph=True)


def _compiles_once(passes: dict[str, Callable[[], object]]) -> None:
    """Raise unless the passes, once warmed up, run without compiling again (a "compiled" row
    must time compiled code, with no compilation inside the timed region)."""
    from torch._dynamo.utils import counters

    for run in passes.values():
        run()  # warm-up: every pass compiles here
    compiled_frames = sum(counters["frames"].values())
    for run in passes.values():
        run()
    recompiled = sum(counters["frames"].values()) - compiled_frames
    if recompiled:
        raise RuntimeError(f"compiled {recompiled} more frame(s) after the warm-up: timing would include compilation")


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


FLEX_ATTENTION = "FlexAttention score_mod (compiled)"


def attention_case(args, device: torch.device) -> list[Case]:
    dtype = DTYPES[args.dtype]
    b, h, n, d = args.batch, args.heads, args.seq, args.head_dim
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    bias = torch.randn(h, n, n, device=device, dtype=dtype).requires_grad_()
    grad_out = torch.randn_like(q)

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
        candidates[FLEX_ATTENTION] = (_flex_attention, True)
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

    providers = {}
    for name, (make, takes_bias) in candidates.items():
        try:
            attend = make()
            if takes_bias:
                passes = _training_passes(attend, [q, k, v, bias], grad_out)
            else:
                passes = _training_passes(
                    lambda qq, kk, vv, attend=attend: attend(qq, kk, vv, None), [q, k, v], grad_out
                )
            passes["fwd+bwd"]()  # compiles, and proves the provider runs here
            if name == FLEX_ATTENTION:
                _compiles_once(passes)
        except Exception as exc:  # noqa: BLE001 - an unavailable baseline is reported, not fatal
            print(f"attention: skipping {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue
        providers[name] = passes

    element = torch.finfo(dtype).bits // 8
    head_bytes = b * h * n * d * element
    bias_bytes = h * n * n * element
    forward_bytes = 4 * head_bytes + bias_bytes + b * h * n * 4  # q, k, v, bias in; out, LSE out
    backward_bytes = 8 * head_bytes + 2 * bias_bytes + b * h * n * 8  # q, k, v, out, dO, bias in; grads out
    flops = 4 * b * h * n * n * d  # the two forward products; the backward has five (2.5x)
    work = {"fwd": (forward_bytes, flops), "bwd": (backward_bytes, 5 * flops // 2)}
    work["fwd+bwd"] = (forward_bytes + backward_bytes, 7 * flops // 2)
    return _pass_cases("attention", f"B={b} H={h} N={n} Dh={d}", args, providers, work, "SDPA float mask")


CASES = {"codebook": codebook_case, "attention": attention_case, "masked_ce": masked_ce_case}


def rows_for(op: str, args: argparse.Namespace) -> int:
    """Rows of the codebook and masked-head cases: the (masked) patch tokens of the batch."""
    if args.m is not None:
        return args.m
    patches = args.seq - 1
    return args.batch * (patches if op == "codebook" else max(1, round(MASKED_FRACTION * patches)))


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
    return _common.quantiles_ms(measurement.times)


def make_cases(op: str, args: argparse.Namespace, device: torch.device) -> list[Case]:
    """The cases of ``op``: one, or one per pass (masked_ce, attention: fwd, bwd, fwd+bwd)."""
    args = argparse.Namespace(**{**vars(args), "m": rows_for(op, args)})
    cases = CASES[op](args, device)
    return cases if isinstance(cases, list) else [cases]


def _cpu_peak_child(op: str, args: argparse.Namespace, case_index: int, provider: str, queue) -> None:
    torch.manual_seed(0)
    fn = make_cases(op, args, torch.device("cpu"))[case_index].providers[provider]
    fn()  # one-time library start-up (thread pools, BLAS buffers) is not the op's memory
    _common.reset_peak_rss()
    before = _common.rss_kib("VmRSS")
    fn()
    queue.put((_common.rss_kib("VmHWM") - before) / 1024)


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


def run_case(case: Case, args: argparse.Namespace, device: torch.device, case_index: int = 0) -> list[dict]:
    env = _common.environment(device)
    rows = []
    for provider, fn in case.providers.items():
        median, p20, p80 = time_ms(fn, device)
        peak = None if args.no_memory else peak_extra_mib(case.op, args, provider, fn, device, case_index)
        rows.append(
            {
                **env,
                "op": case.op,
                "shape": case.shape,
                "mode": case.mode,
                "batch": args.batch,
                "seq": args.seq,
                "dtype": case.dtype,
                "provider": provider,
                "ms": round(median, 4),
                "ms_p20": round(p20, 4),
                "ms_p80": round(p80, 4),
                "GB/s": round(case.bytes_moved / median / 1e6, 2),
                "TFLOP/s": round(case.flops / median / 1e9, 3),
                "peak_extra_MiB": "" if peak is None else round(peak, 1),
                "floor_fraction": "" if case.floor_ms is None else round(case.floor_ms / median, 3),
            }
        )
    baseline = next(r for r in rows if r["provider"] == case.baseline)
    for row in rows:
        row["speedup"] = round(baseline["ms"] / row["ms"], 2)
        has_memory = row["peak_extra_MiB"] != "" and baseline["peak_extra_MiB"]
        row["memory_vs_baseline"] = round(row["peak_extra_MiB"] / baseline["peak_extra_MiB"], 4) if has_memory else ""
    for provider, reason in case.missing.items():
        rows.append({**rows[0], **dict.fromkeys(COLUMNS, ""), "provider": provider, "ms": reason})
    return rows


COLUMNS = [
    "provider", "ms", "ms_p20", "ms_p80", "GB/s", "TFLOP/s", "peak_extra_MiB", "speedup", "memory_vs_baseline",
    "floor_fraction",
]  # fmt: skip


def title(rows: list[dict]) -> str:
    head = rows[0]
    return (
        f"{head['op']} {head['shape']} {head['dtype']} on {head['device']} "
        f"(torch {head['torch']}, triton {head['triton']}, commit {head['commit']})"
    )


def print_table(rows: list[dict]) -> None:
    print(f"\n{title(rows)}\n{_common.format_table(rows, COLUMNS)}")


# --------------------------------------------------------------------------------------------
# Sweeps and their plots
# --------------------------------------------------------------------------------------------
def parse_sweep(text: str) -> tuple[str, list[int]]:
    """``batch=32,64,128`` -> ``("batch", [32, 64, 128])``."""
    name, _, values = text.partition("=")
    if name not in ("batch", "seq") or not values:
        raise argparse.ArgumentTypeError(f"--sweep must look like batch=1,2,4 or seq=50,197; got {text!r}")
    try:
        numbers = [int(v) for v in values.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sweep values must be integers; got {values!r}") from None
    if min(numbers) < 1:
        raise argparse.ArgumentTypeError(f"--sweep values must be positive; got {values!r}")
    return name, numbers


def plot_sweep(rows: list[dict], name: str, directory: str) -> list[str]:
    """One PNG per (op, mode, dtype): time against the swept value for every provider (log-log),
    and the speed-up over the case's baseline. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    written = []
    groups = sorted({(r["op"], r["mode"], r["dtype"]) for r in rows})
    for op, mode, dtype in groups:
        group = [r for r in rows if (r["op"], r["mode"], r["dtype"]) == (op, mode, dtype)]
        figure, (time_axis, speed_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
        for provider in dict.fromkeys(r["provider"] for r in group):
            points = sorted(
                (r[name], r["ms"], r["speedup"])
                for r in group
                if r["provider"] == provider and isinstance(r["ms"], float)
            )
            xs = [p[0] for p in points]
            time_axis.plot(xs, [p[1] for p in points], marker="o", label=provider)
            speed_axis.plot(xs, [p[2] for p in points], marker="o", label=provider)
        values = sorted({r[name] for r in group})
        for axis in (time_axis, speed_axis):
            axis.set_xscale("log", base=2)
            axis.set_xticks(values, [str(v) for v in values])
            axis.minorticks_off()
            axis.set_xlabel(name)
            axis.grid(True, which="both", alpha=0.3)
        time_axis.set_yscale("log")
        time_axis.set_ylabel("ms (median)")
        speed_axis.set_ylabel("speed-up over the baseline")
        speed_axis.legend(fontsize=7)
        head = group[0]
        figure.suptitle(f"{op} {mode} {dtype}, {name} sweep, {head['device']} (torch {head['torch']})", fontsize=10)
        figure.tight_layout()
        path = os.path.join(directory, f"{op}-{mode.replace('+', '-')}-{dtype}-{name}-{_slug(head['device'])}.png")
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def _slug(text: str) -> str:
    return "-".join("".join(c.lower() if c.isalnum() else " " for c in text).split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("op", nargs="+", choices=[*CASES, "all"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--batch", type=int, default=256, help="images (ViT-B pretraining 256, ViT-L 128)")
    parser.add_argument("--seq", type=int, default=197, help="tokens per image with the class token (224 px: 197)")
    parser.add_argument("--m", type=int, default=None, help="codebook and masked_ce rows (default: from the batch)")
    parser.add_argument("--k", type=int, default=8192, help="codes")
    parser.add_argument("--d", type=int, default=32, help="code dimension")
    parser.add_argument("--c", type=int, default=768, help="masked_ce: features (ViT-B 768, ViT-L 1024)")
    parser.add_argument("--v", type=int, default=8192, help="masked_ce: classes (the tokenizer's codes)")
    parser.add_argument("--heads", type=int, default=12, help="attention: heads (ViT-B 12, ViT-L 16)")
    parser.add_argument("--head-dim", type=int, default=64, help="attention: head dimension")
    parser.add_argument("--sweep", type=parse_sweep, default=None, help="batch=V1,V2,... or seq=V1,V2,...")
    parser.add_argument("--plot-dir", default=PLOTS_DIR, help="where the sweep plots go")
    parser.add_argument(
        "--no-memory", action="store_true", help="skip peak memory (on the CPU: a process per provider)"
    )
    parser.add_argument("--csv", default=RESULTS_CSV, help="rows are appended here")
    parser.add_argument("--no-csv", dest="csv", action="store_const", const="", help="print only")
    parser.add_argument("--markdown", default="", help="also append the tables to this Markdown file")
    parser.add_argument(
        "--time-budget", type=float, default=float(os.environ.get("BEITV2_TIME_BUDGET", "inf")),
        help="seconds: start no case after this ($BEITV2_TIME_BUDGET)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ops = list(CASES) if "all" in args.op else list(dict.fromkeys(args.op))
    deadline = time.time() + args.time_budget
    sweep_name, sweep_values = args.sweep or (None, [None])
    all_rows = []
    for value in sweep_values:
        point = argparse.Namespace(**vars(args))
        if sweep_name:
            setattr(point, sweep_name, value)
        for op in ops:
            if time.time() >= deadline:
                where = f"{sweep_name} {value}" if sweep_name else f"batch {args.batch}"
                print(f"time budget spent: {op} at {where} not measured", file=sys.stderr)
                continue
            torch.manual_seed(0)
            for index, case in enumerate(make_cases(op, point, device)):
                if time.time() >= deadline:
                    print(f"time budget spent: {case.op} {case.shape} not measured", file=sys.stderr)
                    continue
                rows = run_case(case, point, device, index)
                print_table(rows)
                all_rows += rows
                if args.csv:
                    _common.append_csv(rows, args.csv)
                if args.markdown:
                    with open(args.markdown, "a") as f:
                        f.write(f"\n**{title(rows)}**\n\n{_common.markdown_table(rows, COLUMNS)}\n")
    if sweep_name and all_rows:
        for path in plot_sweep(all_rows, sweep_name, args.plot_dir):
            print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
