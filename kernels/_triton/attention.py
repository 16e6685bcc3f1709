"""The Triton kernels of ``kernels.relpos_attention``, their tile tables and launchers.

All softmax arithmetic in fp32 and base 2; products on tensor cores with fp32
accumulation, exact fp32 products for fp32 inputs.

- forward: a program per (query block, batch x head) streams the key blocks with an online
  softmax and writes the output and the log-sum-exp (LSE) ``[B, H, N]`` the backward needs.
- backward, dq: a program per (query block, batch x head) computes ``delta = rowsum(dO * O)``
  and dq, recomputing the probabilities of each tile from the LSE.
- backward, dk/dv/dbias: a program per (key block, head, batch group) loops over the batches of
  its group. Where one tile spans all N queries and still fits in registers (16-bit inputs up
  to N = 256, which covers BEiT at 224 px; fp32 up to 64 or 128) the bias tile is loaded once
  and the bias gradient of the program's tile stays in registers for the whole batch loop, so
  the batch reduction costs nothing beyond the dk/dv work. Otherwise the dk/dv kernel loops
  over query blocks and a separate kernel reduces dbias the same way: a program per (query
  block, key block, head, batch group), batch loop innermost.
- the batch groups' partial bias gradients meet through fp32 atomic adds into one ``[H, N, N]``
  buffer, or, with ``deterministic=True``, are written per group and summed in a fixed order
  (bit-identical run to run; one ``[G, H, N, N]`` fp32 buffer more).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .. import _scaffold
from ..attention import empty_bnhd

# Sequences up to this length fit one query tile in the dk/dv kernel, which then also reduces
# dbias over the batch; longer ones use the separate dbias kernel.
FUSED_DBIAS_MAX_N = 256
# The first call of each shape benchmarks every candidate tile (seconds); with
# BEITV2_ATTENTION_AUTOTUNE=0 the first candidate runs at once (many shapes, quick test runs).
AUTOTUNE = os.environ.get("BEITV2_ATTENTION_AUTOTUNE", "1") != "0"


LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _load_rows(BASE, rows, row_ok, dims, dim_ok, stride_row):
    """A ``[rows, dims]`` tile of one ``[N, Dh]`` head (unit stride along Dh), zeros outside."""
    return tl.load(BASE + rows[:, None] * stride_row + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)


@triton.jit
def _load_bias_log2(BIAS_HEAD, rows, cols, N, stride_m, TRANSPOSED: tl.constexpr):
    """The bias tile in fp32 and base-2 units, ``[rows, cols]`` or transposed ``[cols, rows]``."""
    if TRANSPOSED:
        ptrs = BIAS_HEAD + rows[None, :] * stride_m + cols[:, None]
        mask = (rows[None, :] < N) & (cols[:, None] < N)
    else:
        ptrs = BIAS_HEAD + rows[:, None] * stride_m + cols[None, :]
        mask = (rows[:, None] < N) & (cols[None, :] < N)
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) * LOG2E


@triton.jit
def _query_block_and_head(N, BLOCK_M: tl.constexpr):
    """(query block, batch x head) of this program on a one-axis grid (the others stop at
    65535 programs); query blocks of one head are neighbours, so they share its keys in L2."""
    pid = tl.program_id(0)
    num_query_blocks = tl.cdiv(N, BLOCK_M)
    return pid % num_query_blocks, (pid // num_query_blocks).to(tl.int64)


@triton.jit
def _relpos_attention_fwd_kernel(
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = _query_block_and_head(N, BLOCK_M)
    off_b = pid_bh // H
    off_h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    dim_ok = dims < HEAD_DIM
    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, rows, row_ok, dims, dim_ok, stride_qn)
    k_head = K + off_b * stride_kb + off_h * stride_kh
    v_head = V + off_b * stride_vb + off_h * stride_vh
    bias_head = BIAS + off_h * stride_bias_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        k = _load_rows(k_head, cols, col_ok, dims, dim_ok, stride_kn)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            s += _load_bias_log2(bias_head, rows, cols, N, stride_bias_m, False)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows whose scores so far are all -inf (a -inf bias) keep p = 0 instead of NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_rows(v_head, cols, col_ok, dims, dim_ok, stride_vn)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    out_ptrs = OUT + off_b * stride_ob + off_h * stride_oh + rows[:, None] * stride_on + dims[None, :]
    tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(LSE + pid_bh * N + rows, (m_i + tl.log2(l_i)) * LN2, mask=row_ok)


@triton.jit
def _relpos_attention_bwd_dq_kernel(
    Q, K, V, BIAS, OUT, DOUT, LSE, DELTA, DQ,  #
    stride_qb, stride_qh, stride_qn,  #
    stride_kb, stride_kh, stride_kn,  #
    stride_vb, stride_vh, stride_vn,  #
    stride_ob, stride_oh, stride_on,  #
    stride_dob, stride_doh, stride_don,  #
    stride_dqb, stride_dqh, stride_dqn,  #
    stride_bias_h, stride_bias_m,  #
    H, N,  #
    scale, qk_scale,  #
    HAS_BIAS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = _query_block_and_head(N, BLOCK_M)
    off_b = pid_bh // H
    off_h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    dim_ok = dims < HEAD_DIM
    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, rows, row_ok, dims, dim_ok, stride_qn)
    do = _load_rows(DOUT + off_b * stride_dob + off_h * stride_doh, rows, row_ok, dims, dim_ok, stride_don)
    o = _load_rows(OUT + off_b * stride_ob + off_h * stride_oh, rows, row_ok, dims, dim_ok, stride_on)
    # delta_i = sum_j P_ij dP_ij = <dO_i, O_i>: computed here once, read by the dk/dv kernel.
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh * N + rows, delta, mask=row_ok)
    lse2 = tl.load(LSE + pid_bh * N + rows, mask=row_ok, other=float("inf")) * LOG2E
    k_head = K + off_b * stride_kb + off_h * stride_kh
    v_head = V + off_b * stride_vb + off_h * stride_vh
    bias_head = BIAS + off_h * stride_bias_h

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        k = _load_rows(k_head, cols, col_ok, dims, dim_ok, stride_kn)
        v = _load_rows(v_head, cols, col_ok, dims, dim_ok, stride_vn)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            s += _load_bias_log2(bias_head, rows, cols, N, stride_bias_m, False)
        # Padded keys are zero vectors, not -inf scores: mask their probabilities.
        p = tl.where(col_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + rows[:, None] * stride_dqn + dims[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _softmax_grad_transposed(
    k, v, Q_HEAD, DO_HEAD, LSE_HEAD, DELTA_HEAD, bias_t, rows, N, dims, dim_ok, stride_qn, stride_don,
    qk_scale, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """P^T and dS^T ``[keys, queries]`` of one tile, and the query-side tiles they came from.

    dS = P * (dO V^T - delta) is the gradient of the logits, so of the bias. Padded queries
    get P = 0 (their LSE reads as +inf); padded keys give garbage rows that are never stored.
    """
    row_ok = rows < N
    q = _load_rows(Q_HEAD, rows, row_ok, dims, dim_ok, stride_qn)
    do = _load_rows(DO_HEAD, rows, row_ok, dims, dim_ok, stride_don)
    lse2 = tl.load(LSE_HEAD + rows, mask=row_ok, other=float("inf")) * LOG2E
    delta = tl.load(DELTA_HEAD + rows, mask=row_ok, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
    if HAS_BIAS:
        s_t += bias_t
    p_t = tl.exp2(s_t - lse2[None, :])
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    return p_t, ds_t, q, do


@triton.jit
def _write_dbias_transposed(DBIAS_HEAD, dbias_t, rows, cols, N, stride_m, DBIAS_MODE: tl.constexpr):
    """Store (mode 1) or atomically add (mode 2) a ``[keys, queries]`` tile into ``[N, N]``."""
    ptrs = DBIAS_HEAD + rows[None, :] * stride_m + cols[:, None]
    mask = (rows[None, :] < N) & (cols[:, None] < N)
    if DBIAS_MODE == 2:
        tl.atomic_add(ptrs, dbias_t, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, dbias_t, mask=mask)


@triton.jit
def _relpos_attention_bwd_dkdv_kernel(
    Q, K, V, BIAS, DOUT, LSE, DELTA, DK, DV, DBIAS,  #
    stride_qb, stride_qh, stride_qn,  #
    stride_kb, stride_kh, stride_kn,  #
    stride_vb, stride_vh, stride_vn,  #
    stride_dob, stride_doh, stride_don,  #
    stride_dkb, stride_dkh, stride_dkn,  #
    stride_dvb, stride_dvh, stride_dvn,  #
    stride_bias_h, stride_bias_m,  #
    stride_dbias_g, stride_dbias_m,  # group stride 0: the groups add atomically into one buffer
    B, H, N,  #
    scale, qk_scale,  #
    batches_per_group,
    HAS_BIAS: tl.constexpr,
    DBIAS_MODE: tl.constexpr,  # 0: no dbias, 1: store the group's sum, 2: add it atomically
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # with DBIAS_MODE != 0 one query tile covers all N rows
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # One grid axis (the others stop at 65535): key block fastest, so that the programs
    # that read the same queries run together and share them in L2.
    pid = tl.program_id(0)
    num_key_blocks = tl.cdiv(N, BLOCK_N)
    pid_n = pid % num_key_blocks
    off_h = ((pid // num_key_blocks) % H).to(tl.int64)
    group = pid // (num_key_blocks * H)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < N
    dim_ok = dims < HEAD_DIM
    bias_head = BIAS + off_h * stride_bias_h
    if DBIAS_MODE != 0:
        # The bias tile is the same for every batch: load it once; sum dS over the batch loop.
        all_rows = tl.arange(0, BLOCK_M)
        bias_t = _load_bias_log2(bias_head, all_rows, cols, N, stride_bias_m, True)
        dbias_t = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    b_start = group.to(tl.int64) * batches_per_group
    b_end = tl.minimum(b_start + batches_per_group, B)
    for off_b in range(b_start, b_end):
        bh = off_b * H + off_h
        k = _load_rows(K + off_b * stride_kb + off_h * stride_kh, cols, col_ok, dims, dim_ok, stride_kn)
        v = _load_rows(V + off_b * stride_vb + off_h * stride_vh, cols, col_ok, dims, dim_ok, stride_vn)
        q_head = Q + off_b * stride_qb + off_h * stride_qh
        do_head = DOUT + off_b * stride_dob + off_h * stride_doh
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        if DBIAS_MODE != 0:
            p_t, ds_t, q, do = _softmax_grad_transposed(
                k, v, q_head, do_head, LSE + bh * N, DELTA + bh * N, bias_t, all_rows, N, dims, dim_ok,
                stride_qn, stride_don, qk_scale, HAS_BIAS, DOT_PRECISION,
            )  # fmt: skip
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
            dbias_t += ds_t
        else:
            for start_m in range(0, N, BLOCK_M):
                rows = start_m + tl.arange(0, BLOCK_M)
                bias_t = 0.0
                if HAS_BIAS:
                    bias_t = _load_bias_log2(bias_head, rows, cols, N, stride_bias_m, True)
                p_t, ds_t, q, do = _softmax_grad_transposed(
                    k, v, q_head, do_head, LSE + bh * N, DELTA + bh * N, bias_t, rows, N, dims, dim_ok,
                    stride_qn, stride_don, qk_scale, HAS_BIAS, DOT_PRECISION,
                )  # fmt: skip
                dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
                dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
        mask = col_ok[:, None] & dim_ok[None, :]
        dk_ptrs = DK + off_b * stride_dkb + off_h * stride_dkh + cols[:, None] * stride_dkn + dims[None, :]
        dv_ptrs = DV + off_b * stride_dvb + off_h * stride_dvh + cols[:, None] * stride_dvn + dims[None, :]
        tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=mask)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask)
    if DBIAS_MODE != 0:
        dbias_head = DBIAS + group.to(tl.int64) * stride_dbias_g + off_h * N * stride_dbias_m
        _write_dbias_transposed(dbias_head, dbias_t, all_rows, cols, N, stride_dbias_m, DBIAS_MODE)


@triton.jit
def _relpos_attention_bwd_dbias_kernel(
    Q, K, V, BIAS, DOUT, LSE, DELTA, DBIAS,  #
    stride_qb, stride_qh, stride_qn,  #
    stride_kb, stride_kh, stride_kn,  #
    stride_vb, stride_vh, stride_vn,  #
    stride_dob, stride_doh, stride_don,  #
    stride_bias_h, stride_bias_m,  #
    stride_dbias_g, stride_dbias_m,  #
    B, H, N,  #
    qk_scale,  #
    batches_per_group,
    DBIAS_MODE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # key block fastest, then query block, head, batch group
    num_key_blocks = tl.cdiv(N, BLOCK_N)
    num_query_blocks = tl.cdiv(N, BLOCK_M)
    pid_n = pid % num_key_blocks
    pid_m = (pid // num_key_blocks) % num_query_blocks
    pid_hg = pid // (num_key_blocks * num_query_blocks)
    off_h = (pid_hg % H).to(tl.int64)
    group = pid_hg // H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < N
    dim_ok = dims < HEAD_DIM
    bias_t = _load_bias_log2(BIAS + off_h * stride_bias_h, rows, cols, N, stride_bias_m, True)
    dbias_t = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    b_start = group.to(tl.int64) * batches_per_group
    b_end = tl.minimum(b_start + batches_per_group, B)
    for off_b in range(b_start, b_end):
        bh = off_b * H + off_h
        k = _load_rows(K + off_b * stride_kb + off_h * stride_kh, cols, col_ok, dims, dim_ok, stride_kn)
        v = _load_rows(V + off_b * stride_vb + off_h * stride_vh, cols, col_ok, dims, dim_ok, stride_vn)
        _, ds_t, _, _ = _softmax_grad_transposed(
            k, v, Q + off_b * stride_qb + off_h * stride_qh, DOUT + off_b * stride_dob + off_h * stride_doh,
            LSE + bh * N, DELTA + bh * N, bias_t, rows, N, dims, dim_ok, stride_qn, stride_don, qk_scale,
            True, DOT_PRECISION,
        )  # fmt: skip
        dbias_t += ds_t
    dbias_head = DBIAS + group.to(tl.int64) * stride_dbias_g + off_h * N * stride_dbias_m
    _write_dbias_transposed(dbias_head, dbias_t, rows, cols, N, stride_dbias_m, DBIAS_MODE)


# ----------------------------------------------------------------------------------------
# Autotuning candidates: a few per kernel and shape (tuning a new shape takes seconds), each
# compiled ahead of time for sm_80 and sm_90 without register spills (tests/test_attention.py
# prints registers and shared memory of every one). Keys: (kernel, 16-bit or fp32, BLOCK_D),
# plus BLOCK_M for the fused dk/dv/dbias kernel, whose query tile is the whole sequence.
# Values: (BLOCK_M, BLOCK_N, num_warps, num_stages).
# ----------------------------------------------------------------------------------------
CANDIDATES = {
    ("fwd", "16", 32): [(128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
    ("fwd", "16", 64): [(128, 64, 8, 2), (64, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
    ("fwd", "16", 128): [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2)],
    ("dq", "16", 32): [(128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
    ("dq", "16", 64): [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2), (64, 32, 8, 2)],
    ("dq", "16", 128): [(64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2)],
    ("dkdv_fused", "16", 32, 64): [(64, 64, 8, 2), (64, 32, 8, 2), (64, 16, 8, 2)],
    ("dkdv_fused", "16", 32, 128): [(128, 16, 8, 2), (128, 16, 8, 1), (128, 16, 4, 2)],
    ("dkdv_fused", "16", 32, 256): [(256, 16, 8, 2), (256, 16, 8, 1)],
    ("dkdv_fused", "16", 64, 64): [(64, 32, 8, 2), (64, 32, 4, 2), (64, 16, 8, 2)],
    ("dkdv_fused", "16", 64, 128): [(128, 32, 8, 2), (128, 32, 8, 1), (128, 16, 8, 2)],
    ("dkdv_fused", "16", 64, 256): [(256, 16, 8, 2), (256, 16, 8, 1)],
    ("dkdv_fused", "16", 128, 64): [(64, 32, 8, 2), (64, 16, 8, 2)],
    ("dkdv_fused", "16", 128, 128): [(128, 32, 8, 2), (128, 16, 8, 2)],
    ("dkdv", "16", 32): [(64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2)],
    ("dkdv", "16", 64): [(32, 128, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2), (16, 64, 8, 2)],
    ("dkdv", "16", 128): [(64, 32, 8, 2), (32, 32, 8, 2), (16, 64, 8, 2), (16, 32, 8, 2)],
    ("dbias", "16", 32): [(128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
    ("dbias", "16", 64): [(64, 64, 8, 2), (128, 32, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2)],
    ("dbias", "16", 128): [(128, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 2)],
    # fp32: exact products on CUDA cores need about twice the registers per score; no fused
    # dk/dv/dbias tile fits beyond these, so longer fp32 sequences take the separate kernel.
    ("fwd", "32", 32): [(64, 32, 8, 2), (32, 32, 4, 2), (64, 16, 8, 2)],
    ("fwd", "32", 64): [(32, 32, 4, 3), (16, 32, 8, 2), (64, 16, 8, 2)],
    ("fwd", "32", 128): [(32, 32, 8, 2), (16, 32, 8, 2), (32, 16, 8, 2)],
    ("dq", "32", 32): [(64, 32, 8, 2), (32, 32, 4, 2), (64, 16, 8, 2)],
    ("dq", "32", 64): [(64, 32, 8, 2), (32, 32, 8, 2), (64, 16, 8, 2)],
    ("dq", "32", 128): [(64, 16, 8, 2), (16, 32, 8, 2)],
    ("dkdv_fused", "32", 32, 64): [(64, 32, 8, 2), (64, 16, 4, 2)],
    ("dkdv_fused", "32", 32, 128): [(128, 16, 8, 2), (128, 32, 8, 2)],
    ("dkdv_fused", "32", 64, 64): [(64, 16, 8, 1), (64, 16, 8, 2)],
    ("dkdv", "32", 32): [(32, 32, 8, 2), (16, 32, 4, 2), (32, 16, 8, 2)],
    ("dkdv", "32", 64): [(32, 32, 8, 2), (16, 32, 8, 2), (16, 16, 8, 2)],
    ("dkdv", "32", 128): [(16, 16, 8, 2), (32, 16, 8, 2)],
    ("dbias", "32", 32): [(32, 32, 8, 2), (16, 32, 8, 2), (32, 16, 8, 2)],
    ("dbias", "32", 64): [(32, 32, 8, 2), (16, 32, 8, 2), (32, 16, 8, 2)],
    ("dbias", "32", 128): [(32, 32, 8, 2), (16, 32, 8, 2), (32, 16, 8, 2)],
}
# Twice the key tile of the sm_80 choice at BEiT's shape: spill-free on Hopper only (on sm_80
# ptxas spills 8 bytes). Halves how often each program re-reads the queries from L2.
HOPPER_CANDIDATES = {("dkdv_fused", "16", 64, 256): [(256, 32, 8, 2)]}


def candidates(kernel: str, block_d: int, fp32: bool, block_m: int | None = None, arch: int = 80):
    """The autotuning configurations of one kernel for one head-dim tile, precision and GPU."""
    key = (kernel, "32" if fp32 else "16", block_d) + ((block_m,) if kernel == "dkdv_fused" else ())
    tiles = CANDIDATES[key] + (HOPPER_CANDIDATES.get(key, []) if arch // 10 == 9 else [])
    return [_config(bm, bn, w, s, fused=kernel == "dkdv_fused") for bm, bn, w, s in tiles]


def _config(block_m, block_n, warps, stages, fused=False):
    kwargs = {"BLOCK_N": block_n} if fused else {"BLOCK_M": block_m, "BLOCK_N": block_n}
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


def _device_arch() -> int:
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def _autotuned(kernel, name: str, **extra):
    """``kernel`` autotuned over every candidate of ``name``, pruned to those of the call's shape."""
    every = []
    for key, tiles in [*CANDIDATES.items(), *HOPPER_CANDIDATES.items()]:
        every += [_config(*tile, fused=name == "dkdv_fused") for tile in tiles] if key[0] == name else []
    every = list(dict.fromkeys(every))  # the autotuner prunes only when it has several

    def prune(configs, named_args, **kwargs):
        fp32 = kwargs["DOT_PRECISION"] == "ieee"
        kept = candidates(name, kwargs["BLOCK_D"], fp32, kwargs.get("BLOCK_M"), _device_arch())
        return kept if AUTOTUNE else kept[:1]

    return triton.autotune(
        configs=every,
        key=["N", "HEAD_DIM", "HAS_BIAS"],
        prune_configs_by={"early_config_prune": prune},
        **extra,
    )(kernel)


_fwd_autotuned = _autotuned(_relpos_attention_fwd_kernel, "fwd")
_dq_autotuned = _autotuned(_relpos_attention_bwd_dq_kernel, "dq")
# Atomic adds accumulate across the autotuner's trial runs: zero the buffer before each.
_dkdv_fused_autotuned = _autotuned(_relpos_attention_bwd_dkdv_kernel, "dkdv_fused", reset_to_zero=["DBIAS"])
_dkdv_autotuned = _autotuned(_relpos_attention_bwd_dkdv_kernel, "dkdv")
_dbias_autotuned = _autotuned(_relpos_attention_bwd_dbias_kernel, "dbias", reset_to_zero=["DBIAS"])

# Small tiles for the CPU interpreter, where autotuning would only cost time; several key
# blocks per row even at small N, so that the online softmax and the masks are exercised.
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16}


def _block_d(head_dim: int) -> int:
    """The head dimension padded to a power of two, at least 32 (the smallest tile of the tuned
    configurations; tl.dot needs 16): 80 -> 128, 8 -> 32."""
    return max(32, triton.next_power_of_2(head_dim))


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    """Batch, head and row strides of a ``[B, H, N, Dh]`` tensor with unit stride along Dh."""
    return t.stride(0), t.stride(1), t.stride(2)


def _padded_row_stride(n: int) -> int:
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
    padded = bias.new_empty(h, n, _padded_row_stride(n), dtype=dtype)[..., :n]
    return padded.copy_(bias)


def fused_dbias_block(n: int, block_d: int, fp32: bool) -> int | None:
    """The query tile of the fused dk/dv/dbias kernel (all N rows), or None where no tile that
    large compiles without spills (then the separate dbias kernel runs)."""
    block_m = max(64, triton.next_power_of_2(n))
    fits = ("dkdv_fused", "32" if fp32 else "16", block_d, block_m) in CANDIDATES
    return block_m if n <= FUSED_DBIAS_MAX_N and fits else None


def _constexprs(q: torch.Tensor, bias: torch.Tensor | None) -> dict:
    d = q.shape[-1]
    return {
        "HAS_BIAS": bias is not None,
        "HEAD_DIM": d,
        "BLOCK_D": _block_d(d),
        "DOT_PRECISION": _scaffold.dot_precision(q.dtype),
    }


def forward(q, k, v, bias, scale):
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
    _scaffold.launch(_fwd_autotuned, _relpos_attention_fwd_kernel, grid, args, _constexprs(q, bias), INTERPRETER_CONFIG)
    return out, lse


def backward(grad_out, q, k, v, bias, out, lse, scale, deterministic, need_dbias, grads=None):
    """dq, dk, dv and dbias. ``grads``: ``[B, H, N, Dh]`` tensors (any strides, unit stride along
    Dh: views of one packed qkv gradient) that the kernels write dq, dk and dv into."""
    b, h, n, _ = q.shape
    bias_dtype = None if bias is None else bias.dtype
    bias = _kernel_bias(bias, q.dtype)
    bias_arg = q if bias is None else bias
    bias_strides = (0, 0) if bias is None else bias.stride()[:2]
    dq, dk, dv = grads if grads is not None else (empty_bnhd(q), empty_bnhd(k), empty_bnhd(v))
    delta = torch.empty_like(lse)
    constexprs = _constexprs(q, bias)
    qk_scale = scale * math.log2(math.e)

    args = (
        q, k, v, bias_arg, out, grad_out, lse, delta, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(grad_out), *_strides(dq),
        *bias_strides, h, n, scale, qk_scale,
    )  # fmt: skip
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * b * h,)  # noqa: E731
    _scaffold.launch(_dq_autotuned, _relpos_attention_bwd_dq_kernel, grid, args, constexprs, INTERPRETER_CONFIG)

    fp32 = q.dtype == torch.float32
    fused_block_m = fused_dbias_block(n, constexprs["BLOCK_D"], fp32) if need_dbias else None
    dbias, dbias_mode, stride_dbias_g, per_group = q, 0, 0, 1
    if need_dbias:
        key_blocks = triton.cdiv(n, 64)
        tiles = h * key_blocks if fused_block_m else h * key_blocks * key_blocks
        # Batch groups enough for tiles x groups programs to fill the GPU a few times over; each
        # program then reduces dbias over the batches of its group. The interpreter: two groups
        # exercise the cross-group reduction.
        wanted = _scaffold.splits_to_fill(q.device, tiles, b, waves=4, cpu=min(b, 2))
        per_group = triton.cdiv(b, wanted)
        groups = triton.cdiv(b, per_group)
        # One buffer the groups add into atomically, or one slice per group summed in a fixed order.
        atomic = groups > 1 and not deterministic
        row_stride = _padded_row_stride(n)
        shape = (1 if atomic else groups, h, n, row_stride)
        dbias = q.new_zeros(shape, dtype=torch.float32) if atomic else q.new_empty(shape, dtype=torch.float32)
        dbias_mode = 2 if atomic else 1
        stride_dbias_g = 0 if atomic else dbias.stride(0)

    dkdv_args = (
        q, k, v, bias_arg, grad_out, lse, delta, dk, dv, dbias,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv),
        *bias_strides, stride_dbias_g, _padded_row_stride(n), b, h, n, scale, qk_scale, per_group,
    )  # fmt: skip
    if fused_block_m:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * h * triton.cdiv(b, per_group),)  # noqa: E731
        fused = {**constexprs, "DBIAS_MODE": dbias_mode, "BLOCK_M": fused_block_m}
        _scaffold.launch(
            _dkdv_fused_autotuned, _relpos_attention_bwd_dkdv_kernel, grid, dkdv_args, fused, INTERPRETER_CONFIG
        )
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * h * b,)  # noqa: E731
        unfused_args = (*dkdv_args[:-1], 1)  # one batch per program
        _scaffold.launch(
            _dkdv_autotuned,
            _relpos_attention_bwd_dkdv_kernel,
            grid,
            unfused_args,
            {**constexprs, "DBIAS_MODE": 0},
            INTERPRETER_CONFIG,
        )
        if need_dbias:
            dbias_args = (
                q, k, v, bias, grad_out, lse, delta, dbias,
                *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *bias_strides,
                stride_dbias_g, _padded_row_stride(n), b, h, n, qk_scale, per_group,
            )  # fmt: skip
            groups = triton.cdiv(b, per_group)
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(n, meta["BLOCK_M"]) * h * groups,)  # noqa: E731
            dbias_constexprs = {name: value for name, value in constexprs.items() if name != "HAS_BIAS"}
            _scaffold.launch(
                _dbias_autotuned, _relpos_attention_bwd_dbias_kernel, grid, dbias_args,
                {**dbias_constexprs, "DBIAS_MODE": dbias_mode}, INTERPRETER_CONFIG,
            )  # fmt: skip
    if not need_dbias:
        return dq, dk, dv, None
    # A fixed-order sum over the group slices (deterministic), then the caller's dtype and layout.
    dbias = dbias[0] if dbias.shape[0] == 1 else dbias.sum(0)
    return dq, dk, dv, dbias[..., :n].to(bias_dtype).contiguous()
