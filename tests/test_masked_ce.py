"""kernels.masked_linear_cross_entropy against kernels/reference.py."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import kernels
from kernels import _testing, masked_ce, reference
from kernels._triton import masked_ce as triton_masked_ce

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IGNORE = -100
# Each test taking `backend` runs on each of these (tests/conftest.py); there is no CUDA C++ kernel.
KERNEL_BACKENDS = ("torch", "triton")


@pytest.fixture(params=[True, False], ids=["grad-in-forward", "recompute"])
def gradient_in_forward(request, monkeypatch):
    monkeypatch.setattr(masked_ce, "GRADIENT_IN_FORWARD", request.param)
    return request.param


def _head(m, c, v, device, dtype=torch.float32, *, ignore_every=5, exact=False):
    """Rows, head and targets in ``dtype``; every other row's target is its argmax (so that
    num_correct is not trivially 0) and every ``ignore_every``-th row is ignored. ``exact``
    draws small integers and quarters, whose dot products are exact in any summation order, so
    that equal classes tie exactly."""
    if exact:
        x = torch.randint(-3, 4, (m, c), device=device).to(dtype)
        weight = (torch.randint(-3, 4, (v, c), device=device) / 4).to(dtype)
        bias = (torch.randint(-3, 4, (v,), device=device) / 4).to(dtype)
    else:
        x = torch.randn(m, c, device=device).to(dtype)
        weight = (torch.randn(v, c, device=device) / c**0.5).to(dtype)
        bias = (0.1 * torch.randn(v, device=device)).to(dtype)
    target = torch.randint(0, v, (m,), device=device)
    if m:
        logits = x.float() @ weight.float().t() + bias.float()
        target[::2] = logits.argmax(dim=1)[::2]
        if ignore_every:
            target[1::ignore_every] = IGNORE
    return x, weight, bias, target


def _loss_and_grads(fn, x, weight, bias, target, reduction, grad_output=None, **kwargs):
    """Loss, num_correct and the gradients of ``sum(loss * grad_output)`` for x, weight and bias."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    loss, num_correct = fn(*leaves[:2], leaves[2] if bias is not None else None, target, reduction=reduction, **kwargs)
    if grad_output is None:
        grad_output = torch.ones_like(loss)
    grads = torch.autograd.grad(loss, leaves, grad_output)
    return loss.detach(), num_correct, grads


def _reference(x, weight, bias, target, reduction, grad_output=None):
    return _loss_and_grads(reference.masked_linear_cross_entropy, x, weight, bias, target, reduction, grad_output)


def _check_against_reference(x, weight, bias, target, reduction, grad_output=None):
    """The op's loss and gradients against the fp32 reference on the same (upcast) inputs, with
    the 2x rule for low precision; num_correct exactly as fp32 arithmetic counts it."""
    dtype = x.dtype
    loss, num_correct, grads = _loss_and_grads(
        kernels.masked_linear_cross_entropy, x, weight, bias, target, reduction, grad_output
    )
    upcast = [None if t is None else t.float() for t in (x, weight, bias)]
    ref_loss, ref_correct, ref_grads = _reference(*upcast, target, reduction, grad_output)
    lowp_loss, lowp_grads = ref_loss, ref_grads
    if dtype != torch.float32:
        lowp_loss, _, lowp_grads = _reference(x, weight, bias, target, reduction, grad_output)
    if not (target != IGNORE).any():  # the reference's mean of nothing is NaN; the op's is 0
        ref_loss, lowp_loss = torch.nan_to_num(ref_loss), torch.nan_to_num(lowp_loss)
    assert loss.dtype == torch.float32 and num_correct.dtype == torch.int64 and num_correct.shape == ()
    assert num_correct.item() == ref_correct.item()
    _testing.assert_close(loss, ref_loss, lowp_loss, name="loss", dtype=dtype)
    for name, grad, ref_grad, lowp_grad in zip(("dx", "dweight", "dbias"), grads, ref_grads, lowp_grads, strict=False):
        assert grad.dtype == dtype, name
        _testing.assert_close(grad, ref_grad, lowp_grad, name=name, dtype=dtype)


@pytest.mark.parametrize(
    "dtype,reduction",
    [(torch.float32, "mean"), (torch.bfloat16, "mean"), (torch.float16, "mean"), (torch.bfloat16, "sum")],
)
def test_matches_reference(backend, device, gradient_in_forward, dtype, reduction):
    x, weight, bias, target = _head(37, 40, 101, device, dtype)
    _check_against_reference(x, weight, bias, target, reduction, grad_output=torch.tensor(0.7, device=device))


@pytest.mark.parametrize("dtype", DTYPES)
def test_reduction_none_with_row_gradients(backend, device, dtype):
    x, weight, bias, target = _head(37, 40, 101, device, dtype)
    _check_against_reference(x, weight, bias, target, "none", grad_output=torch.randn(37, device=device))


@pytest.mark.parametrize(
    "m,c,v",
    [(0, 13, 300), (1, 1, 1), (7, 13, 300), (33, 64, 129), (197, 80, 33), (33, 1, 70), (1, 80, 300)],
)
def test_odd_shapes(backend, device, m, c, v):
    x, weight, bias, target = _head(m, c, v, device)
    _check_against_reference(x, weight, bias, target, "mean")
    _check_against_reference(x, weight, None, target, "sum")


def test_non_contiguous_inputs(backend, device):
    x, weight, bias, target = _head(33, 24, 70, device)
    loss, num_correct, grads = _loss_and_grads(
        kernels.masked_linear_cross_entropy,
        _testing.non_contiguous(x),
        weight.t().contiguous().t(),  # column-major [V, C]
        _testing.non_contiguous(bias[None])[0],
        _testing.non_contiguous(target[None])[0],
        "mean",
    )
    ref_loss, ref_correct, ref_grads = _reference(x, weight, bias, target, "mean")
    assert num_correct.item() == ref_correct.item()
    _testing.assert_close(loss, ref_loss, name="loss")
    for name, grad, ref_grad in zip(("dx", "dweight", "dbias"), grads, ref_grads, strict=True):
        _testing.assert_close(grad, ref_grad, name=name)


def test_ties_resolve_to_lowest_index(backend, device):
    base = torch.eye(8, 16, device=device)
    weight = torch.cat([base, base])  # class k and class k + 8 always tie, exactly
    x = 3 * base[[5, 0, 7, 2]]
    target = torch.tensor([5, 8, 15, 2], device=device)  # 8 and 15 are the later copies of 0 and 7
    _, num_correct = kernels.masked_linear_cross_entropy(x, weight, None, target)
    assert num_correct.item() == 2
    _, num_correct = kernels.masked_linear_cross_entropy(torch.zeros(3, 16, device=device), weight, None, target[:3])
    assert num_correct.item() == 0  # all logits equal: the argmax is class 0, no target is 0


def test_shared_head_gradients_accumulate(backend, device, gradient_in_forward):
    # BEiT v2's two branches share one LM head: autograd adds up both calls' gradients.
    x1, weight, bias, t1 = _head(30, 24, 70, device)
    x2, _, _, t2 = _head(19, 24, 70, device)
    ours = [t.clone().requires_grad_() for t in (x1, x2, weight, bias)]
    refs = [t.clone().requires_grad_() for t in (x1, x2, weight, bias)]
    loss = sum(
        kernels.masked_linear_cross_entropy(x, ours[2], ours[3], t)[0] for x, t in zip(ours[:2], (t1, t2), strict=True)
    )
    ref_loss = sum(
        reference.masked_linear_cross_entropy(x, refs[2], refs[3], t)[0]
        for x, t in zip(refs[:2], (t1, t2), strict=True)
    )
    loss.backward()
    ref_loss.backward()
    _testing.assert_close(loss.detach(), ref_loss.detach(), name="loss")
    for name, ours_leaf, ref_leaf in zip(("dx1", "dx2", "dweight", "dbias"), ours, refs, strict=True):
        _testing.assert_close(ours_leaf.grad, ref_leaf.grad, name=name)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("m", [0, 9])
def test_no_valid_row_gives_zero_loss_and_zero_gradients(backend, device, gradient_in_forward, m, reduction):
    # The reference's mean is NaN here (microsoft/unilm issue 551).
    x, weight, bias, _ = _head(m, 16, 40, device)
    target = torch.full((m,), IGNORE, device=device)
    loss, num_correct, grads = _loss_and_grads(kernels.masked_linear_cross_entropy, x, weight, bias, target, reduction)
    assert loss.shape == ((m,) if reduction == "none" else ())
    assert torch.equal(loss, torch.zeros_like(loss)) and num_correct.item() == 0
    for grad, like in zip(grads, (x, weight, bias), strict=True):
        assert grad.shape == like.shape and torch.equal(grad, torch.zeros_like(like))


def test_large_logits_stay_finite(backend, device, gradient_in_forward):
    x, weight, bias, target = _head(33, 32, 100, device, ignore_every=0)
    x, weight = (1000 * x).bfloat16(), (4 * weight).bfloat16()
    assert (x.float() @ weight.float().t()).abs().max() > 1e4
    loss, _, grads = _loss_and_grads(kernels.masked_linear_cross_entropy, x, weight, bias.bfloat16(), target, "mean")
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    _check_against_reference(x, weight, bias.bfloat16(), target, "mean")


def test_minus_inf_bias_excludes_classes(backend, device):
    # Whole vocabulary tiles at -inf (a bias that switches codes off) must neither turn into NaN
    # nor count as a maximum, even when every remaining logit is negative.
    x, weight, bias, target = _head(20, 16, 300, device, ignore_every=0)
    bias -= 30
    bias[:140] = float("-inf")
    target = 140 + target % 160
    target[::2] = (x @ weight.t() + bias).argmax(dim=1)[::2]
    _check_against_reference(x, weight, bias, target, "mean")


def test_out_of_range_target_raises_on_cpu():
    x, weight, bias, target = _head(6, 8, 10, "cpu")
    for bad in (10, -1):
        target[3] = bad
        with kernels.set_backend("torch"), pytest.raises(ValueError, match=f"in \\[0, 10\\).*got {bad} at position 3"):
            kernels.masked_linear_cross_entropy(x, weight, bias, target)


@pytest.mark.interpreter
def test_triton_out_of_range_target_is_documented_behaviour():
    # Unchecked on CUDA: such a row's loss is its log-sum-exp and nothing is read out of bounds.
    x, weight, bias, target = _head(6, 8, 10, "cpu", ignore_every=0)
    target[3] = 10
    with kernels.set_backend("triton"):
        loss, _ = kernels.masked_linear_cross_entropy(x, weight, bias, target, reduction="none")
    lse = torch.logsumexp(x @ weight.t() + bias, dim=1)
    _testing.assert_close(loss[3], lse[3], name="loss of the out-of-range row")


@pytest.mark.interpreter
def test_triton_chunks_and_vocabulary_splits(monkeypatch, gradient_in_forward):
    # Several row chunks and a vocabulary split over programs, as on a GPU; ties across splits.
    monkeypatch.setattr(triton_masked_ce, "GPU_CHUNK_BYTES", 128 * 200 * 4)  # 128-row chunks of [rows, 200] fp32
    monkeypatch.setattr(triton_masked_ce, "_num_splits", lambda rows, vocab, device: 3)
    x, weight, bias, target = _head(200, 16, 100, "cpu", exact=True)
    weight, bias = torch.cat([weight, weight]), torch.cat([bias, bias])
    with kernels.set_backend("triton"):
        _check_against_reference(x, weight, bias, target, "mean")
        _check_against_reference(x, weight, bias, target + 100 * (target >= 0), "sum")  # the tied copies


def test_cpu_kernel_any_chunk_size_matches():
    x, weight, bias, target = _head(101, 16, 300, "cpu")
    expected = masked_ce._torch_forward(x, weight, bias, target, IGNORE, "mean", (True, True, True))
    for chunk_bytes in (1, 4 * 300 * 7, 1 << 30):  # one row, 7 rows, everything at once
        for ours, ref, name in zip(
            masked_ce._torch_forward(x, weight, bias, target, IGNORE, "mean", (True, True, True), chunk_bytes),
            expected,
            ("loss", "num_correct", "lse", "dx", "dweight", "dbias"),
            strict=True,
        ):
            _testing.assert_close(ours.float(), ref.float(), name=f"{name}, chunk {chunk_bytes}")


def _peak_live_bytes(fn) -> int:
    """Peak of the bytes allocated and not yet freed while ``fn`` runs, from the profiler's
    per-op allocations and its free events, in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted(
        (e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
        for e in prof.events()
    )
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak


def test_cpu_kernel_peak_memory_is_one_chunk_plus_gradients(monkeypatch):
    m, c, v = 1024, 32, 2048
    chunk_bytes = 64 * v * 4
    monkeypatch.setattr(masked_ce, "CPU_CHUNK_BYTES", chunk_bytes)
    x, weight, bias, target = _head(m, c, v, "cpu")

    def forward_backward(fn):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        return lambda: fn(*leaves, target)[0].backward()

    with kernels.set_backend("torch"):
        ours = _peak_live_bytes(forward_backward(kernels.masked_linear_cross_entropy))
    ref = _peak_live_bytes(forward_backward(reference.masked_linear_cross_entropy))
    gradients = (m * c + v * c + v) * 4  # raw in the forward, rescaled in the backward: twice
    assert ref >= 2 * m * v * 4  # the reference holds the logits and their log-softmax
    assert ours <= chunk_bytes + 2 * gradients + (64 << 10), f"{ours} bytes"
    assert ours <= 0.3 * ref, f"{ours} bytes vs the reference's {ref}"


def test_chunk_rows_respect_the_budget():
    for m, v, element, budget, multiple in [(19200, 8192, 4, 16 << 20, 1), (19200, 8192, 2, 64 << 20, 128)]:
        rows = masked_ce.chunk_rows(m, v, element, budget, multiple)
        assert rows * v * element <= budget and rows % multiple == 0
        assert -(-m // rows) == -(-m // (budget // (v * element)))  # no more chunks than needed
    assert masked_ce.chunk_rows(5, 8192, 2, 64 << 20, 128) == 5


def test_no_grad_and_partial_requires_grad(backend, device, gradient_in_forward):
    x, weight, bias, target = _head(20, 16, 40, device)
    with torch.no_grad():
        loss, _ = kernels.masked_linear_cross_entropy(x, weight.requires_grad_(), bias, target)
    assert loss.grad_fn is None
    loss, _ = kernels.masked_linear_cross_entropy(x, weight, bias, target)  # only the weight needs a gradient
    (grad_weight,) = torch.autograd.grad(loss, [weight])
    ref_loss, _ = reference.masked_linear_cross_entropy(x, weight, bias, target)
    _testing.assert_close(grad_weight, torch.autograd.grad(ref_loss, [weight])[0], name="dweight")


def test_autocast_runs_the_head_in_the_autocast_dtype():
    x, weight, bias, target = _head(20, 16, 40, "cpu")
    weight.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, num_correct = kernels.masked_linear_cross_entropy(x, weight, bias, target)
    loss.backward()
    assert weight.grad.dtype == torch.float32
    ref_loss, ref_correct = reference.masked_linear_cross_entropy(
        x.bfloat16().float(), weight.detach().bfloat16().float(), bias.bfloat16().float(), target
    )
    assert num_correct.item() == ref_correct.item()
    _testing.assert_close(loss.detach(), ref_loss, name="loss", atol=1e-4)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph_forward_and_backward(reduction):
    x1, weight, bias, t1 = _head(30, 24, 70, "cpu")
    x2, _, _, t2 = _head(19, 24, 70, "cpu")

    def two_heads(a, b, w, bias):
        loss_a, correct_a = kernels.masked_linear_cross_entropy(a, w, bias, t1, reduction=reduction)
        loss_b, correct_b = kernels.masked_linear_cross_entropy(b, w, bias, t2, reduction=reduction)
        return loss_a.sum() + loss_b.sum(), correct_a + correct_b

    compiled = torch.compile(two_heads, fullgraph=True, backend="aot_eager")
    ours = [t.clone().requires_grad_() for t in (x1, x2, weight, bias)]
    refs = [t.clone().requires_grad_() for t in (x1, x2, weight, bias)]
    loss, correct = compiled(*ours)
    loss.backward()
    ref_loss, ref_correct = two_heads(*refs)
    ref_loss.backward()
    assert correct.item() == ref_correct.item()
    _testing.assert_close(loss.detach(), ref_loss.detach(), name="loss")
    for name, ours_leaf, ref_leaf in zip(("dx1", "dx2", "dweight", "dbias"), ours, refs, strict=True):
        _testing.assert_close(ours_leaf.grad, ref_leaf.grad, name=name)


def test_opcheck_cpu_kernels():
    x, weight, bias, target = _head(20, 16, 40, "cpu")
    op, backward_op = (
        torch.ops.beitv2.masked_linear_cross_entropy.default,
        torch.ops.beitv2.masked_linear_cross_entropy_backward.default,
    )
    lse = torch.logsumexp(x @ weight.t() + bias, dim=1)
    for dtype in (torch.float32, torch.bfloat16):
        xd, wd, bd = (t.to(dtype) for t in (x, weight, bias))
        torch.library.opcheck(op, (xd, wd, bd, target, IGNORE, "mean", [False, False, False]))
        torch.library.opcheck(op, (xd, wd, None, target, IGNORE, "sum", [True, True, False]))
        leaves = [t.clone().requires_grad_() for t in (xd, wd, bd)]
        torch.library.opcheck(op, (*leaves, target, IGNORE, "mean", [False, False, False]))  # recompute backward
        torch.library.opcheck(op, (*leaves, target, IGNORE, "none", [False, False, False]))
        torch.library.opcheck(backward_op, (xd, wd, bd, target, lse, torch.rand(20), IGNORE, [True, False, True]))
    torch.library.opcheck(op, (x[:0], weight, bias, target[:0], IGNORE, "mean", [True, True, True]))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(x=[1.0]), TypeError, "argument 'x' must be a torch.Tensor"),
        (dict(x=torch.ones(3, 4, dtype=torch.int64)), TypeError, "argument 'x' must have dtype"),
        (dict(x=torch.randn(3, 4, 1)), ValueError, "argument 'x' must have 2 dimensions"),
        (dict(weight=torch.randn(5, 4).double()), TypeError, "argument 'weight' must have dtype"),
        (dict(weight=torch.randn(5, 4).half()), TypeError, "argument 'weight' has dtype torch.float16 but 'x'"),
        (dict(weight=torch.randn(5, 3)), ValueError, r"argument 'weight' must have size 4 in dimension 1"),
        (dict(weight=torch.randn(0, 4)), ValueError, "at least one feature and one class"),
        (dict(bias=torch.randn(6)), ValueError, r"argument 'bias' must have size 5 in dimension 0"),
        (dict(target=torch.zeros(3, dtype=torch.int32)), TypeError, "argument 'target' must have dtype int64"),
        (dict(target=torch.zeros(2, dtype=torch.int64)), ValueError, r"argument 'target' must have size 3"),
        (dict(target=torch.zeros(3, dtype=torch.int64, device="meta")), ValueError, "one device"),
        (dict(reduction="avg"), ValueError, "argument 'reduction' must be one of mean, sum, none; got 'avg'"),
        (dict(ignore_index=-100.0), TypeError, "argument 'ignore_index' must be an int"),
    ],
)
def test_bad_input_is_explained(kwargs, error, match):
    args = dict(
        x=torch.randn(3, 4), weight=torch.randn(5, 4), bias=torch.randn(5), target=torch.zeros(3, dtype=torch.int64)
    )
    options = {k: v for k, v in kwargs.items() if k in ("reduction", "ignore_index")}
    args.update({k: v for k, v in kwargs.items() if k not in options})
    with pytest.raises(error, match=match):
        kernels.masked_linear_cross_entropy(*args.values(), **options)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compilation of every shipped configuration
# --------------------------------------------------------------------------------------------
def _signatures(dtype):
    """Triton signatures of the three kernels for inputs of ``dtype``, and the arguments the JIT
    sees as multiples of 16 at BEiT's shapes (aligned pointers, C = 768, V = 8192)."""
    logits = {
        "X": f"*{dtype}", "W": f"*{dtype}", "BIAS": f"*{dtype}", "TARGET": "*i64", "LSE": "*fp32",
        "ROW_SCALE": "*fp32", "OUT": f"*{dtype}", "TILE_REF": "*fp32", "PART_MAX": "*fp32", "PART_SUM": "*fp32",
        "PART_BEST_ID": "*i32", "PART_TARGET": "*fp32", "R": "i32", "V": "i32", "C": "i32", "stride_xm": "i32",
        "stride_wv": "i32", "stride_om": "i32", "vocab_per_split": "i32", "num_tiles": "i32",
    }  # fmt: skip
    grad_weight = {
        "G": f"*{dtype}", "X": f"*{dtype}", "DW": "*fp32", "DB": "*fp32", "R": "i32", "V": "i32", "C": "i32",
        "stride_gm": "i32", "stride_xm": "i32",
    }  # fmt: skip
    finish = {
        "PART_MAX": "*fp32", "PART_SUM": "*fp32", "PART_BEST_ID": "*i32", "PART_TARGET": "*fp32", "TARGET": "*i64",
        "ROW_SCALE": "*fp32", "TILE_REF": "*fp32", "OUT": f"*{dtype}", "LSE": "*fp32", "LOSS": "*fp32",
        "CORRECT": "*i32", "R": "i32", "V": "i32", "num_splits": "i32", "num_tiles": "i32", "stride_om": "i32",
        "ignore_index": "i32",
    }  # fmt: skip
    return {
        "_logits_kernel": (logits, ("C", "V", "stride_xm", "stride_wv", "stride_om", "vocab_per_split")),
        "_grad_weight_kernel": (grad_weight, ("V", "C", "stride_gm", "stride_xm")),
        "_finish_rows_kernel": (finish, ("V", "stride_om")),
    }


def _spec(kernel, dtype, constexprs, arch, num_warps, num_stages):
    signature, aligned_ints = _signatures(dtype)[kernel]
    pointers = tuple(name for name, kind in signature.items() if kind.startswith("*"))
    return _testing.AotSpec(
        f"kernels._triton.masked_ce:{kernel}",
        signature,
        constexprs,
        arch,
        num_warps,
        num_stages,
        pointers + aligned_ints,
    )


def _shipped_specs():
    """bf16 (the training dtype): every autotune configuration of every kernel, in every mode
    (the statistics-only mode, a subset of the exp-storing one, at the first configuration).
    fp16 (the bf16 code with another element type) and fp32 (the FMA fallback): the first
    configuration of the logits kernel in its heaviest mode; fp32 also its dW and finish kernels."""
    stats, store_exp, grad = (False, False), (True, False), (False, True)
    jobs = []  # (dtype, kernel, config, modes)
    for i, config in enumerate(triton_masked_ce.LOGITS_CONFIGS_16BIT):
        jobs.append(("bf16", "_logits_kernel", config, (stats, store_exp, grad) if i == 0 else (store_exp, grad)))
    jobs += [("bf16", "_grad_weight_kernel", config, None) for config in triton_masked_ce.GRAD_WEIGHT_CONFIGS_16BIT]
    jobs.append(("fp16", "_logits_kernel", triton_masked_ce.LOGITS_CONFIGS_16BIT[0], (store_exp,)))
    jobs.append(("fp32", "_logits_kernel", triton_masked_ce.LOGITS_CONFIGS_FP32[0], (store_exp,)))
    jobs.append(("fp32", "_grad_weight_kernel", triton_masked_ce.GRAD_WEIGHT_CONFIGS_FP32[0], None))
    specs = []
    for arch in (80, 90):
        for dtype, kernel, config, modes in jobs:
            precision = {"DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
            if kernel == "_grad_weight_kernel":
                constexprs = {"NEED_WEIGHT": True, "NEED_BIAS": True, **precision, **config.kwargs}
                specs.append(_spec(kernel, dtype, constexprs, arch, config.num_warps, config.num_stages))
                continue
            for exp, from_lse in modes:
                constexprs = {
                    "HAS_BIAS": True, "STORE_EXP": exp, "GRAD_FROM_LSE": from_lse, "BLOCK_N": triton_masked_ce.VOCAB_TILE,
                    **precision, **config.kwargs,
                }  # fmt: skip
                specs.append(_spec(kernel, dtype, constexprs, arch, config.num_warps, config.num_stages))
        for dtype in ("bf16", "fp32"):
            constexprs = {
                "CONVERT": True,
                "BLOCK_R": triton_masked_ce.FINISH_BLOCK_R,
                "BLOCK_N": triton_masked_ce.VOCAB_TILE,
            }
            specs.append(_spec("_finish_rows_kernel", dtype, constexprs, arch, 4, 3))
    return specs


@pytest.mark.aot
@pytest.mark.slow
def test_shipped_configs_compile_without_spills():
    _testing.assert_fits_the_sm(_testing.aot_compile(_shipped_specs()))
