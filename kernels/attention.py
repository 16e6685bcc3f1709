"""Attention with a relative position bias shared by the batch: fused forward and backward.

``out = softmax(q k^T * scale + bias) v`` for ``q, k, v [B, H, N, Dh]`` and one ``bias [H, N, N]``
for the whole batch (BEiT adds the same relative position bias to every image, and in
pretraining to every block). No ``[B, H, N, N]`` tensor is ever allocated, forward or backward,
and the bias gradient is summed over the batch inside the kernels.

Triton kernels (all softmax arithmetic in fp32 and base 2; products on tensor cores with fp32
accumulation, exact fp32 products for fp32 inputs):

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

Dispatch: CPU tensors take the PyTorch kernel (exact softmax in fp32, in batch chunks so its
memory stays bounded); on CUDA a call without a bias goes to PyTorch's scaled_dot_product_attention
(flash attention or cuDNN) under the ``auto`` backend, a call with a bias to the Triton kernels;
``kernels.set_backend`` selects the Triton, CUDA C++ (``csrc/attention.cu``) or PyTorch kernels.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from . import _checks, _dispatch
from .reference import relative_position_index

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch kernel serves every call
    triton = None

__all__ = ["relative_position_index", "relpos_attention", "relpos_bias"]

OP = "relpos_attention"
MAX_HEAD_DIM = 128
# Sequences up to this length fit one query tile in the dk/dv kernel, which then also reduces
# dbias over the batch; longer ones use the separate dbias kernel.
FUSED_DBIAS_MAX_N = 256
CPU_CHUNK_BYTES = 32 << 20  # the PyTorch kernel's score chunk: bounded, still matmul-sized
# The first call of each shape benchmarks every candidate tile (seconds); with
# BEITV2_ATTENTION_AUTOTUNE=0 the first candidate runs at once (many shapes, quick test runs).
AUTOTUNE = os.environ.get("BEITV2_ATTENTION_AUTOTUNE", "1") != "0"
HAS_CUDA_IMPL = True  # csrc/attention.cu has the forward and the backward


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if triton is not None:
    LOG2E = tl.constexpr(1.4426950408889634)
    LN2 = tl.constexpr(0.6931471805599453)

    @triton.jit
    def _load_rows(BASE, rows, row_ok, dims, dim_ok, stride_row):
        """A ``[rows, dims]`` tile of one ``[N, Dh]`` head (unit stride along Dh), zeros outside."""
        return tl.load(
            BASE + rows[:, None] * stride_row + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0
        )

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


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


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


def _batch_groups(batch: int, tiles: int, device: torch.device) -> int:
    """Split the batch into groups so that ``tiles x groups`` programs fill the GPU a few times
    over; each program then reduces dbias over the batches of its group."""
    if device.type != "cuda":
        return min(batch, 2)  # the interpreter: two groups exercise the cross-group reduction
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(batch, triton.cdiv(4 * sms, max(tiles, 1))))


def _launch(autotuned, kernel, grid_fn, args, constexprs):
    """Run the autotuned kernel on a GPU, or the plain one with the interpreter's tile sizes."""
    if _dispatch.triton_interpret():
        meta = {**INTERPRETER_CONFIG, **constexprs}
        kernel[grid_fn(meta)](*args, **meta)
    else:
        autotuned[grid_fn](*args, **constexprs)


def _empty_bnhd(like: torch.Tensor) -> torch.Tensor:
    """A ``[B, H, N, Dh]`` tensor laid out as ``[B, N, H, Dh]``, so that the usual
    ``out.transpose(1, 2).reshape(B, N, H * Dh)`` after attention is a free view."""
    b, h, n, d = like.shape
    return like.new_empty(b, n, h, d).transpose(1, 2)


def _constexprs(q: torch.Tensor, bias: torch.Tensor | None) -> dict:
    d = q.shape[-1]
    return {
        "HAS_BIAS": bias is not None,
        "HEAD_DIM": d,
        "BLOCK_D": _block_d(d),
        "DOT_PRECISION": _dot_precision(q.dtype),
    }


def _triton_forward(q, k, v, bias, scale):
    b, h, n, _ = q.shape
    bias = _kernel_bias(bias, q.dtype)
    out = _empty_bnhd(q)
    lse = q.new_empty(b, h, n, dtype=torch.float32)
    bias_strides = (0, 0) if bias is None else bias.stride()[:2]
    args = (
        q, k, v, q if bias is None else bias, out, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *bias_strides,
        h, n, scale * math.log2(math.e),
    )  # fmt: skip
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * b * h,)  # noqa: E731
    _launch(_fwd_autotuned, _relpos_attention_fwd_kernel, grid, args, _constexprs(q, bias))
    return out, lse


def _triton_backward(grad_out, q, k, v, bias, out, lse, scale, deterministic, need_dbias):
    b, h, n, _ = q.shape
    bias_dtype = None if bias is None else bias.dtype
    bias = _kernel_bias(bias, q.dtype)
    bias_arg = q if bias is None else bias
    bias_strides = (0, 0) if bias is None else bias.stride()[:2]
    dq, dk, dv = _empty_bnhd(q), _empty_bnhd(k), _empty_bnhd(v)
    delta = torch.empty_like(lse)
    constexprs = _constexprs(q, bias)
    qk_scale = scale * math.log2(math.e)

    args = (
        q, k, v, bias_arg, out, grad_out, lse, delta, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(grad_out), *_strides(dq),
        *bias_strides, h, n, scale, qk_scale,
    )  # fmt: skip
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * b * h,)  # noqa: E731
    _launch(_dq_autotuned, _relpos_attention_bwd_dq_kernel, grid, args, constexprs)

    fp32 = q.dtype == torch.float32
    fused_block_m = fused_dbias_block(n, constexprs["BLOCK_D"], fp32) if need_dbias else None
    dbias, dbias_mode, stride_dbias_g, per_group = q, 0, 0, 1
    if need_dbias:
        key_blocks = triton.cdiv(n, 64)
        tiles = h * key_blocks if fused_block_m else h * key_blocks * key_blocks
        per_group = triton.cdiv(b, _batch_groups(b, tiles, q.device))
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
        _launch(_dkdv_fused_autotuned, _relpos_attention_bwd_dkdv_kernel, grid, dkdv_args, fused)
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * h * b,)  # noqa: E731
        unfused_args = (*dkdv_args[:-1], 1)  # one batch per program
        _launch(_dkdv_autotuned, _relpos_attention_bwd_dkdv_kernel, grid, unfused_args, {**constexprs, "DBIAS_MODE": 0})
        if need_dbias:
            dbias_args = (
                q, k, v, bias, grad_out, lse, delta, dbias,
                *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *bias_strides,
                stride_dbias_g, _padded_row_stride(n), b, h, n, qk_scale, per_group,
            )  # fmt: skip
            groups = triton.cdiv(b, per_group)
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(n, meta["BLOCK_M"]) * h * groups,)  # noqa: E731
            dbias_constexprs = {name: value for name, value in constexprs.items() if name != "HAS_BIAS"}
            _launch(
                _dbias_autotuned, _relpos_attention_bwd_dbias_kernel, grid, dbias_args,
                {**dbias_constexprs, "DBIAS_MODE": dbias_mode},
            )  # fmt: skip
    if not need_dbias:
        return dq, dk, dv, None
    # A fixed-order sum over the group slices (deterministic), then the caller's dtype and layout.
    dbias = dbias[0] if dbias.shape[0] == 1 else dbias.sum(0)
    return dq, dk, dv, dbias[..., :n].to(bias_dtype).contiguous()


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
    out = _empty_bnhd(q)
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


def _torch_backward(grad_out, q, k, v, bias, out, lse, scale, deterministic, need_dbias, chunk_bytes=CPU_CHUNK_BYTES):
    dq, dk, dv = _empty_bnhd(q), _empty_bnhd(k), _empty_bnhd(v)
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


def _cuda_extension_backward(grad_out, q, k, v, bias, out, lse, scale, deterministic, need_dbias):
    # Its dbias kernel sums over the batch in a fixed order: deterministic either way.
    kernel_bias = None if bias is None else bias.to(q.dtype)
    dq, dk, dv, dbias = torch.ops.beitv2_cuda.relpos_attention_backward(
        grad_out, q, k, v, kernel_bias, out, lse, scale, need_dbias
    )
    return dq, dk, dv, (dbias.to(bias.dtype) if need_dbias else None)


_FORWARD = {"triton": _triton_forward, "torch": _torch_forward, "cuda": _cuda_extension_forward}
_BACKWARD = {"triton": _triton_backward, "torch": _torch_backward, "cuda": _cuda_extension_backward}


# --------------------------------------------------------------------------------------------
# Op registration
# --------------------------------------------------------------------------------------------
def _run_forward(q, k, v, bias, scale):
    if q.numel() == 0:
        return _empty_bnhd(q), q.new_empty(q.shape[:3], dtype=torch.float32)
    implementation = _dispatch.resolve(q.device, has_cuda_impl=HAS_CUDA_IMPL)
    return _FORWARD[implementation](q, k, v, bias, scale)


@torch.library.custom_op("beitv2::relpos_attention", mutates_args=(), device_types="cpu")
def _relpos_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _run_forward(q, k, v, bias, scale)


@_relpos_attention_op.register_kernel("cuda")
def _relpos_attention_cuda(q, k, v, bias, scale, deterministic):
    return _run_forward(q, k, v, bias, scale)


@_relpos_attention_op.register_fake
def _relpos_attention_fake(q, k, v, bias, scale, deterministic):
    return _empty_bnhd(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _run_backward(grad_out, q, k, v, bias, out, lse, scale, deterministic, need_dbias):
    grad_out = _unit_stride_rows(grad_out)
    if q.numel() == 0:
        dq, dk, dv = (_empty_bnhd(t).zero_() for t in (q, k, v))
        dbias = torch.zeros(bias.shape, device=bias.device, dtype=bias.dtype) if need_dbias else None
    else:
        implementation = _dispatch.resolve(q.device, has_cuda_impl=HAS_CUDA_IMPL)
        dq, dk, dv, dbias = _BACKWARD[implementation](
            grad_out, q, k, v, bias, out, lse, scale, deterministic, need_dbias
        )
    return dq, dk, dv, (dbias if need_dbias else q.new_empty(0))


@torch.library.custom_op("beitv2::relpos_attention_backward", mutates_args=(), device_types="cpu")
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


@_relpos_attention_backward_op.register_kernel("cuda")
def _relpos_attention_backward_cuda(grad_out, q, k, v, bias, out, lse, scale, deterministic, need_dbias):
    return _run_backward(grad_out, q, k, v, bias, out, lse, scale, deterministic, need_dbias)


@_relpos_attention_backward_op.register_fake
def _relpos_attention_backward_fake(grad_out, q, k, v, bias, out, lse, scale, deterministic, need_dbias):
    dbias = bias.new_empty(bias.shape) if need_dbias else q.new_empty(0)
    return _empty_bnhd(q), _empty_bnhd(k), _empty_bnhd(v), dbias


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
        deterministic: make the bias gradient bit-identical from run to run (the batch groups'
            partial sums are added in a fixed order instead of with atomics). dq, dk and dv of
            this op's kernels are deterministic either way.

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
    if bias is None and q.device.type == "cuda" and _dispatch.get_backend() == "auto":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if bias is not None and bias.dim() == 4:
        bias = bias[0]
    q, k, v = _unit_stride_rows(q), _unit_stride_rows(k), _unit_stride_rows(v)
    out, _ = _relpos_attention_op(q, k, v, bias, scale, deterministic)
    return out


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
