"""Fused linear head + cross-entropy on the masked rows, without the ``[M, V]`` logits.

BEiT v2's loss runs the LM head (C = 768 to V = 8192 codes) on the masked patches only, twice
per image, and takes a cross-entropy. The reference path writes the logits, upcasts them to
fp32, keeps the fp32 log-softmax for the backward and makes a second pass for the accuracy: at
256 images per GPU that is M = 19200 rows and about 1.6 GB per head. Here the rows are processed
in chunks; for each chunk a Triton kernel computes logit tiles with tensor-core ``tl.dot``
(fp32 accumulation), folds them into a running log-sum-exp, argmax and target logit per row,
and the gradient of the logits goes straight into the two matmuls that give the gradients of
x, weight and bias. Only one chunk's gradient of the logits ever exists.

When the gradient is computed (``GRADIENT_IN_FORWARD``)
    With V = 8192 the logits are only about 11 times the size of the input rows, so recomputing
    them in the backward (Cut Cross-Entropy's choice for LLM vocabularies) costs a fourth
    ``2 M C V`` matmul, about what it saves in traffic. By default the forward therefore
    computes the gradients for a loss gradient of 1 (Liger's choice) and the backward only
    rescales them by the incoming gradient. In that pass each logit tile is stored once, as
    ``exp(logit - running max)`` in the input dtype (in ``(0, 1]``, so bf16 keeps its relative
    precision) with that running max per row, and a second kernel turns the stored tiles into the
    gradient once the row's log-sum-exp is known. ``reduction="none"`` (whose backward weights every row differently)
    and ``GRADIENT_IN_FORWARD = False`` use the other strategy: the forward keeps only the
    log-sum-exp per row and the backward recomputes the logits chunk by chunk.

Numerics: logits, log-sum-exp, loss and the weight and bias gradients are fp32; the gradient of
the logits is rounded to the input dtype before the two matmuls, as in the reference. For fp16
the ``1 / n`` of ``reduction="mean"`` is applied after the matmuls, so that a loss scale
(``torch.amp.GradScaler``) still protects the stored gradient from underflow.

Backends (``IMPLEMENTATIONS``): Triton (``kernels/_triton/masked_ce.py``) on CUDA (and on CPU
tensors under ``TRITON_INTERPRET=1``), with cuBLAS for the
``dlogits @ weight`` product; a chunked PyTorch kernel on the CPU (and the ``torch`` backend)
whose extra memory is one fp32 chunk of logits plus the gradients. There is no CUDA C++ version.
"""

from __future__ import annotations

import torch

from . import _checks, _dispatch, _scaffold

OP = "masked_linear_cross_entropy"
REDUCTIONS = ("mean", "sum", "none")
# Compute the gradients during the forward (see the module docstring); the benchmark flips it.
GRADIENT_IN_FORWARD = True
CPU_CHUNK_BYTES = 64 << 20  # fp32 logits of one row chunk in the PyTorch kernel (2048 rows at V = 8192)


# --------------------------------------------------------------------------------------------
# Shared pieces of both implementations
# --------------------------------------------------------------------------------------------
def chunk_rows(m: int, vocab: int, element_bytes: int, budget: int, multiple: int = 1) -> int:
    """Rows per chunk: at most ``budget`` bytes of ``[rows, vocab]``, spread evenly over the chunks."""
    most = max(multiple, budget // (vocab * element_bytes) // multiple * multiple)
    chunks = -(-m // most)
    rows = -(-m // chunks)
    return min(m, -(-rows // multiple) * multiple)


def folds_mean(dtype: torch.dtype) -> bool:
    """Whether the gradient stored by the forward includes the 1/n of the mean (not for fp16, where
    the loss scale that arrives in the backward must be applied before the smallest values underflow)."""
    return dtype != torch.float16


def row_weights(target: torch.Tensor, ignore_index: int, reduction: str, fold_mean: bool) -> torch.Tensor:
    """fp32 weight of each row's loss in the reduced loss: 0 for ignored rows, 1 / n for the mean."""
    valid = target != ignore_index
    weights = valid.float()
    if reduction == "mean" and fold_mean:
        weights /= valid.sum().clamp_min(1)
    return weights


def reduce_rows(loss_rows: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    # the mean over non-ignored rows, as F.cross_entropy; 0 (not NaN) when there are none
    return total / (target != ignore_index).sum().clamp_min(1) if reduction == "mean" else total


def grad_buffers(x, weight, compute_grads, *, zeroed: bool):
    """``(grad_x, grad_weight, grad_bias)`` outputs of the forward op: ``grad_x`` in x's dtype, the
    others fp32 accumulators; an empty tensor for each gradient not computed."""
    m, c = x.shape
    v = weight.shape[0]
    new = x.new_zeros if zeroed else x.new_empty
    need_x, need_weight, need_bias = compute_grads
    return (
        x.new_empty((m, c) if need_x else (0,)),
        new((v, c) if need_weight else (0,), dtype=torch.float32),
        new((v,) if need_bias else (0,), dtype=torch.float32),
    )


def _check_target_range(target: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bad.any():
        position = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{OP}: argument 'target' must hold class indices in [0, {vocab}) or ignore_index={ignore_index}; "
            f"got {int(target[position])} at position {position}"
        )


# --------------------------------------------------------------------------------------------
# PyTorch kernel (CPU, and the "torch" backend on CUDA): the same chunks, fp32 throughout
# --------------------------------------------------------------------------------------------
def _torch_logits(rows, weight32, bias32, buffer):
    """fp32 logits of ``rows`` written into ``buffer``, the one ``[chunk, V]`` tensor of a call."""
    out = buffer[: rows.shape[0]]
    rows = rows.float()
    return torch.mm(rows, weight32.t(), out=out) if bias32 is None else torch.addmm(bias32, rows, weight32.t(), out=out)


def _torch_exp_to_grad(exp_logits, normaliser, safe_target, valid, row_scale):
    """Turn ``exp(logit - c)`` (in place) into the gradient of ``sum_i row_scale[i] * loss_i``,
    where ``normaliser`` is each row's sum of ``exp(logit - c)``: one pass, then the target term."""
    exp_logits.mul_((row_scale / normaliser)[:, None])
    return exp_logits.scatter_add_(1, safe_target[:, None], -(row_scale * valid)[:, None])


def _torch_accumulate(grad, rows, weight32, start, end, grad_x, grad_weight, grad_bias, compute_grads):
    """Add one chunk's gradients; the first chunk writes the weight and bias buffers, which start
    uninitialised (zeroing 25 MB of weight gradient costs as much as a small chunk's product)."""
    need_x, need_weight, need_bias = compute_grads
    if need_x:
        grad_x[start:end] = grad @ weight32
    if need_weight:
        if start == 0:
            torch.mm(grad.t(), rows.float(), out=grad_weight)
        else:
            grad_weight.addmm_(grad.t(), rows.float())
    if need_bias:
        if start == 0:
            torch.sum(grad, 0, out=grad_bias)
        else:
            grad_bias += grad.sum(0)


def _torch_forward(x, weight, bias, target, ignore_index, reduction, compute_grads, chunk_bytes=None):
    m, v = x.shape[0], weight.shape[0]
    if target.device.type == "cpu":
        _check_target_range(target, v, ignore_index)
    weight32 = weight.float()
    bias32 = None if bias is None else bias.float()
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0)
    lse = x.new_empty(m, dtype=torch.float32)
    loss_rows = x.new_empty(m, dtype=torch.float32)
    correct = torch.zeros(m, device=x.device, dtype=torch.bool)
    grads = grad_buffers(x, weight, compute_grads, zeroed=m == 0)  # no chunk writes them when m == 0
    in_forward = any(compute_grads)
    if in_forward:
        row_scale = row_weights(target, ignore_index, reduction, folds_mean(x.dtype))
    chunk = chunk_rows(m, v, 4, CPU_CHUNK_BYTES if chunk_bytes is None else chunk_bytes) if m else 1
    buffer = x.new_empty(chunk, v, dtype=torch.float32)
    for start in range(0, m, chunk):
        end = min(start + chunk, m)
        logits = _torch_logits(x[start:end], weight32, bias32, buffer)
        row_max, best = logits.max(dim=1)  # first index of the max, as torch.argmax
        target_logit = logits.gather(1, safe_target[start:end, None])[:, 0]
        sum_exp = logits.sub_(row_max[:, None]).exp_().sum(dim=1)  # logits now hold exp(logit - max)
        lse[start:end] = row_max + sum_exp.log()
        loss_rows[start:end] = torch.where(valid[start:end], lse[start:end] - target_logit, 0.0)
        correct[start:end] = valid[start:end] & (best == target[start:end])
        if in_forward:
            grad = _torch_exp_to_grad(logits, sum_exp, safe_target[start:end], valid[start:end], row_scale[start:end])
            _torch_accumulate(grad, x[start:end], weight32, start, end, *grads, compute_grads)
    loss = reduce_rows(loss_rows, target, ignore_index, reduction)
    return loss, correct.sum(), lse, *grads


def _torch_backward(x, weight, bias, target, lse, grad_rows, ignore_index, compute_grads, chunk_bytes=None):
    m, v = x.shape[0], weight.shape[0]
    weight32 = weight.float()
    bias32 = None if bias is None else bias.float()
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0)
    grads = grad_buffers(x, weight, compute_grads, zeroed=m == 0)  # no chunk writes them when m == 0
    chunk = chunk_rows(m, v, 4, CPU_CHUNK_BYTES if chunk_bytes is None else chunk_bytes) if m else 1
    buffer = x.new_empty(chunk, v, dtype=torch.float32)
    for start in range(0, m, chunk):
        end = min(start + chunk, m)
        exp_logits = _torch_logits(x[start:end], weight32, bias32, buffer).sub_(lse[start:end, None]).exp_()
        grad = _torch_exp_to_grad(exp_logits, 1.0, safe_target[start:end], valid[start:end], grad_rows[start:end])
        _torch_accumulate(grad, x[start:end], weight32, start, end, *grads, compute_grads)
    return grads


# --------------------------------------------------------------------------------------------
# Op registration
# --------------------------------------------------------------------------------------------
IMPLEMENTATIONS = {
    "triton": _dispatch.Implementation(
        _scaffold.triton_kernel("masked_ce", "forward"),
        _scaffold.triton_kernel("masked_ce", "backward"),
        available=_dispatch.triton_status,
    ),
    "torch": _dispatch.Implementation(_torch_forward, _torch_backward),
}


def _forward(x, weight, bias, target, ignore_index, reduction, compute_grads):
    implementation = _dispatch.select(x.device, IMPLEMENTATIONS)
    return implementation.forward(x, weight, bias, target, ignore_index, reduction, tuple(compute_grads))


@_scaffold.custom_op("beitv2::masked_linear_cross_entropy")
def _masked_ce_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int,
    reduction: str,
    compute_grads: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, num_correct, lse, grad_x, grad_weight, grad_bias)``; the gradients (of the loss
    for a loss gradient of 1, before the 1/n of the mean for fp16) only where ``compute_grads``
    asks for them, else empty."""
    return _forward(x, weight, bias, target, ignore_index, reduction, compute_grads)


@_masked_ce_op.register_fake
def _masked_ce_fake(x, weight, bias, target, ignore_index, reduction, compute_grads):
    m = x.shape[0]
    loss = x.new_empty((m,) if reduction == "none" else (), dtype=torch.float32)
    num_correct = x.new_empty((), dtype=torch.int64)
    lse = x.new_empty(m, dtype=torch.float32)
    return loss, num_correct, lse, *grad_buffers(x, weight, compute_grads, zeroed=False)


def _backward(x, weight, bias, target, lse, grad_rows, ignore_index, compute_grads):
    compute_grads = tuple(compute_grads)
    grad_rows = grad_rows.float() * (target != ignore_index)  # ignored rows have no loss
    implementation = _dispatch.select(x.device, IMPLEMENTATIONS)
    grads = implementation.backward(x, weight, bias, target, lse, grad_rows, ignore_index, compute_grads)
    grad_x, grad_weight, grad_bias = grads
    return grad_x, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


@_scaffold.custom_op("beitv2::masked_linear_cross_entropy_backward")
def _masked_ce_backward_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    ignore_index: int,
    compute_grads: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for x, weight and bias (empty where not asked for) of ``sum_i grad_rows[i] * loss_i``
    (ignored rows have no loss), recomputing the logits chunk by chunk from the saved log-sum-exp."""
    return _backward(x, weight, bias, target, lse, grad_rows, ignore_index, compute_grads)


@_masked_ce_backward_op.register_fake
def _masked_ce_backward_fake(x, weight, bias, target, lse, grad_rows, ignore_index, compute_grads):
    grad_x, grad_weight, grad_bias = grad_buffers(x, weight, compute_grads, zeroed=False)
    return grad_x, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


def _setup_context(ctx, inputs, output):
    x, weight, bias, target, ignore_index, reduction, compute_grads = inputs
    loss, num_correct, lse, grad_x, grad_weight, grad_bias = output
    ctx.mark_non_differentiable(num_correct, lse, grad_x, grad_weight, grad_bias)
    ctx.ignore_index, ctx.reduction = ignore_index, reduction
    ctx.grads_in_forward = any(compute_grads)
    ctx.dtype = x.dtype
    if ctx.grads_in_forward:
        ctx.save_for_backward(target, grad_x, grad_weight, grad_bias)
    else:
        ctx.save_for_backward(x, weight, bias, target, lse)


def _masked_ce_backward(ctx, grad_loss, *unused_grads):
    needs = tuple(ctx.needs_input_grad[:3])
    if ctx.grads_in_forward:
        # The forward computed the gradients for a loss gradient of 1: rescale them.
        target, grad_x, grad_weight, grad_bias = ctx.saved_tensors
        factor = grad_loss.float()
        if ctx.reduction == "mean" and not folds_mean(ctx.dtype):
            factor = factor / (target != ctx.ignore_index).sum().clamp_min(1)
        grads = (
            grad_x * factor if needs[0] else None,
            (grad_weight * factor).to(ctx.dtype) if needs[1] else None,
            (grad_bias * factor).to(ctx.dtype) if needs[2] else None,
        )
        return *grads, None, None, None, None
    x, weight, bias, target, lse = ctx.saved_tensors
    grad_rows = row_weights(target, ctx.ignore_index, ctx.reduction, fold_mean=True) * grad_loss.float()
    grads = _masked_ce_backward_op(x, weight, bias, target, lse, grad_rows, ctx.ignore_index, list(needs))
    return *(g if need else None for g, need in zip(grads, needs, strict=True)), None, None, None, None


_masked_ce_op.register_autograd(_masked_ce_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def _autocast_inputs(x, weight, bias):
    """Under ``torch.autocast`` the head runs in the autocast dtype, as ``F.linear`` would."""
    device_type = x.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _check_inputs(x, weight, bias, target, ignore_index, reduction) -> None:
    _checks.check_tensor(OP, "x", x, ndim=2)
    _checks.check_tensor(OP, "weight", weight, ndim=2)
    if bias is not None:
        _checks.check_tensor(OP, "bias", bias, ndim=1)
    _checks.check_tensor(OP, "target", target, dtypes=(torch.int64,), ndim=1)
    _checks.check_same_device(OP, x=x, weight=weight, bias=bias, target=target)
    _checks.check_same_dtype(OP, x=x, weight=weight, bias=bias)
    m, c = x.shape
    if c == 0 or weight.shape[0] == 0:
        raise ValueError(
            f"{OP}: arguments 'x' and 'weight' must have at least one feature and one class; "
            f"got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    _checks.check_dim_size(OP, "weight", weight, 1, c, "the feature dimension C of 'x'")
    if bias is not None:
        _checks.check_dim_size(OP, "bias", bias, 0, weight.shape[0], "the number of classes V of 'weight'")
    _checks.check_dim_size(OP, "target", target, 0, m, "the number of rows M of 'x'")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{OP}: argument 'reduction' must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"{OP}: argument 'ignore_index' must be an int; got {type(ignore_index).__name__}")


def masked_linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the linear head ``x @ weight.T + bias`` and the number of correct argmaxes.

    The same result as ``F.cross_entropy(F.linear(x, weight, bias).float(), target)``, computed
    in row chunks without the ``[M, V]`` logits (see the module docstring for the design).
    Gradients flow to ``x``, ``weight`` and ``bias``; when one head serves several calls in a
    step, autograd adds up their weight and bias gradients as usual.

    Args:
        x: ``[M, C]`` float32/bfloat16/float16 rows (the masked positions, gathered by the caller).
        weight: ``[V, C]`` head weight, same dtype as ``x``.
        bias: ``[V]`` head bias, same dtype, or None.
        target: ``[M]`` int64 class indices in ``[0, V)``, or ``ignore_index`` for rows that
            count neither in the loss nor in ``num_correct``. On the CPU an index out of range
            raises ``ValueError``; on CUDA it is not checked (that would need a device sync):
            such a row's loss is its log-sum-exp and its gradient lacks the target term, and
            no memory outside the inputs is read.
        ignore_index: the target value of ignored rows.
        reduction: ``"mean"`` (over the non-ignored rows, like ``F.cross_entropy``; 0 when
            there are none, including M = 0, where the reference gives NaN), ``"sum"`` or
            ``"none"`` (per-row losses, 0 for ignored rows).

    Returns:
        ``(loss, num_correct)``: the fp32 loss (a scalar, or ``[M]`` for ``"none"``) and an
        int64 scalar counting non-ignored rows whose argmax (ties: the lowest index, as
        :func:`torch.argmax`) equals the target; ``num_correct`` has no gradient. Logits,
        log-sum-exp and the loss are accumulated in fp32. Under ``torch.autocast`` the inputs
        are cast to the autocast dtype first, as ``F.linear`` would.
    """
    for name, value in (("x", x), ("weight", weight), ("bias", bias)):
        if value is not None or name != "bias":
            _checks.check_tensor(OP, name, value)
    x, weight, bias = _autocast_inputs(x, weight, bias)
    _check_inputs(x, weight, bias, target, ignore_index, reduction)
    needs = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (x, weight, bias)]
    grads_now = GRADIENT_IN_FORWARD and reduction != "none" and any(needs)
    loss, num_correct, *_ = _masked_ce_op(
        _scaffold.unit_stride_rows(x),
        _scaffold.unit_stride_rows(weight),
        None if bias is None else bias.contiguous(),
        target.contiguous(),
        ignore_index,
        reduction,
        needs if grads_now else [False, False, False],
    )
    return loss, num_correct
