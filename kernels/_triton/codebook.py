"""Triton kernel of ``kernels.codebook_lookup``: a program per block of rows streams the codes
tile by tile, with a running (max, argmax) per row in registers; the codes are split over
programs as well when there are too few rows to fill the GPU."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _scaffold
from ..codebook import finish_similarity


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
        tile_best, tile_id = tl.max(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
        # strictly greater: on a tie the earlier (lower) index stays, as torch.argmax
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_id = tl.where(better, tile_id + k0, best_id)

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
    return _scaffold.splits_to_fill(device, triton.cdiv(m, 64), triton.cdiv(k, 512), waves=2)


def lookup(z: torch.Tensor, codebook: torch.Tensor, normalize_input: bool):
    m, d = z.shape
    k = codebook.shape[0]
    splits = _num_splits(m, k, z.device)
    codes_per_split = triton.cdiv(k, splits)
    best = torch.empty(splits, m, device=z.device, dtype=torch.float32)
    best_id = torch.empty(splits, m, device=z.device, dtype=torch.int64)
    args = (z, codebook, best, best_id, m, k, d, z.stride(0), codebook.stride(0), codes_per_split)
    constexprs = {"BLOCK_D": max(16, triton.next_power_of_2(d)), "DOT_PRECISION": _scaffold.dot_precision(z.dtype)}
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), splits)  # noqa: E731
    _scaffold.launch(_codebook_argmax_autotuned, _codebook_argmax_kernel, grid, args, constexprs, INTERPRETER_CONFIG)
    if splits == 1:
        best, ids = best[0], best_id[0]
    else:  # splits hold increasing code ranges: the first maximal split has the lowest index
        winner = best.argmax(dim=0, keepdim=True)
        best, ids = best.gather(0, winner)[0], best_id.gather(0, winner)[0]
    return ids, finish_similarity(best, z, normalize_input)
