"""Fused cosine codebook lookup: the nearest code of each row, without the ``[M, K]`` matrix.

For every row ``z_i`` of ``z [M, D]`` and an l2-normalised ``codebook [K, D]`` the op returns
``argmax_k <z_i / |z_i|, c_k>`` and that similarity. Scaling a row by a positive constant does not
change its argmax, so the kernels take the dot products with the raw row and divide only the
winning score by ``|z_i|``: one matmul tile at a time with a running (max, argmax) per row in
registers. The reference path (microsoft/unilm ``beit2/norm_ema_quantizer.py``) writes a full
``M x K`` distance matrix and a one-hot; at M = 50176, K = 8192 that is 1.6 GB before the argmin.

Backends: a Triton kernel (tiled over codes, split over codes as well when there are too few
rows to fill the GPU), the CUDA C++ kernel from ``csrc/codebook.cu``, and a PyTorch kernel that
works in chunks of rows so its extra memory stays bounded on the CPU.
"""

from __future__ import annotations

import torch

from . import _checks, _dispatch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch kernel serves every call
    triton = None

OP = "codebook_lookup"
MAX_DIM = 256
NORM_EPS = 1e-12  # F.normalize's default, so zero rows give similarity 0 like the reference
CPU_CHUNK_BYTES = 16 << 20  # the PyTorch kernel's similarity chunk: bounded, still matmul-sized


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _max_with_nan(a, b):
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _codebook_argmax_kernel(
        Z,  # [M, D] rows, unit stride along D
        CODEBOOK,  # [K, D] codes, unit stride along D
        BEST,  # [SPLIT, M] fp32: best raw dot product per row and split
        BEST_ID,  # [SPLIT, M] int64: its code index
        M,
        K,
        D,  #
        stride_zm,
        stride_cm,  #
        codes_per_split,  #
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        split = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < M
        dim_ok = dims < D
        z = tl.load(Z + rows[:, None] * stride_zm + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        best_id = tl.zeros([BLOCK_M], tl.int32)
        k_start = split * codes_per_split
        k_end = tl.minimum(k_start + codes_per_split, K)
        for k0 in range(k_start, k_end, BLOCK_K):
            codes = k0 + tl.arange(0, BLOCK_K)
            code_ok = codes < k_end
            c = tl.load(
                CODEBOOK + codes[:, None] * stride_cm + dims[None, :],
                mask=code_ok[:, None] & dim_ok[None, :],
                other=0.0,
            ).to(z.dtype)
            # -- scores of this tile, fp32 accumulation ----
            scores = tl.dot(z, tl.trans(c), input_precision=DOT_PRECISION)
            scores = tl.where(code_ok[None, :], scores, float("-inf"))
            # torch.argmax's rules: a NaN beats every number, then the lowest index wins. The max
            # propagates NaN; the tile's index is the lowest column equal to it (or the first NaN:
            # when the max is a number there is no NaN in the row).
            tile_best = tl.reduce(scores, 1, _max_with_nan)
            hit = (scores == tile_best[:, None]) | (scores != scores)
            tile_id = tl.min(tl.where(hit, codes[None, :], k_end), axis=1)
            # strictly greater: on a tie the earlier (lower) index stays
            better = (tile_best > best) | ((tile_best != tile_best) & (best == best))
            best = tl.where(better, tile_best, best)
            best_id = tl.where(better, tile_id, best_id)

        out = split * M + rows
        tl.store(BEST + out, best, mask=row_ok)
        tl.store(BEST_ID + out, best_id.to(tl.int64), mask=row_ok)

    AUTOTUNE_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm in (64, 128)
        for bk in (64, 128)
        for w in (4, 8)
        for s in (2, 3)
    ]

    def fits(config, block_d: int, fp32: bool) -> bool:
        """Tiles that compile without spills: the score tile per thread (fp32 FMA needs more
        registers per score than the tensor-core path) and the z and code tiles."""
        block_m, block_k = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_K"]
        scores_per_thread = block_m * block_k // (32 * config.num_warps)
        tile_bytes = (block_m + block_k) * block_d * (4 if fp32 else 2)
        return scores_per_thread <= (32 if fp32 else 128) and tile_bytes <= 32 * 1024

    def _prune_configs(configs, named_args, **kwargs):
        fp32 = kwargs["DOT_PRECISION"] == "ieee"
        kept = [c for c in configs if fits(c, kwargs["BLOCK_D"], fp32)]
        return kept or [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2)]

    _codebook_argmax_autotuned = triton.autotune(
        configs=AUTOTUNE_CONFIGS,
        key=["D", "K", "codes_per_split"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_codebook_argmax_kernel)

    # Small tiles for the CPU interpreter, where autotuning would only cost time.
    INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_K": 32}


def _num_splits(m: int, k: int, device: torch.device) -> int:
    """Split the codes over programs when the row blocks alone leave most SMs idle."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(m, 64)
    return max(1, min(triton.cdiv(2 * sms, row_blocks), triton.cdiv(k, 512)))


def _triton_lookup(z: torch.Tensor, codebook: torch.Tensor, normalize_input: bool):
    m, d = z.shape
    k = codebook.shape[0]
    splits = _num_splits(m, k, z.device)
    codes_per_split = triton.cdiv(k, splits)
    best = torch.empty(splits, m, device=z.device, dtype=torch.float32)
    best_id = torch.empty(splits, m, device=z.device, dtype=torch.int64)
    args = (z, codebook, best, best_id, m, k, d, z.stride(0), codebook.stride(0), codes_per_split)
    block_d = max(16, triton.next_power_of_2(d))
    precision = "ieee" if z.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    if _dispatch.triton_interpret():
        meta = INTERPRETER_CONFIG
        grid = (triton.cdiv(m, meta["BLOCK_M"]), splits)
        _codebook_argmax_kernel[grid](*args, BLOCK_D=block_d, DOT_PRECISION=precision, **meta)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), splits)  # noqa: E731
        _codebook_argmax_autotuned[grid](*args, BLOCK_D=block_d, DOT_PRECISION=precision)
    if splits == 1:
        best, ids = best[0], best_id[0]
    else:  # splits hold increasing code ranges: the first maximal split has the lowest index
        winner = best.argmax(dim=0, keepdim=True)
        best, ids = best.gather(0, winner)[0], best_id.gather(0, winner)[0]
    return ids, _finish_similarity(best, z, normalize_input)


def _finish_similarity(best_dot: torch.Tensor, z: torch.Tensor, normalize_input: bool) -> torch.Tensor:
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
    return ids, _finish_similarity(best, z, normalize_input)


def _cuda_extension_lookup(z: torch.Tensor, codebook: torch.Tensor, normalize_input: bool):
    return torch.ops.beitv2_cuda.codebook_lookup(z, codebook.to(z.dtype), normalize_input)


_IMPLEMENTATIONS = {"triton": _triton_lookup, "torch": _torch_lookup, "cuda": _cuda_extension_lookup}


# --------------------------------------------------------------------------------------------
# Op registration
# --------------------------------------------------------------------------------------------
def _run(z: torch.Tensor, codebook: torch.Tensor, normalize_input: bool):
    if z.shape[0] == 0:
        return z.new_empty(0, dtype=torch.int64), z.new_empty(0, dtype=torch.float32)
    implementation = _dispatch.resolve(z.device)
    return _IMPLEMENTATIONS[implementation](z, codebook, normalize_input)


@torch.library.custom_op("beitv2::codebook_lookup", mutates_args=(), device_types="cpu")
def _codebook_lookup_op(
    z: torch.Tensor, codebook: torch.Tensor, normalize_input: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _run(z, codebook, normalize_input)


@_codebook_lookup_op.register_kernel("cuda")
def _codebook_lookup_cuda(z, codebook, normalize_input):
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


def _unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


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
    rows = _unit_stride_rows(z.reshape(-1, z.shape[-1]))
    ids, similarity = _codebook_lookup_op(rows, _unit_stride_rows(codebook), normalize_input)
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
