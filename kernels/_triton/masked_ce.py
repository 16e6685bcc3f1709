"""The Triton kernels of ``kernels.masked_linear_cross_entropy`` and their row-chunk launcher:
logit tiles with a running log-sum-exp, argmax and target logit per row (optionally storing
``exp(logit - running max)`` or the gradient of the logits), the per-row finish across
vocabulary splits, and the weight and bias gradients (cuBLAS does ``dlogits @ weight``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _dispatch, _scaffold
from ..masked_ce import chunk_rows, folds_mean, grad_buffers, reduce_rows, row_weights

GPU_CHUNK_BYTES = 64 << 20  # gradient of the logits of one row chunk (input dtype)
VOCAB_TILE = 128  # logit columns per tile on the GPU: the unit of the stored references
INTERPRETER_VOCAB_TILE = 32  # small tiles so that the interpreter tests cross many of them


@triton.jit
def _logits_kernel(
    X,  # [R, C] rows, unit stride along C
    W,  # [V, C] head weight, unit stride along C
    BIAS,  # [V] (HAS_BIAS)
    TARGET,  # [R] int64
    LSE,  # [R] fp32 log-sum-exp (GRAD_FROM_LSE)
    ROW_SCALE,  # [R] fp32 gradient weight of each row, 0 for ignored rows (GRAD_FROM_LSE)
    OUT,  # [R, V] input dtype: exp tiles (STORE_EXP) or the gradient (GRAD_FROM_LSE)
    TILE_REF,  # [R, num_tiles] fp32 reference of each stored tile: the running max (STORE_EXP)
    PART_MAX,  # [SPLITS, R] fp32 per vocabulary split: max logit,
    PART_SUM,  # sum of exp(logit - max) (max replaced by 0 if it is -inf),
    PART_BEST_ID,  # int32 first index of the max,
    PART_TARGET,  # fp32 target logit (0 where the target lies in another split)
    R,
    V,
    C,  #
    stride_xm,
    stride_wv,
    stride_om,  #
    vocab_per_split,
    num_tiles,  #
    HAS_BIAS: tl.constexpr,
    STORE_EXP: tl.constexpr,  # also store exp(logit - running max) and that running max
    GRAD_FROM_LSE: tl.constexpr,  # the log-sum-exp is known: store the gradient of the logits
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    target = tl.load(TARGET + rows, mask=row_ok, other=-1)
    # int32 column ids; out-of-range targets (and ignore_index) match no column
    target = tl.where((target >= 0) & (target < V), target, -1).to(tl.int32)
    if GRAD_FROM_LSE:
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        row_scale = tl.load(ROW_SCALE + rows, mask=row_ok, other=0.0)
    else:
        run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_M], tl.float32)
        best_id = tl.zeros([BLOCK_M], tl.int32)
        target_logit = tl.zeros([BLOCK_M], tl.float32)

    v_start = split * vocab_per_split
    v_end = tl.minimum(v_start + vocab_per_split, V)
    k_steps = tl.cdiv(C, BLOCK_K)
    # One flat loop over (vocabulary tile, k step), so that the loads of the next tile are
    # pipelined across the epilogue of the current one (Triton's persistent-matmul pattern).
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for step in range(0, tl.cdiv(v_end - v_start, BLOCK_N) * k_steps):
        v0 = v_start + (step // k_steps) * BLOCK_N
        ks = (step % k_steps) * BLOCK_K + tl.arange(0, BLOCK_K)
        cols = v0 + tl.arange(0, BLOCK_N)
        col_ok = cols < v_end
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < C), other=0.0)
        w = tl.load(W + cols[:, None] * stride_wv + ks[None, :], mask=col_ok[:, None] & (ks[None, :] < C), other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        if step % k_steps == k_steps - 1:  # the tile's logits are complete
            if HAS_BIAS:
                acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            logits = tl.where(col_ok[None, :], acc, float("-inf"))
            is_target = cols[None, :] == target[:, None]
            out_ptrs = OUT + rows[:, None] * stride_om + cols[None, :]
            out_mask = row_ok[:, None] & col_ok[None, :]
            if GRAD_FROM_LSE:
                prob = tl.exp(logits - lse[:, None])
                grad = (prob - is_target.to(tl.float32)) * row_scale[:, None]
                tl.store(out_ptrs, grad.to(OUT.dtype.element_ty), mask=out_mask)
            else:
                tile_max = tl.max(logits, axis=1)
                # the first column holding the max (cheaper in registers than return_indices);
                # strictly greater: on a tie with an earlier tile its lower index stays, as torch.argmax
                tile_arg = tl.min(tl.where(logits == tile_max[:, None], cols[None, :], V), axis=1)
                best_id = tl.where(tile_max > run_max, tile_arg, best_id)
                new_max = tl.maximum(run_max, tile_max)
                # the exponentials' reference: the running max, or 0 while every logit is -inf
                # (a bias that switches classes off), so that they give zeros, not NaN
                ref = tl.where(new_max == float("-inf"), 0.0, new_max)
                scaled = tl.exp(logits - ref[:, None])
                run_sum = run_sum * tl.exp(run_max - ref) + tl.sum(scaled, axis=1)
                run_max = new_max
                target_logit += tl.sum(tl.where(is_target, logits, 0.0), axis=1)
                if STORE_EXP:
                    tl.store(out_ptrs, scaled.to(OUT.dtype.element_ty), mask=out_mask)
                    tl.store(TILE_REF + rows * num_tiles + v0 // BLOCK_N, ref, mask=row_ok)
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)

    if not GRAD_FROM_LSE:
        part = split * R + rows
        tl.store(PART_MAX + part, run_max, mask=row_ok)
        tl.store(PART_SUM + part, run_sum, mask=row_ok)
        tl.store(PART_BEST_ID + part, best_id, mask=row_ok)
        tl.store(PART_TARGET + part, target_logit, mask=row_ok)


@triton.jit
def _finish_rows_kernel(
    PART_MAX,
    PART_SUM,
    PART_BEST_ID,
    PART_TARGET,  # [SPLITS, R] from _logits_kernel
    TARGET,  # [R] int64
    ROW_SCALE,  # [R] fp32 (CONVERT)
    TILE_REF,  # [R, num_tiles] fp32 (CONVERT)
    OUT,  # [R, V] exp tiles, turned into the gradient in place (CONVERT)
    LSE,
    LOSS,  # [R] fp32 outputs
    CORRECT,  # [R] int32 output: 1 where a non-ignored row's argmax is its target
    R,
    V,
    num_splits,
    num_tiles,
    stride_om,
    ignore_index,
    CONVERT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    run_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_R], tl.float32)
    best_id = tl.zeros([BLOCK_R], tl.int32)
    target_logit = tl.zeros([BLOCK_R], tl.float32)
    # Splits hold increasing vocabulary ranges: strictly greater keeps the lowest index on ties.
    for split in range(0, num_splits):
        part = split * R + rows
        part_max = tl.load(PART_MAX + part, mask=row_ok, other=float("-inf"))
        best_id = tl.where(part_max > run_max, tl.load(PART_BEST_ID + part, mask=row_ok, other=0), best_id)
        new_max = tl.maximum(run_max, part_max)
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        part_sum = tl.load(PART_SUM + part, mask=row_ok, other=0.0)
        run_sum = run_sum * tl.exp(run_max - safe_max) + part_sum * tl.exp(part_max - safe_max)
        run_max = new_max
        target_logit += tl.load(PART_TARGET + part, mask=row_ok, other=0.0)
    lse = tl.where(row_ok, run_max + tl.log(tl.where(row_ok, run_sum, 1.0)), 0.0)  # no log(0) on padding
    target = tl.load(TARGET + rows, mask=row_ok, other=ignore_index)
    valid = target != ignore_index
    tl.store(LSE + rows, lse, mask=row_ok)
    tl.store(LOSS + rows, tl.where(valid, lse - target_logit, 0.0), mask=row_ok)
    tl.store(CORRECT + rows, (valid & (best_id == target)).to(tl.int32), mask=row_ok)

    if CONVERT:
        row_scale = tl.load(ROW_SCALE + rows, mask=row_ok, other=0.0)
        target = tl.where((target >= 0) & (target < V), target, -1).to(tl.int32)
        for tile in range(0, num_tiles):
            cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols[None, :] < V)
            ptrs = OUT + rows[:, None] * stride_om + cols[None, :]
            scaled = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            tile_ref = tl.load(TILE_REF + rows * num_tiles + tile, mask=row_ok, other=0.0)
            prob = scaled * tl.exp(tile_ref - lse)[:, None]
            grad = (prob - (cols[None, :] == target[:, None]).to(tl.float32)) * row_scale[:, None]
            tl.store(ptrs, grad.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _grad_weight_kernel(
    G,  # [R, V] gradient of the logits, unit stride along V
    X,  # [R, C] rows, unit stride along C
    DW,  # [V, C] fp32, accumulated into (NEED_WEIGHT)
    DB,  # [V] fp32, accumulated into (NEED_BIAS)
    R,
    V,
    C,  #
    stride_gm,
    stride_xm,  #
    NEED_WEIGHT: tl.constexpr,
    NEED_BIAS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # DW += G^T @ X over the rows of one chunk; an extra column of programs sums G for DB.
    pid_v = tl.program_id(0)
    pid_c = tl.program_id(1)
    vocab = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = vocab < V
    num_c_blocks = tl.cdiv(C, BLOCK_C) if NEED_WEIGHT else 0
    if pid_c < num_c_blocks:
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = cols < C
        acc = tl.zeros([BLOCK_V, BLOCK_C], tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            r_ok = rs < R
            g = tl.load(G + rs[:, None] * stride_gm + vocab[None, :], mask=r_ok[:, None] & v_ok[None, :], other=0.0)
            x = tl.load(X + rs[:, None] * stride_xm + cols[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
            acc = tl.dot(tl.trans(g), x, acc, input_precision=DOT_PRECISION)
        ptrs = DW + vocab[:, None] * C + cols[None, :]
        mask = v_ok[:, None] & c_ok[None, :]
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + acc, mask=mask)
    elif NEED_BIAS:
        column_sum = tl.zeros([BLOCK_V], tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            g = tl.load(G + rs[:, None] * stride_gm + vocab[None, :], mask=(rs < R)[:, None] & v_ok[None, :], other=0.0)
            column_sum += tl.sum(g.to(tl.float32), axis=0)
        tl.store(DB + vocab, tl.load(DB + vocab, mask=v_ok, other=0.0) + column_sum, mask=v_ok)


# Tensor-core configurations for bf16/fp16 (BLOCK_N is VOCAB_TILE) and FMA ones for fp32. The
# logits kernel's epilogue (exp, max, argmax, target and stores on the whole tile) keeps its
# tile in registers: 32 logits per thread leave room; 64 (a 128 x 128 tile on 8 warps) reach
# the 255-register limit and spill with some compiler versions.
LOGITS_CONFIGS_16BIT = [
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 64}, num_warps=4, num_stages=4),
]
LOGITS_CONFIGS_FP32 = [
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 32}, num_warps=8, num_stages=2),
]
GRAD_WEIGHT_CONFIGS_16BIT = [
    triton.Config({"BLOCK_V": 128, "BLOCK_C": 128, "BLOCK_R": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_V": 128, "BLOCK_C": 128, "BLOCK_R": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_V": 128, "BLOCK_C": 64, "BLOCK_R": 64}, num_warps=8, num_stages=4),
]
GRAD_WEIGHT_CONFIGS_FP32 = [
    triton.Config({"BLOCK_V": 64, "BLOCK_C": 64, "BLOCK_R": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_V": 64, "BLOCK_C": 128, "BLOCK_R": 32}, num_warps=8, num_stages=2),
]


def _configs_for_precision(configs_16bit, configs_fp32):
    def prune(configs, named_args, **kwargs):
        return configs_fp32 if kwargs["DOT_PRECISION"] == "ieee" else configs_16bit

    return prune


_logits_autotuned = triton.autotune(
    configs=LOGITS_CONFIGS_16BIT + LOGITS_CONFIGS_FP32,
    key=["C", "V", "vocab_per_split", "HAS_BIAS", "STORE_EXP", "GRAD_FROM_LSE"],
    prune_configs_by={"early_config_prune": _configs_for_precision(LOGITS_CONFIGS_16BIT, LOGITS_CONFIGS_FP32)},
)(_logits_kernel)

_grad_weight_autotuned = triton.autotune(
    configs=GRAD_WEIGHT_CONFIGS_16BIT + GRAD_WEIGHT_CONFIGS_FP32,
    key=["C", "V", "NEED_WEIGHT", "NEED_BIAS"],
    prune_configs_by={
        "early_config_prune": _configs_for_precision(GRAD_WEIGHT_CONFIGS_16BIT, GRAD_WEIGHT_CONFIGS_FP32)
    },
    restore_value=["DW", "DB"],  # it accumulates: benchmarking runs must not add up
)(_grad_weight_kernel)

FINISH_BLOCK_R = 32
# Small tiles for the CPU interpreter, where autotuning would only cost time.
INTERPRETER_LOGITS_CONFIG = {"BLOCK_M": 16, "BLOCK_K": 16}
INTERPRETER_GRAD_WEIGHT_CONFIG = {"BLOCK_V": 32, "BLOCK_C": 32, "BLOCK_R": 16}
INTERPRETER_FINISH_BLOCK_R = 16


def _num_splits(rows: int, vocab: int, device: torch.device) -> int:
    """Split the vocabulary over programs when the row blocks alone leave most SMs idle."""
    return _scaffold.splits_to_fill(device, triton.cdiv(rows, 64), triton.cdiv(vocab, 4 * VOCAB_TILE), waves=2)


class _TritonChunks:
    """Launches the Triton kernels on one row chunk at a time, with buffers sized for the largest chunk."""

    def __init__(self, x, weight, bias, target, chunk_rows: int):
        self.x, self.weight, self.bias, self.target = x, weight, bias, target
        self.vocab = weight.shape[0]
        self.interpret = _dispatch.triton_interpret()
        self.tile = INTERPRETER_VOCAB_TILE if self.interpret else VOCAB_TILE
        self.num_tiles = triton.cdiv(self.vocab, self.tile)
        self.chunk_rows = chunk_rows
        splits = _num_splits(chunk_rows, self.vocab, x.device)
        self.vocab_per_split = triton.cdiv(triton.cdiv(self.vocab, splits), self.tile) * self.tile
        self.splits = triton.cdiv(self.vocab, self.vocab_per_split)
        self.precision = _scaffold.dot_precision(x.dtype)
        fp32 = dict(device=x.device, dtype=torch.float32)
        self.partials = [torch.empty(self.splits * chunk_rows, **fp32) for _ in range(3)]
        self.best_ids = torch.empty(self.splits * chunk_rows, device=x.device, dtype=torch.int32)

    def logits(self, start, end, out=None, tile_ref=None, lse=None, row_scale=None):
        """Run the logits kernel on rows [start, end): statistics only; with ``out`` and ``tile_ref``
        (that chunk's buffers) also the exp tiles; with ``lse`` and ``row_scale`` the gradient into ``out``."""
        rows = end - start
        x = self.x[start:end]
        parts = self._split_views(rows)
        dummy = parts[0]  # never read: the kernel's mode and HAS_BIAS leave those pointers alone
        args = (
            x,
            self.weight,
            dummy if self.bias is None else self.bias,
            self.target[start:end],
            dummy if lse is None else lse[start:end],
            dummy if row_scale is None else row_scale[start:end],
            dummy if out is None else out,
            dummy if tile_ref is None else tile_ref,
            *parts,
            rows,
            self.vocab,
            x.shape[1],
            x.stride(0),
            self.weight.stride(0),
            0 if out is None else out.stride(0),
            self.vocab_per_split,
            self.num_tiles,
        )
        constants = dict(
            HAS_BIAS=self.bias is not None,
            STORE_EXP=tile_ref is not None,
            GRAD_FROM_LSE=lse is not None,
            BLOCK_N=self.tile,
            DOT_PRECISION=self.precision,
        )
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), self.splits)  # noqa: E731
        _scaffold.launch(_logits_autotuned, _logits_kernel, grid, args, constants, INTERPRETER_LOGITS_CONFIG)

    def _split_views(self, rows):
        """The partial results of a chunk of ``rows`` rows: contiguous [splits, rows] views of the buffers."""
        n = self.splits * rows
        part_max, part_sum, part_target = (p[:n].view(self.splits, rows) for p in self.partials)
        return part_max, part_sum, self.best_ids[:n].view(self.splits, rows), part_target

    def finish(self, start, end, lse, loss_rows, correct, ignore_index, out=None, tile_ref=None, row_scale=None):
        rows = end - start
        part_max, part_sum, best_ids, part_target = self._split_views(rows)
        block_r = INTERPRETER_FINISH_BLOCK_R if self.interpret else FINISH_BLOCK_R
        convert = out is not None
        _finish_rows_kernel[(triton.cdiv(rows, block_r),)](
            part_max,
            part_sum,
            best_ids,
            part_target,
            self.target[start:end],
            row_scale[start:end] if convert else part_max,
            tile_ref if convert else part_max,
            out if convert else part_max,
            lse[start:end],
            loss_rows[start:end],
            correct[start:end],
            rows,
            self.vocab,
            self.splits,
            self.num_tiles,
            out.stride(0) if convert else 0,
            ignore_index,
            CONVERT=convert,
            BLOCK_R=block_r,
            BLOCK_N=self.tile,
        )

    def accumulate_grads(self, start, end, grad, grad_x, grad_weight, grad_bias):
        """grad_x[rows] = grad @ weight; grad_weight += grad^T @ x[rows]; grad_bias += column sums."""
        if grad_x is not None:
            torch.mm(grad, self.weight, out=grad_x[start:end])
        if grad_weight is None and grad_bias is None:
            return
        x = self.x[start:end]
        rows, c = x.shape
        need_weight, need_bias = grad_weight is not None, grad_bias is not None
        args = (
            grad,
            x,
            grad_weight if need_weight else grad,
            grad_bias if need_bias else grad,
            rows,
            self.vocab,
            c,
            grad.stride(0),
            x.stride(0),
        )
        constants = dict(NEED_WEIGHT=need_weight, NEED_BIAS=need_bias, DOT_PRECISION=self.precision)

        def grid(meta):
            return (
                triton.cdiv(self.vocab, meta["BLOCK_V"]),
                (triton.cdiv(c, meta["BLOCK_C"]) if need_weight else 0) + int(need_bias),
            )

        _scaffold.launch(
            _grad_weight_autotuned, _grad_weight_kernel, grid, args, constants, INTERPRETER_GRAD_WEIGHT_CONFIG
        )


def forward(x, weight, bias, target, ignore_index, reduction, compute_grads):
    m, v = x.shape[0], weight.shape[0]
    lse = x.new_empty(m, dtype=torch.float32)
    loss_rows = x.new_empty(m, dtype=torch.float32)
    correct = x.new_empty(m, dtype=torch.int32)
    grad_x, grad_weight, grad_bias = grad_buffers(x, weight, compute_grads, zeroed=True)
    in_forward = any(compute_grads)
    if m > 0:
        chunk = chunk_rows(m, v, x.element_size(), GPU_CHUNK_BYTES, multiple=128)
        runner = _TritonChunks(x, weight, bias, target, chunk)
        if in_forward:
            row_scale = row_weights(target, ignore_index, reduction, folds_mean(x.dtype))
            grad_buffer = x.new_empty(chunk, v)
            tile_ref_buffer = x.new_empty(chunk, runner.num_tiles, dtype=torch.float32)
        for start in range(0, m, chunk):
            end = min(start + chunk, m)
            if not in_forward:
                runner.logits(start, end)
                runner.finish(start, end, lse, loss_rows, correct, ignore_index)
                continue
            grad, tile_ref = grad_buffer[: end - start], tile_ref_buffer[: end - start]
            runner.logits(start, end, out=grad, tile_ref=tile_ref)
            runner.finish(start, end, lse, loss_rows, correct, ignore_index, grad, tile_ref, row_scale)
            runner.accumulate_grads(
                start,
                end,
                grad,
                grad_x if compute_grads[0] else None,
                grad_weight if compute_grads[1] else None,
                grad_bias if compute_grads[2] else None,
            )
    loss = reduce_rows(loss_rows, target, ignore_index, reduction)
    return loss, correct.sum(), lse, grad_x, grad_weight, grad_bias


def backward(x, weight, bias, target, lse, grad_rows, ignore_index, compute_grads):
    # ignore_index: the table's common signature; ignored rows arrive with a grad_rows of 0
    m, v = x.shape[0], weight.shape[0]
    grad_x, grad_weight, grad_bias = grad_buffers(x, weight, compute_grads, zeroed=True)
    if m > 0:
        chunk = chunk_rows(m, v, x.element_size(), GPU_CHUNK_BYTES, multiple=128)
        runner = _TritonChunks(x, weight, bias, target, chunk)
        grad_buffer = x.new_empty(chunk, v)
        for start in range(0, m, chunk):
            end = min(start + chunk, m)
            grad = grad_buffer[: end - start]
            runner.logits(start, end, out=grad, lse=lse, row_scale=grad_rows)
            runner.accumulate_grads(
                start,
                end,
                grad,
                grad_x if compute_grads[0] else None,
                grad_weight if compute_grads[1] else None,
                grad_bias if compute_grads[2] else None,
            )
    return grad_x, grad_weight, grad_bias
