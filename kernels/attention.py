"""Attention with a relative position bias shared by the batch: fused forward and backward.

``out = softmax(q k^T * scale + bias) v`` for ``q, k, v [B, H, N, Dh]`` and one ``bias [H, N, N]``
for the whole batch (BEiT adds the same relative position bias to every image, and in
pretraining to every block). No ``[B, H, N, N]`` tensor is ever allocated, forward or backward,
and the bias gradient is summed over the batch inside the kernels.

Backends (``IMPLEMENTATIONS``): Triton kernels (``kernels/_triton/attention.py``, whose docstring
describes them, with their tiles and what padding costs: an online-softmax forward and one
backward kernel whose programs own whole sequences, so that dq, dk, dv take five matrix products
per tile pair and the bias gradient is summed over the batch in the same pass, without atomics),
the CUDA C++ kernels (``csrc/attention.cu``) and a PyTorch kernel.

Dispatch: CPU tensors take the PyTorch kernel (exact softmax in fp32, in batch chunks so its
memory stays bounded); on CUDA a call without a bias goes to PyTorch's scaled_dot_product_attention
(flash attention or cuDNN) under the ``auto`` backend, a call with a bias to the Triton kernels;
``kernels.set_backend`` selects the Triton, CUDA C++ (``csrc/attention.cu``) or PyTorch kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _checks, _dispatch, _scaffold
from .reference import relative_position_index

__all__ = ["relative_position_index", "relpos_attention", "relpos_attention_packed", "relpos_bias"]

OP = "relpos_attention"
MAX_HEAD_DIM = 128
CPU_CHUNK_BYTES = 32 << 20  # the PyTorch kernel's score chunk: bounded, still matmul-sized


def empty_bnhd(like: torch.Tensor) -> torch.Tensor:
    """A ``[B, H, N, Dh]`` tensor laid out as ``[B, N, H, Dh]``, so that the usual
    ``out.transpose(1, 2).reshape(B, N, H * Dh)`` after attention is a free view."""
    b, h, n, d = like.shape
    return like.new_empty(b, n, h, d).transpose(1, 2)


# --------------------------------------------------------------------------------------------
# PyTorch kernel (CPU, and the "torch" backend on CUDA): exact softmax in fp32, batch chunks
# --------------------------------------------------------------------------------------------
def _batch_chunk(q: torch.Tensor, chunk_bytes: int) -> int:
    b, h, n, _ = q.shape
    return max(1, chunk_bytes // max(1, 4 * h * n * n))


def _scores(q, k, bias32, scale):
    """Scores ``q k^T * scale + bias`` of one batch chunk in fp32, and the scaled q."""
    q_scaled = q.float() * scale  # the smaller operand
    scores = torch.matmul(q_scaled, k.float().transpose(-2, -1))
    if bias32 is not None:
        scores += bias32
    return scores, q_scaled


def _torch_forward(q, k, v, bias, scale, chunk_bytes: int = CPU_CHUNK_BYTES):
    out = empty_bnhd(q)
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    bias32 = None if bias is None else bias.to(q.dtype).float()  # rounded as the fused kernels read it
    step = _batch_chunk(q, chunk_bytes)
    for start in range(0, q.shape[0], step):
        part = slice(start, start + step)
        scores, _ = _scores(q[part], k[part], bias32, scale)
        row_max = scores.amax(-1, keepdim=True)
        weights = scores.sub_(row_max).exp_()  # in place: one N x N buffer
        row_sum = weights.sum(-1, keepdim=True)
        out[part] = torch.matmul(weights, v[part].float()).div_(row_sum)  # normalise N x Dh, not N x N
        lse[part] = (row_max + row_sum.log()).squeeze(-1)
    return out, lse


def _torch_backward(
    grad_out, q, k, v, bias, out, lse, scale, deterministic, need_dbias, grads=None, chunk_bytes=CPU_CHUNK_BYTES
):
    dq, dk, dv = grads if grads is not None else (empty_bnhd(q), empty_bnhd(k), empty_bnhd(v))
    dbias = torch.zeros(bias.shape, device=q.device, dtype=torch.float32) if need_dbias else None
    bias32 = None if bias is None else bias.to(q.dtype).float()
    step = _batch_chunk(q, chunk_bytes)
    for start in range(0, q.shape[0], step):
        part = slice(start, start + step)
        kf, vf, dof = k[part].float(), v[part].float(), grad_out[part].float()
        scores, q_scaled = _scores(q[part], kf, bias32, scale)
        probs = scores.sub_(lse[part, ..., None]).exp_()
        dv[part] = torch.matmul(probs.transpose(-2, -1), dof)
        # dS = P * (dP - delta), with delta = rowsum(P * dP) = rowsum(dO * O): [N, Dh] work, not [N, N]
        delta = (dof * out[part].float()).sum(-1, keepdim=True)
        dscores = torch.matmul(dof, vf.transpose(-2, -1)).sub_(delta).mul_(probs)
        dq[part] = torch.matmul(dscores, kf).mul_(scale)
        dk[part] = torch.matmul(dscores.transpose(-2, -1), q_scaled)
        if need_dbias:
            dbias += dscores.sum(0)
    return dq, dk, dv, (dbias.to(bias.dtype) if need_dbias else None)


# --------------------------------------------------------------------------------------------
# CUDA C++ kernels (csrc/attention.cu)
# --------------------------------------------------------------------------------------------
def _cuda_extension_forward(q, k, v, bias, scale):
    bias = None if bias is None else bias.to(q.dtype)
    return tuple(torch.ops.beitv2_cuda.relpos_attention(q, k, v, bias, scale))


def _cuda_extension_backward(grad_out, q, k, v, bias, out, lse, scale, deterministic, need_dbias, grads=None):
    # Its dbias kernel sums over the batch in a fixed order: deterministic either way.
    kernel_bias = None if bias is None else bias.to(q.dtype)
    dq, dk, dv, dbias = torch.ops.beitv2_cuda.relpos_attention_backward(
        grad_out, q, k, v, kernel_bias, out, lse, scale, need_dbias
    )
    if grads is not None:  # its kernels allocate their outputs: one copy into the caller's buffers
        for into, grad in zip(grads, (dq, dk, dv), strict=True):
            into.copy_(grad)
        dq, dk, dv = grads
    return dq, dk, dv, (dbias.to(bias.dtype) if need_dbias else None)


IMPLEMENTATIONS = {
    "triton": _dispatch.Implementation(
        _scaffold.triton_kernel("attention", "forward"),
        _scaffold.triton_kernel("attention", "backward"),
        available=_dispatch.triton_status,
    ),
    "cuda": _dispatch.Implementation(
        _cuda_extension_forward,
        _cuda_extension_backward,
        available=_dispatch.cuda_extension_status(OP),
        note="the portable reference backend: fp32 arithmetic on CUDA cores, no tensor cores, "
        "several times slower than Triton (auto prefers Triton)",
    ),
    "torch": _dispatch.Implementation(_torch_forward, _torch_backward),
}


# --------------------------------------------------------------------------------------------
# Op registration
# --------------------------------------------------------------------------------------------
def _run_forward(q, k, v, bias, scale):
    if q.numel() == 0:
        return empty_bnhd(q), q.new_empty(q.shape[:3], dtype=torch.float32)
    return _dispatch.select(q.device, IMPLEMENTATIONS).forward(q, k, v, bias, scale)


@_scaffold.custom_op("beitv2::relpos_attention")
def _relpos_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _run_forward(q, k, v, bias, scale)


@_relpos_attention_op.register_fake
def _relpos_attention_fake(q, k, v, bias, scale, deterministic):
    return empty_bnhd(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _run_backward(grad_out, q, k, v, bias, out, lse, scale, deterministic, need_dbias, grads=None):
    """dq, dk, dv (written into ``grads`` when given, else new) and dbias (empty unless ``need_dbias``)."""
    grad_out = _scaffold.unit_stride_rows(grad_out)
    if q.numel() == 0:
        dq, dk, dv = grads if grads is not None else (empty_bnhd(t) for t in (q, k, v))
        dq, dk, dv = dq.zero_(), dk.zero_(), dv.zero_()
        dbias = torch.zeros(bias.shape, device=bias.device, dtype=bias.dtype) if need_dbias else None
    else:
        dq, dk, dv, dbias = _dispatch.select(q.device, IMPLEMENTATIONS).backward(
            grad_out, q, k, v, bias, out, lse, scale, deterministic, need_dbias, grads=grads
        )
    return dq, dk, dv, (dbias if need_dbias else q.new_empty(0))


@_scaffold.custom_op("beitv2::relpos_attention_backward")
def _relpos_attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    deterministic: bool,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _run_backward(grad_out, q, k, v, bias, out, lse, scale, deterministic, need_dbias)


@_relpos_attention_backward_op.register_fake
def _relpos_attention_backward_fake(grad_out, q, k, v, bias, out, lse, scale, deterministic, need_dbias):
    dbias = bias.new_empty(bias.shape) if need_dbias else q.new_empty(0)
    return empty_bnhd(q), empty_bnhd(k), empty_bnhd(v), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, bias, scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, out, lse)
    ctx.scale, ctx.deterministic = scale, deterministic
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, bias, out, lse = ctx.saved_tensors
    need_dbias = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = _relpos_attention_backward_op(
        grad_out, q, k, v, bias, out, lse, ctx.scale, ctx.deterministic, need_dbias
    )
    return dq, dk, dv, (dbias if need_dbias else None), None, None


_relpos_attention_op.register_autograd(_backward, setup_context=_setup_context)


# The packed form: q, k and v come as views of the fused qkv projection's output, and the
# backward writes dq, dk and dv through strides into one gradient buffer of that layout, so
# that the model's backward needs no stack, permute or copy to feed the projection's matmul.
def split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, H, N, Dh]`` views of ``qkv [B, N, 3 * H * Dh]`` laid out ``[B, N, 3, H, Dh]``
    (the columns of BEiT's and timm's ``qkv`` Linear: q, k, v, and heads within each)."""
    b, n, width = qkv.shape
    return qkv.view(b, n, 3, num_heads, width // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)


@_scaffold.custom_op("beitv2::relpos_attention_packed")
def _relpos_attention_packed_op(
    qkv: torch.Tensor, bias: torch.Tensor | None, num_heads: int, scale: float, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _run_forward(*split_qkv(qkv, num_heads), bias, scale)


@_relpos_attention_packed_op.register_fake
def _relpos_attention_packed_fake(qkv, bias, num_heads, scale, deterministic):
    q = split_qkv(qkv, num_heads)[0]
    return empty_bnhd(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@_scaffold.custom_op("beitv2::relpos_attention_packed_backward")
def _relpos_attention_packed_backward_op(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    num_heads: int,
    scale: float,
    deterministic: bool,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_qkv = qkv.new_empty(qkv.shape)
    *_, dbias = _run_backward(
        grad_out, *split_qkv(qkv, num_heads), bias, out, lse, scale, deterministic, need_dbias,
        grads=split_qkv(grad_qkv, num_heads),
    )  # fmt: skip
    return grad_qkv, dbias


@_relpos_attention_packed_backward_op.register_fake
def _relpos_attention_packed_backward_fake(grad_out, qkv, bias, out, lse, num_heads, scale, deterministic, need_dbias):
    return qkv.new_empty(qkv.shape), bias.new_empty(bias.shape) if need_dbias else qkv.new_empty(0)


def _packed_setup_context(ctx, inputs, output):
    qkv, bias, num_heads, scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(qkv, bias, out, lse)
    ctx.num_heads, ctx.scale, ctx.deterministic = num_heads, scale, deterministic
    ctx.mark_non_differentiable(lse)


def _packed_backward(ctx, grad_out, grad_lse):
    qkv, bias, out, lse = ctx.saved_tensors
    need_dbias = bias is not None and ctx.needs_input_grad[1]
    grad_qkv, dbias = _relpos_attention_packed_backward_op(
        grad_out, qkv, bias, out, lse, ctx.num_heads, ctx.scale, ctx.deterministic, need_dbias
    )
    return grad_qkv, (dbias if need_dbias else None), None, None, None


_relpos_attention_packed_op.register_autograd(_packed_backward, setup_context=_packed_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, bias, scale, deterministic) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.check_tensor(OP, name, t, ndim=4)
    _checks.check_same_dtype(OP, q=q, k=k, v=v)
    _checks.check_same_device(OP, q=q, k=k, v=v, bias=bias)
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(
                f"{OP}: argument '{name}' must have the shape of 'q' {tuple(q.shape)} ([B, H, N, Dh]); "
                f"got {tuple(t.shape)}"
            )
    _checks.check_range(OP, "q.shape[-1] (Dh)", q.shape[-1], 1, MAX_HEAD_DIM)
    if bias is not None:
        _checks.check_tensor(OP, "bias", bias, ndim=(3, 4))
        _, h, n, _ = q.shape
        if tuple(bias.shape[-3:]) != (h, n, n) or (bias.dim() == 4 and bias.shape[0] != 1):
            raise ValueError(
                f"{OP}: argument 'bias' must have shape [H, N, N] = {[h, n, n]} or [1, H, N, N] "
                f"(one bias for the whole batch); got {tuple(bias.shape)}"
            )
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    ):
        raise TypeError(f"{OP}: argument 'scale' must be a finite float or None; got {scale!r}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"{OP}: argument 'deterministic' must be a bool; got {type(deterministic).__name__}")


def relpos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """Softmax attention with an additive bias shared by the batch: ``softmax(q k^T * scale + bias) v``.

    Args:
        q, k, v: ``[B, H, N, Dh]`` queries, keys and values of one dtype (float32, bfloat16 or
            float16), any strides (a copy is made only when the last dimension is strided);
            ``Dh`` at most 128.
        bias: ``[H, N, N]`` or ``[1, H, N, N]``, added to the scores of every batch element, in
            any float dtype: the kernels round it to the dtype of q (as autocast rounds the mask
            of ``scaled_dot_product_attention``); its gradient, summed over the batch in fp32,
            comes back in the bias's own dtype. ``-inf`` entries mask keys. None for plain
            attention.
        scale: multiplies ``q k^T``; default ``Dh ** -0.5``.
        deterministic: make every gradient bit-identical from run to run. The Triton, CUDA C++
            and PyTorch kernels here are so either way (the batch groups' partial bias gradients
            are added in a fixed order, never with atomics); the flag states the requirement
            for any backend that would need it.

    Returns:
        ``[B, H, N, Dh]`` in the dtype of ``q``, differentiable with respect to q, k, v and bias.
        The kernels here lay it out as ``[B, N, H, Dh]`` in memory, so that
        ``out.transpose(1, 2).reshape(B, N, H * Dh)`` needs no copy.

    On CUDA without a bias (and the ``auto`` backend) this is PyTorch's
    ``scaled_dot_product_attention``, which picks flash attention or cuDNN (with its own rules
    on determinism).
    """
    _check_inputs(q, k, v, bias, scale, deterministic)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if _uses_sdpa(q, bias):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    q, k, v = _scaffold.unit_stride_rows(q), _scaffold.unit_stride_rows(k), _scaffold.unit_stride_rows(v)
    out, _ = _relpos_attention_op(q, k, v, _one_bias(bias), scale, deterministic)
    return out


def _uses_sdpa(q: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Without a bias, CUDA tensors under the ``auto`` backend go to PyTorch's fused attention."""
    return bias is None and q.device.type == "cuda" and _dispatch.get_backend() == "auto"


def _one_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    return bias[0] if bias is not None and bias.dim() == 4 else bias


def relpos_attention_packed(
    qkv: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    num_heads: int,
    scale: float | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """:func:`relpos_attention` on the output of a fused qkv projection, with a packed gradient.

    Args:
        qkv: ``[B, N, 3 * H * Dh]``, its last dimension laid out ``[3, H, Dh]`` (q, k, v; heads
            within each), as ``nn.Linear(C, 3 * H * Dh)`` in BEiT and timm produces it; unit
            stride along the last dimension (otherwise it is copied once).
        bias, scale, deterministic: as for :func:`relpos_attention`.
        num_heads: H.

    Returns:
        ``[B, N, H * Dh]`` (the heads concatenated, ready for the output projection), in the
        dtype of ``qkv``. Its backward returns the gradient of ``qkv`` as one contiguous
        ``[B, N, 3 * H * Dh]`` tensor into which the kernels write dq, dk and dv directly.
    """
    _checks.check_tensor(OP, "qkv", qkv, ndim=3)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise TypeError(f"{OP}: argument 'num_heads' must be a positive int; got {num_heads!r}")
    if qkv.shape[-1] == 0 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(
            f"{OP}: argument 'qkv' must have a last dimension of 3 * num_heads * Dh = a positive multiple of "
            f"{3 * num_heads}; got shape {tuple(qkv.shape)}"
        )
    qkv = _scaffold.unit_stride_rows(qkv)
    q, k, v = split_qkv(qkv, num_heads)
    _check_inputs(q, k, v, bias, scale, deterministic)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if _uses_sdpa(q, bias):
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        out, _ = _relpos_attention_packed_op(qkv, _one_bias(bias), num_heads, scale, deterministic)
    batch, tokens, _ = qkv.shape
    return out.transpose(1, 2).reshape(batch, tokens, -1)


def relpos_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The relative position bias ``[H, N, N]`` gathered from BEiT's table.

    Args:
        table: ``[(2h-1)(2w-1)+3, H]`` learned bias per relative offset and head; the last three
            rows are class-token-to-patch, patch-to-class-token and class-token-to-itself
            (the layout of BEiT and timm).
        index: ``[N, N]`` integer entries of ``table`` for each query/key pair, as made by
            :func:`relative_position_index`.

    Returns:
        ``[H, N, N]`` contiguous, in the table's dtype; differentiable with respect to the table
        (the backward adds the ``[H, N, N]`` gradient into the table rows with ``index_add``).
    """
    if not torch.jit.is_scripting():  # the checks are Python; TorchScript compiles the gather only
        op = "relpos_bias"
        _checks.check_tensor(op, "table", table, ndim=2)
        _checks.check_tensor(op, "index", index, dtypes=(torch.int64, torch.int32), ndim=2)
        _checks.check_same_device(op, table=table, index=index)
        if index.shape[0] != index.shape[1]:
            raise ValueError(f"{op}: argument 'index' must be square [N, N]; got {tuple(index.shape)}")
    n = index.shape[0]
    # One gather straight into [H, N*N] (no [N, N, H] intermediate to permute); the backward of
    # index_select is index_add.
    return table.t().index_select(1, index.reshape(-1)).view(table.shape[1], n, n)
