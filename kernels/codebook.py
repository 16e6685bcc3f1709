"""Fused cosine codebook lookup: the nearest code of each row, without the ``[M, K]`` matrix.

For every row ``z_i`` of ``z [M, D]`` and an l2-normalised ``codebook [K, D]`` the op returns
``argmax_k <z_i / |z_i|, c_k>`` and that similarity. Scaling a row by a positive constant does not
change its argmax, so the kernels take the dot products with the raw row and divide only the
winning score by ``|z_i|``: one matmul tile at a time with a running (max, argmax) per row in
registers. The reference path (microsoft/unilm ``beit2/norm_ema_quantizer.py``) writes a full
``M x K`` distance matrix and a one-hot; at M = 50176, K = 8192 that is 1.6 GB before the argmin.

Backends (``IMPLEMENTATIONS``): a Triton kernel (``kernels/_triton/codebook.py``, tiled over
codes, split over codes as well when there are too few rows to fill the GPU), the CUDA C++ kernel
from ``csrc/codebook.cu``, and a PyTorch kernel that works in chunks of rows so its extra memory
stays bounded on the CPU.
"""

from __future__ import annotations

import torch

from . import _checks, _dispatch, _scaffold

OP = "codebook_lookup"
MAX_DIM = 256
NORM_EPS = 1e-12  # F.normalize's default, so zero rows give similarity 0 like the reference
CPU_CHUNK_BYTES = 16 << 20  # the PyTorch kernel's similarity chunk: bounded, still matmul-sized


def finish_similarity(best_dot: torch.Tensor, z: torch.Tensor, normalize_input: bool) -> torch.Tensor:
    """The similarity of the winning code from its raw dot product (every backend's last step)."""
    """The similarity of the winning code from its raw dot product (every backend's last step)."""
    if not normalize_input:
        return best_dot
    return best_dot / torch.linalg.vector_norm(z.float(), dim=-1).clamp_min(NORM_EPS)


# --------------------------------------------------------------------------------------------
# PyTorch kernel (CPU, and the "torch" backend on CUDA)
# --------------------------------------------------------------------------------------------
def _torch_lookup(z: torch.Tensor, codebook: torch.Tensor, normalize_input: bool, chunk_bytes: int = CPU_CHUNK_BYTES):
    m, k = z.shape[0], codebook.shape[0]
    codes = codebook.to(z.dtype).float().t()  # round to z's dtype like the fused kernels, accumulate in fp32
    rows_per_chunk = max(1, chunk_bytes // (4 * k))
    ids = torch.empty(m, device=z.device, dtype=torch.int64)
    best = torch.empty(m, device=z.device, dtype=torch.float32)
    for start in range(0, m, rows_per_chunk):
        scores = z[start : start + rows_per_chunk].float() @ codes
        chunk_ids = scores.argmax(dim=1, keepdim=True)
        ids[start : start + rows_per_chunk] = chunk_ids[:, 0]
        best[start : start + rows_per_chunk] = scores.gather(1, chunk_ids)[:, 0]
    return ids, finish_similarity(best, z, normalize_input)


def _cuda_extension_lookup(z: torch.Tensor, codebook: torch.Tensor, normalize_input: bool):
    return torch.ops.beitv2_cuda.codebook_lookup(z, codebook.to(z.dtype), normalize_input)


IMPLEMENTATIONS = {
    "triton": _dispatch.Implementation(
        _scaffold.triton_kernel("codebook", "lookup"), available=_dispatch.triton_status
    ),
    "cuda": _dispatch.Implementation(_cuda_extension_lookup, available=_dispatch.cuda_extension_status(OP)),
    "torch": _dispatch.Implementation(_torch_lookup),
}


# --------------------------------------------------------------------------------------------
# Op registration
# --------------------------------------------------------------------------------------------
def _run(z: torch.Tensor, codebook: torch.Tensor, normalize_input: bool):
    if z.shape[0] == 0:
        return z.new_empty(0, dtype=torch.int64), z.new_empty(0, dtype=torch.float32)
    return _dispatch.select(z.device, IMPLEMENTATIONS).forward(z, codebook, normalize_input)


@_scaffold.custom_op("beitv2::codebook_lookup")
def _codebook_lookup_op(
    z: torch.Tensor, codebook: torch.Tensor, normalize_input: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _run(z, codebook, normalize_input)


@_codebook_lookup_op.register_fake
def _codebook_lookup_fake(z, codebook, normalize_input):
    return z.new_empty(z.shape[0], dtype=torch.int64), z.new_empty(z.shape[0], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    z, codebook, normalize_input = inputs
    ids, similarity = output
    ctx.save_for_backward(z, codebook, ids, similarity)
    ctx.normalize_input = normalize_input
    ctx.mark_non_differentiable(ids)


def _backward(ctx, grad_ids, grad_similarity):
    # similarity_i = <z_i, c_id> / |z_i|: a gather and a row-wise formula, no [M, K] work.
    z, codebook, ids, similarity = ctx.saved_tensors
    grad = grad_similarity.float()[:, None]
    chosen = codebook.float()[ids]
    zf = z.float()
    if ctx.normalize_input:
        norm = torch.linalg.vector_norm(zf, dim=-1, keepdim=True).clamp_min(NORM_EPS)
        unit = zf / norm
        grad_z = grad * (chosen - similarity[:, None] * unit) / norm
    else:
        unit = zf
        grad_z = grad * chosen
    grad_codebook = None
    if ctx.needs_input_grad[1]:
        grad_codebook = (
            torch.zeros_like(codebook, dtype=torch.float32).index_add_(0, ids, grad * unit).to(codebook.dtype)
        )
    return grad_z.to(z.dtype), grad_codebook, None


_codebook_lookup_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def _check_inputs(z: torch.Tensor, codebook: torch.Tensor) -> None:
    _checks.check_tensor(OP, "z", z)
    _checks.check_tensor(OP, "codebook", codebook, ndim=2)
    _checks.check_same_device(OP, z=z, codebook=codebook)
    if z.dim() == 0:
        raise ValueError(f"{OP}: argument 'z' must have shape [..., D]; got a 0-dimensional tensor")
    d = codebook.shape[1]
    _checks.check_range(OP, "codebook.shape[1] (D)", d, 1, MAX_DIM)
    _checks.check_dim_size(OP, "z", z, -1, d, "the code dimension D of 'codebook'")
    if codebook.shape[0] == 0:
        raise ValueError(f"{OP}: argument 'codebook' must hold at least one code; got shape {tuple(codebook.shape)}")


def codebook_lookup(z: torch.Tensor, codebook: torch.Tensor, *, normalize_input: bool = True):
    """Index and cosine similarity of the nearest code for every row of ``z``.

    Args:
        z: ``[..., D]`` float32/bfloat16/float16 vectors (any leading dims).
        codebook: ``[K, D]`` codes, l2-normalised (as the VQ-KD quantizer keeps them; with
            codes of other norms the result is the maximum inner product). It is cast to
            ``z``'s dtype; products accumulate in fp32. D is at most 256.
        normalize_input: l2-normalise the rows of ``z`` first (with ``F.normalize``'s eps).
            The argmax does not depend on it, only the returned similarity does.

    Returns:
        ``(ids, similarity)``, both of shape ``z.shape[:-1]``: int64 indices (ties resolve to
        the lowest index, exactly like :func:`torch.argmax`; no gradient) and the fp32
        similarity of the chosen code (differentiable with respect to ``z`` and ``codebook``).
    """
    _check_inputs(z, codebook)
    rows = _scaffold.unit_stride_rows(z.reshape(-1, z.shape[-1]))
    ids, similarity = _codebook_lookup_op(rows, _scaffold.unit_stride_rows(codebook), normalize_input)
    return ids.reshape(z.shape[:-1]), similarity.reshape(z.shape[:-1])


def codebook_ema_stats(z: torch.Tensor, ids: torch.Tensor, num_codes: int):
    """Per-code counts ``[K]`` and sums of the assigned vectors ``[K, D]``, both fp32.

    The statistics of the quantizer's EMA update, by scatter-add instead of the reference's
    ``[M, K]`` one-hot. ``z`` is ``[..., D]`` and ``ids`` its ``z.shape[:-1]`` code indices;
    indices must lie in ``[0, num_codes)`` (``index_add_`` raises otherwise on the CPU).
    """
    op = "codebook_ema_stats"
    _checks.check_tensor(op, "z", z)
    _checks.check_tensor(op, "ids", ids, dtypes=(torch.int64, torch.int32))
    _checks.check_same_device(op, z=z, ids=ids)
    if ids.shape != z.shape[:-1]:
        raise ValueError(
            f"{op}: argument 'ids' must have shape {tuple(z.shape[:-1])} (z without its last dim); got {tuple(ids.shape)}"
        )
    if not isinstance(num_codes, int) or num_codes < 1:
        raise ValueError(f"{op}: argument 'num_codes' must be a positive int; got {num_codes!r}")
    flat_ids = ids.reshape(-1)
    rows = z.reshape(-1, z.shape[-1]).float()
    counts = torch.zeros(num_codes, device=z.device, dtype=torch.float32)
    counts.index_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.float32))
    sums = torch.zeros(num_codes, z.shape[-1], device=z.device, dtype=torch.float32).index_add_(0, flat_ids, rows)
    return counts, sums
