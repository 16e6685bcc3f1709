"""The Triton kernels of ``kernels.relpos_attention``, their tile tables and launchers (CUDA, or
the CPU interpreter under ``TRITON_INTERPRET=1``).

All softmax arithmetic is in fp32 and base 2; 16-bit inputs multiply on tensor cores with fp32
accumulation, fp32 inputs with exact fp32 products (CUDA cores).

Forward: a program per (query block, batch x head) streams the keys with an online softmax and
writes the output and the log-sum-exp (LSE) ``[B, H, N]``.

Backward: one kernel, a program per (head, batch group) that owns whole sequences: for each
batch of its group it computes ``delta = rowsum(dO * O)``, then visits every (key tile, query
tile) pair once with five matrix products, S = K Q^T, dP = V dO^T, dV += P^T dO, dK += dS^T Q
and dQ += dS K. dK and dV stay in registers over the query loop; dQ is added into a per-program
fp32 scratch of ``[N, Dh]`` (a few tens of KiB, so it stays in L2), which a last pass over the
queries writes out in the output dtype. The bias gradient of the program's group,
``sum over its batches of dS``, is added the same way into the group's own ``[H, N, N]`` fp32
slice; the slices are summed in a fixed order afterwards. No atomics anywhere: every gradient is
bit-identical from run to run. The outputs are written through their strides, so dq, dk and dv
may be views of one packed buffer.

Tiles and padding. Hopper's wgmma needs the M side of every product to be a multiple of 64; the
other sides need only 16 (bf16/fp16). Work done over the real ``N^2`` work:

- forward: 64-query blocks (M) meet full 64-key blocks, then 16-key tail tiles ("split tail"):
  N = 197: 256 x 208 / 197^2 = 1.37 (whole 64 x 64 tiles: 256^2 / 197^2 = 1.69);
  N = 1025: 1088 x 1040 / 1025^2 = 1.08 (1.13).
- backward: 64-key blocks (M of S^T, dP^T, dV, dK; 32 on sm_80 at Dh = 128) meet 16-query tiles (dq^T = K^T dS^T, Dh the
  M side): N = 197: 256 x 208 / 197^2 = 1.37; N = 1025: 1088 x 1040 / 1025^2 = 1.08. Head dims
  of 32 cannot be an M side, so they take 64-query tiles (dq = dS K): 1.69 and 1.13.
  Splitting the last key block too (16-key tiles with the queries as M: 1.14 at N = 197) was
  tried and dropped: the extra loop regions made ptxas spill on sm_90.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .. import _scaffold
from ..attention import empty_bnhd

# The first call of each shape benchmarks every candidate tile (seconds); with
# BEITV2_ATTENTION_AUTOTUNE=0 the first candidate runs at once (many shapes, quick test runs).
AUTOTUNE = os.environ.get("BEITV2_ATTENTION_AUTOTUNE", "1") != "0"

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------
@triton.jit
def _dims_and_mask(HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """The head-dim offsets and their mask; a constant mask (folded away) when Dh fills the tile,
    so that no broadcast mask tensor stays live in registers."""
    dims = tl.arange(0, BLOCK_D)
    if HEAD_DIM == BLOCK_D:
        return dims, tl.full([BLOCK_D], 1, tl.int1)
    return dims, dims < HEAD_DIM


@triton.jit
def _load_rows(BASE, rows, row_ok, dims, dim_ok, stride_row):
    """A ``[rows, dims]`` tile of one ``[N, Dh]`` head (unit stride along Dh), zeros outside."""
    return tl.load(BASE + rows[:, None] * stride_row + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)


@triton.jit
def _bias_log2(BIAS_HEAD, rows, cols, N, stride_m, TRANSPOSED: tl.constexpr):
    """The bias tile of query ``rows`` and key ``cols`` in fp32 base-2 units: ``[rows, cols]``, or
    ``[cols, rows]`` transposed."""
    if TRANSPOSED:
        ptrs = BIAS_HEAD + rows[None, :] * stride_m + cols[:, None]
        mask = (rows[None, :] < N) & (cols[:, None] < N)
    else:
        ptrs = BIAS_HEAD + rows[:, None] * stride_m + cols[None, :]
        mask = (rows[:, None] < N) & (cols[None, :] < N)
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) * LOG2E


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _fwd_tile(
    q, k_head, v_head, bias_head, rows, start_n, N, dims, dim_ok, stride_kn, stride_vn, stride_bias_m,
    m_i, l_i, acc, qk_scale, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One key tile of the online softmax: the updated (running max, running sum, accumulator)."""
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    k = _load_rows(k_head, cols, col_ok, dims, dim_ok, stride_kn)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if HAS_BIAS:
        s += _bias_log2(bias_head, rows, cols, N, stride_bias_m, False)
    s = tl.where(col_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # Rows whose scores so far are all -inf (a -inf bias) keep p = 0 instead of NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = _load_rows(v_head, cols, col_ok, dims, dim_ok, stride_vn)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _fwd_kernel(
    Q, K, V, BIAS, OUT, LSE,  #
    stride_qb, stride_qh, stride_qn,  #
    stride_kb, stride_kh, stride_kn,  #
    stride_vb, stride_vh, stride_vn,  #
    stride_ob, stride_oh, stride_on,  #
    stride_bias_h, stride_bias_m,  #
    H, N,  #
    qk_scale,  # scale * log2(e): the softmax runs in base 2
    HAS_BIAS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TAIL: tl.constexpr,  # key tile of the last N mod BLOCK_N keys; 0: whole BLOCK_N tiles throughout
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # One grid axis (the others stop at 65535); the query blocks of one head are neighbours,
    # so they share its keys in L2.
    pid = tl.program_id(0)
    num_query_blocks = tl.cdiv(N, BLOCK_M)
    pid_m = pid % num_query_blocks
    pid_bh = (pid // num_query_blocks).to(tl.int64)
    off_b = pid_bh // H
    off_h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims, dim_ok = _dims_and_mask(HEAD_DIM, BLOCK_D)
    row_ok = rows < N
    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, rows, row_ok, dims, dim_ok, stride_qn)
    k_head = K + off_b * stride_kb + off_h * stride_kh
    v_head = V + off_b * stride_vb + off_h * stride_vh
    bias_head = BIAS + off_h * stride_bias_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_end = (N // BLOCK_N) * BLOCK_N if TAIL > 0 else N
    for start_n in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _fwd_tile(
            q, k_head, v_head, bias_head, rows, start_n, N, dims, dim_ok, stride_kn, stride_vn, stride_bias_m,
            m_i, l_i, acc, qk_scale, HAS_BIAS, BLOCK_N, DOT_PRECISION,
        )  # fmt: skip
    if TAIL > 0:
        for start_n in range(full_end, N, TAIL):
            m_i, l_i, acc = _fwd_tile(
                q, k_head, v_head, bias_head, rows, start_n, N, dims, dim_ok, stride_kn, stride_vn, stride_bias_m,
                m_i, l_i, acc, qk_scale, HAS_BIAS, TAIL, DOT_PRECISION,
            )  # fmt: skip

    out = acc / l_i[:, None]
    out_ptrs = OUT + off_b * stride_ob + off_h * stride_oh + rows[:, None] * stride_on + dims[None, :]
    tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(LSE + pid_bh * N + rows, (m_i + tl.log2(l_i)) * LN2, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _add_dq(DQ_ACC, dq_part, rows, dims, dim_ok, N, after_first, TRANSPOSED: tl.constexpr, BLOCK_D: tl.constexpr):
    """Add one key tile's dq contribution (``[rows, Dh]``, or ``[Dh, rows]`` transposed) to the
    program's fp32 scratch; the first key tile stores instead of adding."""
    if TRANSPOSED:
        ok = (rows[None, :] < N) & dim_ok[:, None]
        ptrs = DQ_ACC + rows[None, :] * BLOCK_D + dims[:, None]
    else:
        ok = (rows[:, None] < N) & dim_ok[None, :]
        ptrs = DQ_ACC + rows[:, None] * BLOCK_D + dims[None, :]
    dq_part += tl.load(ptrs, mask=ok & after_first, other=0.0)
    tl.store(ptrs, dq_part, mask=ok)


@triton.jit
def _add_dbias(DBIAS_HEAD, ds, rows, cols, N, stride_m, after_first, TRANSPOSED: tl.constexpr):
    """Add dS (``[queries, keys]``, or ``[keys, queries]`` transposed) into the group's fp32 slice."""
    if TRANSPOSED:
        ok = (rows[None, :] < N) & (cols[:, None] < N)
        ptrs = DBIAS_HEAD + rows[None, :] * stride_m + cols[:, None]
    else:
        ok = (rows[:, None] < N) & (cols[None, :] < N)
        ptrs = DBIAS_HEAD + rows[:, None] * stride_m + cols[None, :]
    ds += tl.load(ptrs, mask=ok & after_first, other=0.0)
    tl.store(ptrs, ds, mask=ok)


@triton.jit
def _query_side(Q_HEAD, DO_HEAD, LSE_HEAD, DELTA_ACC, rows, N, dims, dim_ok, stride_qn, stride_don):
    """q, dO, the LSE in base 2 (+inf on padded rows, so their P is 0) and delta of query ``rows``."""
    row_ok = rows < N
    q = _load_rows(Q_HEAD, rows, row_ok, dims, dim_ok, stride_qn)
    do = _load_rows(DO_HEAD, rows, row_ok, dims, dim_ok, stride_don)
    lse2 = tl.load(LSE_HEAD + rows, mask=row_ok, other=float("inf")) * LOG2E
    delta = tl.load(DELTA_ACC + rows, mask=row_ok, other=0.0)
    return q, do, lse2, delta


@triton.jit
def _key_rows_tile(
    k, v, dk, dv, cols, start_m, Q_HEAD, DO_HEAD, LSE_HEAD, DELTA_ACC, BIAS_HEAD, DQ_ACC, DBIAS_HEAD,
    N, dims, dim_ok, stride_qn, stride_don, stride_bias_m, stride_dbias_m,
    qk_scale, after_first_key, after_first_batch,
    HAS_BIAS: tl.constexpr, NEED_DBIAS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    DQ_TRANSPOSED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One (key block, query tile) pair with the keys as the M side: ``[keys, queries]`` tiles.
    dq = dS K has the queries as its M side, so query tiles under 64 compute dq^T = K^T dS^T
    instead (Dh the M side)."""
    rows = start_m + tl.arange(0, BLOCK_Q)
    q, do, lse2, delta = _query_side(Q_HEAD, DO_HEAD, LSE_HEAD, DELTA_ACC, rows, N, dims, dim_ok, stride_qn, stride_don)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
    if HAS_BIAS:
        s_t += _bias_log2(BIAS_HEAD, rows, cols, N, stride_bias_m, True)
    # Padded queries have LSE = +inf; padded keys are masked so that no garbage reaches dq.
    p_t = tl.where((cols < N)[:, None], tl.exp2(s_t - lse2[None, :]), 0.0)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    ds_lowp = ds_t.to(q.dtype)
    dk += tl.dot(ds_lowp, q, input_precision=DOT_PRECISION)
    if DQ_TRANSPOSED:
        dq_part = tl.dot(tl.trans(k), ds_lowp, input_precision=DOT_PRECISION)
    else:
        dq_part = tl.dot(tl.trans(ds_lowp), k, input_precision=DOT_PRECISION)
    _add_dq(DQ_ACC, dq_part, rows, dims, dim_ok, N, after_first_key, DQ_TRANSPOSED, BLOCK_D)
    if NEED_DBIAS:
        _add_dbias(DBIAS_HEAD, ds_t, rows, cols, N, stride_dbias_m, after_first_batch, True)
    return dk, dv


@triton.jit
def _bwd_kernel(
    Q, K, V, BIAS, OUT, DOUT, LSE, DQ, DK, DV, DQ_ACC, DELTA_ACC, DBIAS,  #
    stride_qb, stride_qh, stride_qn,  #
    stride_kb, stride_kh, stride_kn,  #
    stride_vb, stride_vh, stride_vn,  #
    stride_ob, stride_oh, stride_on,  #
    stride_dob, stride_doh, stride_don,  #
    stride_dqb, stride_dqh, stride_dqn,  #
    stride_dkb, stride_dkh, stride_dkn,  #
    stride_dvb, stride_dvh, stride_dvn,  #
    stride_bias_h, stride_bias_m,  #
    stride_dbias_g, stride_dbias_h, stride_dbias_m,  #
    B, H, N,  #
    scale, qk_scale,  #
    batches_per_group,
    num_items,  # heads x batch groups
    HAS_BIAS: tl.constexpr,
    NEED_DBIAS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_KEYS: tl.constexpr,
    BLOCK_QUERIES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    dims, dim_ok = _dims_and_mask(HEAD_DIM, BLOCK_D)
    # The program's own scratch: dq in fp32 [N, BLOCK_D] and delta [N].
    dq_acc = DQ_ACC + pid.to(tl.int64) * N * BLOCK_D
    delta_acc = DELTA_ACC + pid.to(tl.int64) * N
    # A persistent grid: each program takes (head, batch group) items in turn.
    for item in range(pid, num_items, tl.num_programs(0)):
        off_h = (item % H).to(tl.int64)
        group = (item // H).to(tl.int64)
        bias_head = BIAS + off_h * stride_bias_h
        dbias_head = DBIAS + group * stride_dbias_g + off_h * stride_dbias_h
        b_start = group * batches_per_group
        b_end = tl.minimum(b_start + batches_per_group, B)
        for off_b in range(b_start, b_end):
            after_first_batch = off_b > b_start
            q_head = Q + off_b * stride_qb + off_h * stride_qh
            do_head = DOUT + off_b * stride_dob + off_h * stride_doh
            lse_head = LSE + (off_b * H + off_h) * N
            # delta_i = sum_j P_ij dP_ij = <dO_i, O_i>
            for start_m in range(0, N, BLOCK_QUERIES):
                rows = start_m + tl.arange(0, BLOCK_QUERIES)
                row_ok = rows < N
                o = _load_rows(OUT + off_b * stride_ob + off_h * stride_oh, rows, row_ok, dims, dim_ok, stride_on)
                do = _load_rows(do_head, rows, row_ok, dims, dim_ok, stride_don)
                tl.store(delta_acc + rows, tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1), mask=row_ok)
            tl.debug_barrier()

            for start_n in range(0, N, BLOCK_KEYS):
                cols = start_n + tl.arange(0, BLOCK_KEYS)
                col_ok = cols < N
                k = _load_rows(K + off_b * stride_kb + off_h * stride_kh, cols, col_ok, dims, dim_ok, stride_kn)
                v = _load_rows(V + off_b * stride_vb + off_h * stride_vh, cols, col_ok, dims, dim_ok, stride_vn)
                dk = tl.zeros([BLOCK_KEYS, BLOCK_D], tl.float32)
                dv = tl.zeros([BLOCK_KEYS, BLOCK_D], tl.float32)
                after_first_key = start_n > 0
                for start_m in range(0, N, BLOCK_QUERIES):
                    dk, dv = _key_rows_tile(
                        k, v, dk, dv, cols, start_m, q_head, do_head, lse_head, delta_acc, bias_head, dq_acc,
                        dbias_head, N, dims, dim_ok, stride_qn, stride_don, stride_bias_m, stride_dbias_m, qk_scale,
                        after_first_key, after_first_batch, HAS_BIAS, NEED_DBIAS, BLOCK_QUERIES, BLOCK_D,
                        BLOCK_QUERIES < 64, DOT_PRECISION,
                    )  # fmt: skip
                ok = col_ok[:, None] & dim_ok[None, :]
                dk_ptrs = DK + off_b * stride_dkb + off_h * stride_dkh + cols[:, None] * stride_dkn + dims[None, :]
                dv_ptrs = DV + off_b * stride_dvb + off_h * stride_dvh + cols[:, None] * stride_dvn + dims[None, :]
                tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=ok)
                tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=ok)
                # Scratch written by some threads is read by others in the next key block.
                tl.debug_barrier()
            # dq in its own dtype and layout, from the scratch; the next batch overwrites it.
            dq_head = DQ + off_b * stride_dqb + off_h * stride_dqh
            for start_m in range(0, N, BLOCK_QUERIES):
                rows = start_m + tl.arange(0, BLOCK_QUERIES)
                ok = (rows < N)[:, None] & dim_ok[None, :]
                dq = tl.load(dq_acc + rows[:, None] * BLOCK_D + dims[None, :], mask=ok)
                dq_ptrs = dq_head + rows[:, None] * stride_dqn + dims[None, :]
                tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=ok)
            tl.debug_barrier()


# --------------------------------------------------------------------------------------------
# Tile tables: a few candidates per kernel, precision ("16": bf16/fp16, "32": fp32) and
# BLOCK_D, each compiled ahead of time for sm_80 and sm_90 in tests/test_attention.py, which
# asserts wgmma on sm_90 for the 16-bit ones, no register spills anywhere, and prints registers.
#   forward:  (BLOCK_M, BLOCK_N, TAIL, num_warps, num_stages)
#   backward: (BLOCK_KEYS, BLOCK_QUERIES, num_warps, num_stages)
# 64-key backward tiles take one warpgroup (4 warps) on sm_90: with 8 warps, Triton 3.8 lays
# the [64, 16] score tiles out over warpsPerCTA [8, 1], which holds them twice (seen in TTGIR).
# 64-row forward tiles with 4 warps leave room for two programs per SM at Dh = 64; three
# stages prefetch the next key tile while the softmax of this one runs.
# fp32 products run on CUDA cores (exact), so fp32 tiles are smaller and never reach wgmma.
# --------------------------------------------------------------------------------------------
FORWARD_TILES = {
    ("16", 32): [(64, 64, 16, 4, 3), (128, 64, 16, 8, 3)],
    ("16", 64): [(64, 64, 16, 4, 3), (128, 64, 16, 8, 3)],
    ("16", 128): [(64, 64, 16, 4, 3), (128, 64, 16, 8, 2)],
    ("32", 32): [(32, 32, 16, 4, 2)],
    ("32", 64): [(32, 32, 16, 4, 2)],
    ("32", 128): [(32, 32, 16, 8, 2)],
}
BACKWARD_TILES = {
    ("16", 32): [(64, 64, 8, 1)],
    ("16", 64): [(64, 16, 8, 1)],
    ("16", 128): [(32, 16, 8, 1)],
    ("32", 32): [(16, 16, 4, 1)],
    ("32", 64): [(16, 16, 4, 1)],
    ("32", 128): [(16, 16, 8, 1)],
}
# sm_90: one warpgroup per 64 keys (see above); 8 warps on sm_80 split the 64 x Dh accumulators.
HOPPER_BACKWARD_TILES = {
    ("16", 32): [(64, 64, 4, 1)],
    ("16", 64): [(64, 16, 4, 1)],
    ("16", 128): [(64, 16, 8, 1)],
}
# The CPU interpreter: small tiles (autotuning would only cost time) so that short sequences
# still cross several blocks and ragged ends; key tails and the two forms of the dq product
# where the first shipped candidate has them.
INTERPRETER_TILES = {"fwd": (16, 16, 8), "bwd": (16, 16)}
# Backward programs per SM (a persistent grid) and the most memory the per-group fp32 slices of
# the bias gradient may take before the batch is cut into fewer, longer groups.
PROGRAMS_PER_SM = 2
DBIAS_SLICES_BYTES = 256 << 20


def _precision(dtype: torch.dtype) -> str:
    return "32" if dtype == torch.float32 else "16"


def block_d(head_dim: int) -> int:
    """The head dimension padded to a power of two, at least 32 (tl.dot needs 16): 80 -> 128."""
    return max(32, triton.next_power_of_2(head_dim))


def _fwd_config(tile) -> triton.Config:
    block_m, block_n, tail, warps, stages = tile
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "TAIL": tail}, num_warps=warps, num_stages=stages)


def _bwd_config(tile) -> triton.Config:
    keys, queries, warps, stages = tile
    return triton.Config({"BLOCK_KEYS": keys, "BLOCK_QUERIES": queries}, num_warps=warps, num_stages=stages)


def _tile_key(constexprs: dict) -> tuple[str, int]:
    return ("32" if constexprs["DOT_PRECISION"] == "ieee" else "16", constexprs["BLOCK_D"])


def shipped_tiles(kernel: str, arch: int) -> dict:
    """The candidates of ``kernel`` ("fwd" or "bwd") per (precision, BLOCK_D) on ``sm_<arch>``."""
    if kernel == "fwd":
        return FORWARD_TILES
    return {**BACKWARD_TILES, **HOPPER_BACKWARD_TILES} if arch // 10 == 9 else BACKWARD_TILES


def _device_arch() -> int:
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def _autotuned(kernel, name: str, make_config):
    """``kernel`` autotuned over the candidates of the call's (precision, BLOCK_D) and GPU."""
    every = [make_config(tile) for arch in (80, 90) for tiles in shipped_tiles(name, arch).values() for tile in tiles]
    every = list(dict.fromkeys(every))  # the autotuner prunes only when it has several

    def prune(configs, named_args, **kwargs):
        kept = [make_config(tile) for tile in shipped_tiles(name, _device_arch())[_tile_key(kwargs)]]
        return kept if AUTOTUNE else kept[:1]

    return triton.autotune(
        configs=every, key=["N", "HEAD_DIM", "HAS_BIAS"], prune_configs_by={"early_config_prune": prune}
    )(kernel)


_fwd_autotuned = _autotuned(_fwd_kernel, "fwd", _fwd_config)
_bwd_autotuned = _autotuned(_bwd_kernel, "bwd", _bwd_config)


def _interpreter_tiles(name: str, constexprs: dict) -> dict:
    """The interpreter's small tiles, with key tails and the dq product's form where the first
    shipped candidate (for sm_90) has them."""
    first = shipped_tiles(name, 90)[_tile_key(constexprs)][0]
    if name == "fwd":
        block_m, block_n, tail = INTERPRETER_TILES[name]
        return {"BLOCK_M": block_m, "BLOCK_N": block_n, "TAIL": tail if first[2] else 0}
    keys, queries = INTERPRETER_TILES[name]
    return {"BLOCK_KEYS": keys, "BLOCK_QUERIES": first[1] if first[1] >= 64 else queries}


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _strides(t: torch.Tensor) -> tuple[int, ...]:
    """Batch, head and row strides of a ``[B, H, N, Dh]`` tensor with unit stride along Dh."""
    return t.stride(0), t.stride(1), t.stride(2)


def padded_row_stride(n: int) -> int:
    """Rows of ``[N, N]`` matrices start at multiples of 16 elements, so that Triton knows their
    loads are aligned and vectorises them (N = 197 itself is not)."""
    return triton.cdiv(n, 16) * 16


def _kernel_bias(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The bias as the kernels read it: in the dtype of q (as autocast rounds SDPA's mask),
    unit column stride, rows padded to 16 elements. A copy of ``H x N x N`` elements when it is
    not already so: microseconds, against milliseconds of attention."""
    if bias is None:
        return None
    h, n, _ = bias.shape
    if bias.dtype == dtype and bias.stride(2) == 1 and bias.stride(1) % 16 == 0 and bias.stride(0) % 16 == 0:
        return bias
    padded = bias.new_empty(h, n, padded_row_stride(n), dtype=dtype)[..., :n]
    return padded.copy_(bias)


def _constexprs(q: torch.Tensor, bias: torch.Tensor | None) -> dict:
    d = q.shape[-1]
    return {
        "HAS_BIAS": bias is not None,
        "HEAD_DIM": d,
        "BLOCK_D": block_d(d),
        "DOT_PRECISION": _scaffold.dot_precision(q.dtype),
    }


def forward(q, k, v, bias, scale):
    """``(out, lse)``: the attention, laid out as :func:`kernels.attention.empty_bnhd`, and the
    log-sum-exp ``[B, H, N]`` in fp32."""
    b, h, n, _ = q.shape
    bias = _kernel_bias(bias, q.dtype)
    out = empty_bnhd(q)
    lse = q.new_empty(b, h, n, dtype=torch.float32)
    bias_strides = (0, 0) if bias is None else bias.stride()[:2]
    args = (
        q, k, v, q if bias is None else bias, out, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *bias_strides,
        h, n, scale * math.log2(math.e),
    )  # fmt: skip
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * b * h,)  # noqa: E731
    constexprs = _constexprs(q, bias)
    _scaffold.launch(_fwd_autotuned, _fwd_kernel, grid, args, constexprs, _interpreter_tiles("fwd", constexprs))
    return out, lse


def batch_groups(batch: int, heads: int, n: int, device: torch.device) -> int:
    """How many groups the batch is cut into for the bias gradient: enough (head, group) programs
    to fill the GPU PROGRAMS_PER_SM times, within DBIAS_SLICES_BYTES of fp32 slices (the
    interpreter: two groups exercise the final sum)."""
    affordable = max(1, DBIAS_SLICES_BYTES // (4 * heads * n * padded_row_stride(n)))
    return _scaffold.splits_to_fill(device, heads, min(batch, affordable), waves=PROGRAMS_PER_SM, cpu=min(batch, 2))


def _program_count(items: int, device: torch.device) -> int:
    """The persistent grid: PROGRAMS_PER_SM per SM (the interpreter: programs that loop)."""
    return min(items, PROGRAMS_PER_SM * _scaffold.sm_count(device) if device.type == "cuda" else 3)


def backward(grad_out, q, k, v, bias, out, lse, scale, deterministic, need_dbias, grads=None):
    """``(dq, dk, dv, dbias)``, bit-identical from run to run whatever ``deterministic`` says (no
    atomics). dq, dk, dv are written into ``grads`` when given (``[B, H, N, Dh]``, any strides with
    unit stride along Dh, for example views of one packed qkv gradient), or into new ones.
    dbias is ``[H, N, N]`` in the dtype of ``bias``, summed over the batch, or None without
    ``need_dbias``.
    """
    b, h, n, _ = q.shape
    dq, dk, dv = grads if grads is not None else (empty_bnhd(q), empty_bnhd(k), empty_bnhd(v))
    bias_dtype = None if bias is None else bias.dtype
    bias = _kernel_bias(bias, q.dtype)
    constexprs = {**_constexprs(q, bias), "NEED_DBIAS": need_dbias}
    groups = batch_groups(b, h, n, q.device) if need_dbias else b
    per_group = triton.cdiv(b, groups)
    groups = triton.cdiv(b, per_group)
    programs = _program_count(h * groups, q.device)
    # Per program: the fp32 dq of one sequence and its delta; per group: its dbias slice.
    dq_scratch = q.new_empty(programs, n, constexprs["BLOCK_D"], dtype=torch.float32)
    delta_scratch = q.new_empty(programs, n, dtype=torch.float32)
    row_stride = padded_row_stride(n)
    dbias_slices = q.new_empty(groups if need_dbias else 0, h, n, row_stride, dtype=torch.float32)
    bias_strides = (0, 0) if bias is None else bias.stride()[:2]
    args = (
        q, k, v, q if bias is None else bias, out, grad_out, lse, dq, dk, dv, dq_scratch, delta_scratch,
        dbias_slices if need_dbias else dq_scratch,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(grad_out),
        *_strides(dq), *_strides(dk), *_strides(dv), *bias_strides,
        h * n * row_stride, n * row_stride, row_stride,
        b, h, n, scale, scale * math.log2(math.e), per_group, h * groups,
    )  # fmt: skip
    grid = lambda meta: (programs,)  # noqa: E731
    _scaffold.launch(_bwd_autotuned, _bwd_kernel, grid, args, constexprs, _interpreter_tiles("bwd", constexprs))
    if not need_dbias:
        return dq, dk, dv, None
    dbias = dbias_slices[0] if groups == 1 else dbias_slices.sum(0)  # a fixed order: deterministic
    return dq, dk, dv, dbias[..., :n].to(bias_dtype).contiguous()
