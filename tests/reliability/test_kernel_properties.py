"""Property-based tests of the three ops (hypothesis, derandomized ``ci`` profile).

Over shapes, dtypes, memory layouts (contiguous, transposed, strided last dimension, expanded
with stride 0), backends and devices, every call must either equal the plain PyTorch reference
(``kernels/reference.py``, fp32, with the 2x rule of ``kernels/_testing.py`` for bf16/fp16)
or raise a ``TypeError``/``ValueError`` whose message names the argument: never a wrong answer,
a crash or a hang. Extreme values (large logits, near-tied and tied codes, fully masked rows,
all-ignored targets) stay finite wherever the reference is. The Triton kernels run under the
CPU interpreter here, on tiny shapes and few examples; on a GPU machine the same properties
run on CUDA with every backend.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels import _dispatch, _testing, reference
from kernels._triton import attention as triton_attention

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = ("contiguous", "transposed", "strided", "expanded")
ATTENTION_LAYOUTS = LAYOUTS + ("heads-major",)  # [B, N, H, Dh] in memory, as a model's qkv projection gives
# Backends a device can run: the Triton interpreter on the CPU is slow, so it gets fewer examples.
CASES = [("cpu", "torch", 25)]
if _dispatch.triton_interpret():
    CASES.append(("cpu", "triton", 8))
if torch.cuda.is_available():  # each new shape compiles and tunes the kernels (seconds): few examples
    CASES += [("cuda", "auto", 6), ("cuda", "triton", 6), ("cuda", "torch", 6)]
    if _dispatch.CUDA_EXTENSION_AVAILABLE:
        CASES.append(("cuda", "cuda", 6))
CASE_IDS = [f"{device}-{backend}" for device, backend, _ in CASES]


def _profile(examples: int) -> settings:
    return settings(settings.get_profile("ci"), max_examples=examples)


def _arrange(t: torch.Tensor, layout: str, dim: int = 0) -> torch.Tensor:
    """``t``'s values (or, for "expanded", its first slice along ``dim`` repeated) in another memory layout."""
    if layout == "transposed":  # the last dimension is not the unit-stride one
        return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t
    if layout == "strided":
        return _testing.non_contiguous(t)
    if layout == "heads-major":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "expanded" and t.shape[dim] > 0:
        return t.narrow(dim, 0, 1).expand_as(t)
    return t.contiguous()


def _values(draw, shape, dtype, device, scale=1.0):
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)


def _assert_matches(actual, expected, lowp, *, dtype, magnitude: float, name: str):
    """``actual`` within the tolerance rule of ``kernels/_testing.py`` (fp32: 1e-5 absolute and
    relative; 16-bit: twice torch's own error in that dtype) plus ``4 eps(dtype) * magnitude``.

    ``magnitude`` bounds the terms each value is summed from (and grows with the logits, whose
    rounding the softmax amplifies): a value that cancels to about 0 is still only known to
    within the rounding of its terms, which a bound relative to the result would forget.
    """
    error = _testing.max_error(actual, expected)
    bound = 4 * torch.finfo(dtype).eps * magnitude
    if dtype == torch.float32:
        scale = expected.float().abs().max().item() if expected.numel() else 0.0
        bound += _testing.FP32_TOLERANCE["atol"] + _testing.FP32_TOLERANCE["rtol"] * scale
    else:
        bound += 2 * _testing.max_error(lowp, expected) + 1e-6
    assert error <= bound, f"{name}: max error {error:.3g} exceeds {bound:.3g} ({dtype}, terms up to {magnitude:.3g})"


def _amax(t) -> float:
    return t.float().abs().max().item() if t is not None and t.numel() else 0.0


def _assert_clear_error(call, op: str, argument: str):
    with pytest.raises((TypeError, ValueError)) as error:
        call()
    assert f"{op}: argument '{argument}" in str(error.value), str(error.value)


# ------------------------------------------------------------------------------------------------
# codebook_lookup
# ------------------------------------------------------------------------------------------------
@st.composite
def codebook_calls(draw, device):
    dtype = draw(st.sampled_from(DTYPES))
    leading = draw(st.lists(st.integers(0, 6), min_size=0, max_size=2))
    d = draw(st.integers(1, 48))
    k = draw(st.integers(1, 70))
    z = _values(draw, (*leading, d), torch.float32, device)
    scale = draw(st.sampled_from([1.0, 1e-3, 1e3] + ([1e15, 1e-15] if dtype == torch.float32 else [])))
    z = (z * scale).to(dtype)
    codes = F.normalize(_values(draw, (k, d), torch.float32, device), dim=-1)
    duplicates = draw(st.lists(st.integers(0, k - 1), max_size=4))  # exact ties: later copies of codes
    codes = torch.cat([codes, codes[duplicates]]) if duplicates else codes
    if draw(st.booleans()) and z.numel():  # a row that lies exactly between two codes (near-tie)
        flat = z.reshape(-1, d)
        flat[0] = ((codes[0] + codes[-1]) * scale).to(dtype)
        z = flat.reshape(z.shape)
    codebook = codes.to(dtype)
    return _arrange(z, draw(st.sampled_from(LAYOUTS))), _arrange(codebook, draw(st.sampled_from(LAYOUTS)))


@pytest.mark.slow
@pytest.mark.parametrize("device, backend, examples", CASES, ids=CASE_IDS)
@pytest.mark.timeout(300)
def test_codebook_lookup_matches_the_reference(device, backend, examples):
    @_profile(examples)
    @given(codebook_calls(device))
    def check(call):
        z, codebook = call
        with kernels.set_backend(backend):
            ids, similarity = kernels.codebook_lookup(z, codebook)
        assert ids.shape == similarity.shape == z.shape[:-1] and ids.dtype == torch.int64
        if not ids.numel():
            return
        assert ((ids >= 0) & (ids < codebook.shape[0])).all()
        z32, codes32 = z.float().reshape(-1, z.shape[-1]), codebook.float()
        ref_ids, ref_similarity = reference.codebook_lookup(z32, codes32)
        chosen = (F.normalize(z32, dim=-1) * codes32[ids.reshape(-1)]).sum(-1)
        # A different pick is only allowed between codes whose similarities differ by rounding.
        rounding = 1e-5 if z.dtype == torch.float32 else 4 * torch.finfo(z.dtype).eps
        assert (ref_similarity - chosen).max().item() <= rounding
        assert torch.isfinite(similarity).all() and (similarity - chosen.reshape(ids.shape)).abs().max() <= rounding
        if backend == "triton" and device == "cpu":
            # The interpreter's tl.dot is NumPy's matmul, whose rounding depends on a code's column
            # within the tile (BLAS edge kernels on AVX-512 CPUs): exact copies can score one ulp
            # apart, so the lowest-index rule is checked on compiled backends only.
            return
        # Exact ties go to the lowest index: the chosen code is the first copy of its vector.
        first_copy = (codes32[None] == codes32[ids.reshape(-1)][:, None]).all(-1).float().argmax(-1)
        assert torch.equal(first_copy, ids.reshape(-1))

    check()


CODEBOOK_MISTAKES = {
    "z dtype": (lambda z, c: (z.int(), c), "z"),
    "z float64": (lambda z, c: (z.double(), c.double()), "z"),
    "z not a tensor": (lambda z, c: (z.tolist(), c), "z"),
    "z 0-d": (lambda z, c: (z[0, 0], c), "z"),
    "z wrong D": (lambda z, c: (F.pad(z, (0, 1)), c), "z"),
    "codebook 1-d": (lambda z, c: (z, c[0]), "codebook"),
    "codebook 3-d": (lambda z, c: (z, c[None]), "codebook"),
    "codebook empty": (lambda z, c: (z, c[:0]), "codebook"),
    "codebook int": (lambda z, c: (z, c.long()), "codebook"),
    "D too large": (lambda z, c: (z.repeat(1, 257), c.repeat(1, 257)), "codebook.shape[1]"),
}
if torch.cuda.is_available():
    CODEBOOK_MISTAKES["codebook on another device"] = (lambda z, c: (z, c.cuda()), "codebook")


@settings(settings.get_profile("ci"), max_examples=30)
@given(st.sampled_from(sorted(CODEBOOK_MISTAKES)), st.integers(1, 8), st.integers(1, 8), st.integers(1, 9))
def test_codebook_lookup_bad_calls_name_the_argument(mistake, m, k, d):
    change, argument = CODEBOOK_MISTAKES[mistake]
    z, codebook = change(torch.randn(m, d), F.normalize(torch.randn(k, d), dim=-1))
    _assert_clear_error(lambda: kernels.codebook_lookup(z, codebook), "codebook_lookup", argument)


# ------------------------------------------------------------------------------------------------
# masked_linear_cross_entropy
# ------------------------------------------------------------------------------------------------
@st.composite
def cross_entropy_calls(draw, device):
    dtype = draw(st.sampled_from(DTYPES))
    m, c, v = draw(st.integers(0, 24)), draw(st.integers(1, 40)), draw(st.integers(1, 70))
    logit_scale = draw(st.sampled_from([1.0, 1.0, 30.0] + ([1e3] if dtype == torch.float32 else [])))
    x = _values(draw, (m, c), dtype, device, scale=logit_scale)
    weight = _values(draw, (v, c), dtype, device, scale=c**-0.5)
    bias = _values(draw, (v,), dtype, device) if draw(st.booleans()) else None
    ignore_index = draw(st.sampled_from([-100, 0, v - 1]))
    ignored = draw(st.sampled_from(["none", "some", "all"]))
    target = _values(draw, (m,), torch.float32, "cpu").abs().mul(v).long().clamp(max=v - 1).to(device)
    if ignored == "all":
        target.fill_(ignore_index)
    elif ignored == "some" and m:
        target[::2] = ignore_index
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    x = _arrange(x, draw(st.sampled_from(LAYOUTS)))
    weight = _arrange(weight, draw(st.sampled_from(LAYOUTS)))
    return x, weight, bias, target, ignore_index, reduction


def _leaves(*tensors):
    """Fresh autograd leaves on the same memory (a clone would make strided or expanded inputs contiguous)."""
    return [None if t is None else t.detach().requires_grad_(True) for t in tensors]


def _cross_entropy(x, weight, bias, target, ignore_index, reduction, fused: bool):
    """(loss, num_correct, gradients of sum(loss)) from the op or the reference."""
    inputs = _leaves(x, weight, bias)
    if fused:
        loss, correct = kernels.masked_linear_cross_entropy(
            *inputs, target, ignore_index=ignore_index, reduction=reduction
        )
    else:
        loss, correct = reference.masked_linear_cross_entropy(*inputs, target, ignore_index, reduction)
    if loss.requires_grad:
        loss.sum().backward()
    return loss.detach(), correct, [None if t is None else t.grad for t in inputs]


@pytest.mark.slow
@pytest.mark.parametrize("device, backend, examples", CASES, ids=CASE_IDS)
@pytest.mark.timeout(300)
def test_masked_linear_cross_entropy_matches_the_reference(device, backend, examples):
    @_profile(examples)
    @given(cross_entropy_calls(device))
    def check(call):
        x, weight, bias, target, ignore_index, reduction = call
        dtype = x.dtype
        with kernels.set_backend(backend):
            loss, correct, grads = _cross_entropy(*call, fused=True)
        up = [None if t is None else t.float() for t in (x, weight, bias)]
        ref_loss, ref_correct, ref_grads = _cross_entropy(*up, target, ignore_index, reduction, fused=False)
        low_loss, _, low_grads = _cross_entropy(*call, fused=False)
        valid = target != ignore_index
        if reduction == "mean" and not valid.any():  # documented: 0 where the reference gives NaN
            assert loss.item() == 0.0 and all(g is None or not g.any() for g in grads)
            return
        assert torch.isfinite(loss).all(), "non-finite loss where the reference is finite"
        # Sizes of the terms: logits, and each gradient as a sum of (softmax - one-hot) products.
        logits = (up[0].abs() @ up[1].abs().t()).max().item() + _amax(up[2]) if x.shape[0] else 0.0
        row_weight = valid.float() / (valid.sum().clamp_min(1) if reduction == "mean" else 1)
        spread = 2 + logits  # |softmax - one-hot| summed over a row, and its sensitivity to the logits
        magnitudes = {
            "loss": (logits + 1) * (row_weight.sum().item() if reduction != "none" else 1),
            "x": _amax(row_weight) * _amax(up[1]) * spread,
            "weight": row_weight.sum().item() * _amax(up[0]) * spread,
            "bias": row_weight.sum().item() * spread,
        }
        _assert_matches(loss, ref_loss, low_loss, dtype=dtype, magnitude=magnitudes["loss"], name="loss")
        for name, grad, ref, low in zip(("x", "weight", "bias"), grads, ref_grads, low_grads, strict=True):
            if ref is not None:
                assert torch.isfinite(grad).all(), f"non-finite gradient of {name}"
                _assert_matches(grad, ref, low, dtype=dtype, magnitude=magnitudes[name], name=f"grad {name}")
        # num_correct: exact, except for rows whose two best logits are within rounding of each other.
        near_ties = 0
        if x.shape[0] and weight.shape[0] > 1:
            top = F.linear(*up).topk(2, dim=-1).values
            tolerance = 1e-4 if dtype == torch.float32 else 8 * torch.finfo(dtype).eps
            near_ties = int(((top[:, 0] - top[:, 1] <= tolerance * top[:, 0].abs().clamp_min(1)) & valid).sum())
        assert abs(int(correct) - int(ref_correct)) <= near_ties

    check()


CROSS_ENTROPY_MISTAKES = {
    "x 1-d": (dict(x=lambda x: x[0]), "x"),
    "x int": (dict(x=lambda x: x.long()), "x"),
    "weight other dtype": (dict(weight=lambda w: w.half()), "weight"),
    "weight wrong C": (dict(weight=lambda w: F.pad(w, (0, 1))), "weight"),
    "bias wrong V": (dict(bias=lambda b: F.pad(b, (0, 1))), "bias"),
    "bias 2-d": (dict(bias=lambda b: b[None]), "bias"),
    "target int32": (dict(target=lambda t: t.int()), "target"),
    "target wrong M": (dict(target=lambda t: F.pad(t, (0, 1))), "target"),
    "target out of range": (dict(target=lambda t: t + 1000), "target"),
    "reduction": (dict(reduction=lambda r: "avg"), "reduction"),
    "ignore_index float": (dict(ignore_index=lambda i: -100.0), "ignore_index"),
}
if torch.cuda.is_available():
    CROSS_ENTROPY_MISTAKES["weight on another device"] = (dict(weight=lambda w: w.cuda()), "weight")


@settings(settings.get_profile("ci"), max_examples=40)
@given(st.sampled_from(sorted(CROSS_ENTROPY_MISTAKES)), st.integers(1, 8), st.integers(1, 8), st.integers(2, 9))
def test_masked_linear_cross_entropy_bad_calls_name_the_argument(mistake, m, c, v):
    changes, argument = CROSS_ENTROPY_MISTAKES[mistake]
    args = dict(x=torch.randn(m, c), weight=torch.randn(v, c), bias=torch.randn(v), target=torch.randint(0, v, (m,)),
                ignore_index=-100, reduction="mean")  # fmt: skip
    args.update({name: change(args[name]) for name, change in changes.items()})
    call = lambda: kernels.masked_linear_cross_entropy(  # noqa: E731
        args["x"], args["weight"], args["bias"], args["target"], ignore_index=args["ignore_index"],
        reduction=args["reduction"],
    )  # fmt: skip
    _assert_clear_error(call, "masked_linear_cross_entropy", argument)


# ------------------------------------------------------------------------------------------------
# relpos_attention
# ------------------------------------------------------------------------------------------------
@st.composite
def attention_calls(draw, device):
    dtype = draw(st.sampled_from(DTYPES))
    b, h, n, d = draw(st.integers(0, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 20)), draw(st.integers(1, 40))
    magnitude = draw(st.sampled_from([1.0, 1.0, 10.0]))  # x10 on q and k: logits x100
    q, k, v = (_values(draw, (b, h, n, d), dtype, device, scale=s) for s in (magnitude, magnitude, 1.0))
    q, k, v = (_arrange(t, draw(st.sampled_from(ATTENTION_LAYOUTS))) for t in (q, k, v))
    bias_kind = draw(st.sampled_from(["none", "[H, N, N]", "[1, H, N, N]", "fp32 bias", "masked keys"]))
    bias = None
    if bias_kind != "none":
        bias = _values(draw, (h, n, n), torch.float32 if bias_kind == "fp32 bias" else dtype, device)
        if bias_kind == "[1, H, N, N]":
            bias = bias[None]
        if bias_kind == "masked keys" and n > 1:
            bias[..., draw(st.integers(0, n - 1))] = float("-inf")  # a key no query may see
    scale = draw(st.sampled_from([None, None, 0.0, -0.5, 2.0]))
    deterministic = draw(st.booleans())
    return q, k, v, bias, scale, deterministic


def _attention(q, k, v, bias, scale, fused: bool, deterministic=False):
    inputs = _leaves(q, k, v, bias)
    if fused:
        out = kernels.relpos_attention(*inputs, scale=scale, deterministic=deterministic)
    else:
        bias_in = inputs[3] if inputs[3] is None or inputs[3].dim() == 3 else inputs[3][0]
        out = reference.relpos_attention(*inputs[:3], bias_in, scale)
    (out * grad_weights(out)).sum().backward()
    return out.detach(), [None if t is None else t.grad for t in inputs]


def grad_weights(out: torch.Tensor) -> torch.Tensor:
    """The same upstream gradient dO for every implementation of one call."""
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)


@pytest.mark.slow
@pytest.mark.parametrize("device, backend, examples", CASES, ids=CASE_IDS)
@pytest.mark.timeout(300)
def test_relpos_attention_matches_the_reference(device, backend, examples, monkeypatch):
    monkeypatch.setattr(triton_attention, "AUTOTUNE", False)  # the first candidate tile: no tuning per shape

    @_profile(examples)
    @given(attention_calls(device))
    def check(call):
        q, k, v, bias, scale, deterministic = call
        dtype = q.dtype
        with kernels.set_backend(backend):
            out, grads = _attention(q, k, v, bias, scale, fused=True, deterministic=deterministic)
        assert out.shape == q.shape and out.dtype == dtype
        # The kernels round the bias to q's dtype (documented); the fp32 reference uses that bias.
        rounded_bias = None if bias is None else bias.to(dtype).float()
        ref, ref_grads = _attention(q.float(), k.float(), v.float(), rounded_bias, scale, fused=False)
        low, low_grads = _attention(q, k, v, None if bias is None else bias.to(dtype), scale, fused=False)
        assert torch.equal(torch.isfinite(out), torch.isfinite(ref)), "finite where the reference is not, or back"
        # Sizes of the terms: logits; out = P v; dv = P^T dO (columns of P sum to at most N);
        # dS = P (dP - rowsum(P dP)) with |dP| <= g; dq = scale dS k, dk = scale dS^T q, dbias = sum_b dS.
        b, h, n, d = q.shape
        s = q.shape[-1] ** -0.5 if scale is None else abs(scale)
        finite_bias = 0.0 if bias is None else _amax(torch.where(torch.isfinite(rounded_bias), rounded_bias, 0))
        logits = s * _amax(q) * _amax(k) * d + finite_bias
        spread = 1 + logits
        g = 2 * d * _amax(grad_weights(out)) * _amax(v)
        magnitudes = {
            "out": _amax(v) * spread, "v": n * _amax(grad_weights(out)) * spread, "q": s * g * _amax(k) * spread,
            "k": s * g * n * _amax(q) * spread, "bias": b * g * spread,
        }  # fmt: skip
        _assert_matches(out, ref, low, dtype=dtype, magnitude=magnitudes["out"], name="out")
        for name, grad, expected, lowp in zip(("q", "k", "v", "bias"), grads, ref_grads, low_grads, strict=True):
            if expected is None:
                continue
            assert grad.dtype == (q.dtype if name != "bias" else bias.dtype)
            finite = torch.isfinite(expected)
            assert torch.equal(torch.isfinite(grad), finite), f"grad {name}: non-finite where the reference is finite"
            _assert_matches(
                torch.where(finite, grad.float(), 0), torch.where(finite, expected, 0),
                torch.where(finite, lowp.float(), 0), dtype=dtype, magnitude=magnitudes[name], name=f"grad {name}",
            )  # fmt: skip

    check()


def test_relpos_attention_fully_masked_row_is_the_reference_nan():
    """A query that may see no key: NaN like the reference (softmax of nothing), on its row only."""
    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    bias = torch.zeros(2, 5, 5)
    bias[:, 3, :] = float("-inf")
    expected = reference.relpos_attention(q, k, v, bias)
    for backend in [backend for device, backend, _ in CASES if device == "cpu"]:
        with kernels.set_backend(backend):
            out = kernels.relpos_attention(q, k, v, bias)
        assert torch.isnan(out[:, :, 3]).all() and torch.isfinite(out[:, :, [0, 1, 2, 4]]).all(), backend
        torch.testing.assert_close(out, expected, equal_nan=True)


ATTENTION_MISTAKES = {
    "q 3-d": (dict(q=lambda t: t[0]), "q"),
    "q int": (dict(q=lambda t: t.long()), "q"),
    "k other shape": (dict(k=lambda t: t[:, :, :-1]), "k"),
    "v other dtype": (dict(v=lambda t: t.half()), "v"),
    "head dim too large": (
        dict(
            q=lambda t: t.repeat(1, 1, 1, 129), k=lambda t: t.repeat(1, 1, 1, 129), v=lambda t: t.repeat(1, 1, 1, 129)
        ),
        "q.shape[-1]",
    ),  # fmt: skip
    "bias per batch": (dict(bias=lambda b: b[None].repeat(2, 1, 1, 1)), "bias"),
    "bias wrong N": (dict(bias=lambda b: b[:, :-1]), "bias"),
    "bias int": (dict(bias=lambda b: b.long()), "bias"),
    "scale inf": (dict(scale=lambda s: float("inf")), "scale"),
    "scale string": (dict(scale=lambda s: "0.1"), "scale"),
    "deterministic int": (dict(deterministic=lambda d: 1), "deterministic"),
}
if torch.cuda.is_available():
    ATTENTION_MISTAKES["bias on another device"] = (dict(bias=lambda b: b.cuda()), "bias")


@settings(settings.get_profile("ci"), max_examples=40)
@given(
    st.sampled_from(sorted(ATTENTION_MISTAKES)),
    st.integers(1, 2),
    st.integers(1, 2),
    st.integers(2, 6),
    st.integers(1, 8),
)
def test_relpos_attention_bad_calls_name_the_argument(mistake, b, h, n, d):
    changes, argument = ATTENTION_MISTAKES[mistake]
    args = dict(q=torch.randn(b, h, n, d), k=torch.randn(b, h, n, d), v=torch.randn(b, h, n, d), bias=torch.randn(h, n, n),
                scale=None, deterministic=False)  # fmt: skip
    args.update({name: change(args[name]) for name, change in changes.items()})
    call = lambda: kernels.relpos_attention(  # noqa: E731
        args["q"], args["k"], args["v"], args["bias"], scale=args["scale"], deterministic=args["deterministic"]
    )
    _assert_clear_error(call, "relpos_attention", argument)
