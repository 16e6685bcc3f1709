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

Backends: Triton on CUDA (and on CPU tensors under ``TRITON_INTERPRET=1``), with cuBLAS for the
``dlogits @ weight`` product; a chunked PyTorch kernel on the CPU (and the ``torch`` backend)
whose extra memory is one fp32 chunk of logits plus the gradients. There is no CUDA C++ version.
"""

from __future__ import annotations

import torch

from . import _checks, _dispatch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch kernel serves every call
    triton = None

OP = "masked_linear_cross_entropy"
REDUCTIONS = ("mean", "sum", "none")
# Compute the gradients during the forward (see the module docstring); the benchmark flips it.
GRADIENT_IN_FORWARD = True
CPU_CHUNK_BYTES = 64 << 20  # fp32 logits of one row chunk in the PyTorch kernel (2048 rows at V = 8192)
GPU_CHUNK_BYTES = 64 << 20  # gradient of the logits of one row chunk (input dtype) in the Triton path
VOCAB_TILE = 128  # logit columns per tile on the GPU: the unit of the stored references
INTERPRETER_VOCAB_TILE = 32  # small tiles so that the interpreter tests cross many of them


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if triton is not None:

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
            x = tl.load(
                X + rows[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < C), other=0.0
            )
            w = tl.load(
                W + cols[:, None] * stride_wv + ks[None, :], mask=col_ok[:, None] & (ks[None, :] < C), other=0.0
            )
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
                g = tl.load(
                    G + rs[:, None] * stride_gm + vocab[None, :], mask=(rs < R)[:, None] & v_ok[None, :], other=0.0
                )
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
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, triton.cdiv(rows, 64)), triton.cdiv(vocab, 4 * VOCAB_TILE)))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


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
        self.precision = _dot_precision(x.dtype)
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
        if self.interpret:
            grid = (triton.cdiv(rows, INTERPRETER_LOGITS_CONFIG["BLOCK_M"]), self.splits)
            _logits_kernel[grid](*args, **constants, **INTERPRETER_LOGITS_CONFIG)
        else:
            grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), self.splits)  # noqa: E731
            _logits_autotuned[grid](*args, **constants)

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

        if self.interpret:
            _grad_weight_kernel[grid(INTERPRETER_GRAD_WEIGHT_CONFIG)](
                *args, **constants, **INTERPRETER_GRAD_WEIGHT_CONFIG
            )
        else:
            _grad_weight_autotuned[grid](*args, **constants)


# --------------------------------------------------------------------------------------------
# Shared pieces of both implementations
# --------------------------------------------------------------------------------------------
def _chunk_rows(m: int, vocab: int, element_bytes: int, budget: int, multiple: int = 1) -> int:
    """Rows per chunk: at most ``budget`` bytes of ``[rows, vocab]``, spread evenly over the chunks."""
    most = max(multiple, budget // (vocab * element_bytes) // multiple * multiple)
    chunks = -(-m // most)
    rows = -(-m // chunks)
    return min(m, -(-rows // multiple) * multiple)


def _folds_mean(dtype: torch.dtype) -> bool:
    """Whether the gradient stored by the forward includes the 1/n of the mean (not for fp16, where
    the loss scale that arrives in the backward must be applied before the smallest values underflow)."""
    return dtype != torch.float16


def _row_weights(target: torch.Tensor, ignore_index: int, reduction: str, fold_mean: bool) -> torch.Tensor:
    """fp32 weight of each row's loss in the reduced loss: 0 for ignored rows, 1 / n for the mean."""
    valid = target != ignore_index
    weights = valid.float()
    if reduction == "mean" and fold_mean:
        weights /= valid.sum().clamp_min(1)
    return weights


def _reduce(loss_rows: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    # the mean over non-ignored rows, as F.cross_entropy; 0 (not NaN) when there are none
    return total / (target != ignore_index).sum().clamp_min(1) if reduction == "mean" else total


def _grad_buffers(x, weight, compute_grads, *, zeroed: bool):
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
# Triton path
# --------------------------------------------------------------------------------------------
def _triton_forward(x, weight, bias, target, ignore_index, reduction, compute_grads):
    m, v = x.shape[0], weight.shape[0]
    lse = x.new_empty(m, dtype=torch.float32)
    loss_rows = x.new_empty(m, dtype=torch.float32)
    correct = x.new_empty(m, dtype=torch.int32)
    grad_x, grad_weight, grad_bias = _grad_buffers(x, weight, compute_grads, zeroed=True)
    in_forward = any(compute_grads)
    if m > 0:
        chunk = _chunk_rows(m, v, x.element_size(), GPU_CHUNK_BYTES, multiple=128)
        runner = _TritonChunks(x, weight, bias, target, chunk)
        if in_forward:
            row_scale = _row_weights(target, ignore_index, reduction, _folds_mean(x.dtype))
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
    loss = _reduce(loss_rows, target, ignore_index, reduction)
    return loss, correct.sum(), lse, grad_x, grad_weight, grad_bias


def _triton_backward(x, weight, bias, target, lse, grad_rows, compute_grads):
    m, v = x.shape[0], weight.shape[0]
    grad_x, grad_weight, grad_bias = _grad_buffers(x, weight, compute_grads, zeroed=True)
    if m > 0:
        chunk = _chunk_rows(m, v, x.element_size(), GPU_CHUNK_BYTES, multiple=128)
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
    grads = _grad_buffers(x, weight, compute_grads, zeroed=m == 0)  # no chunk writes them when m == 0
    in_forward = any(compute_grads)
    if in_forward:
        row_scale = _row_weights(target, ignore_index, reduction, _folds_mean(x.dtype))
    chunk = _chunk_rows(m, v, 4, CPU_CHUNK_BYTES if chunk_bytes is None else chunk_bytes) if m else 1
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
    loss = _reduce(loss_rows, target, ignore_index, reduction)
    return loss, correct.sum(), lse, *grads


def _torch_backward(x, weight, bias, target, lse, grad_rows, ignore_index, compute_grads, chunk_bytes=None):
    m, v = x.shape[0], weight.shape[0]
    weight32 = weight.float()
    bias32 = None if bias is None else bias.float()
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0)
    grads = _grad_buffers(x, weight, compute_grads, zeroed=m == 0)  # no chunk writes them when m == 0
    chunk = _chunk_rows(m, v, 4, CPU_CHUNK_BYTES if chunk_bytes is None else chunk_bytes) if m else 1
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
def _use_triton(device: torch.device) -> bool:
    return _dispatch.resolve(device, has_cuda_impl=False) == "triton"


def _forward(x, weight, bias, target, ignore_index, reduction, compute_grads):
    compute_grads = tuple(compute_grads)
    if _use_triton(x.device):
        return _triton_forward(x, weight, bias, target, ignore_index, reduction, compute_grads)
    return _torch_forward(x, weight, bias, target, ignore_index, reduction, compute_grads)


@torch.library.custom_op("beitv2::masked_linear_cross_entropy", mutates_args=(), device_types="cpu")
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


@_masked_ce_op.register_kernel("cuda")
def _masked_ce_cuda(x, weight, bias, target, ignore_index, reduction, compute_grads):
    return _forward(x, weight, bias, target, ignore_index, reduction, compute_grads)


@_masked_ce_op.register_fake
def _masked_ce_fake(x, weight, bias, target, ignore_index, reduction, compute_grads):
    m = x.shape[0]
    loss = x.new_empty((m,) if reduction == "none" else (), dtype=torch.float32)
    num_correct = x.new_empty((), dtype=torch.int64)
    lse = x.new_empty(m, dtype=torch.float32)
    return loss, num_correct, lse, *_grad_buffers(x, weight, compute_grads, zeroed=False)


def _backward(x, weight, bias, target, lse, grad_rows, ignore_index, compute_grads):
    compute_grads = tuple(compute_grads)
    grad_rows = grad_rows.float() * (target != ignore_index)  # ignored rows have no loss
    if _use_triton(x.device):
        grads = _triton_backward(x, weight, bias, target, lse, grad_rows, compute_grads)
    else:
        grads = _torch_backward(x, weight, bias, target, lse, grad_rows, ignore_index, compute_grads)
    grad_x, grad_weight, grad_bias = grads
    return grad_x, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


@torch.library.custom_op("beitv2::masked_linear_cross_entropy_backward", mutates_args=(), device_types="cpu")
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


@_masked_ce_backward_op.register_kernel("cuda")
def _masked_ce_backward_cuda(x, weight, bias, target, lse, grad_rows, ignore_index, compute_grads):
    return _backward(x, weight, bias, target, lse, grad_rows, ignore_index, compute_grads)


@_masked_ce_backward_op.register_fake
def _masked_ce_backward_fake(x, weight, bias, target, lse, grad_rows, ignore_index, compute_grads):
    grad_x, grad_weight, grad_bias = _grad_buffers(x, weight, compute_grads, zeroed=False)
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
        if ctx.reduction == "mean" and not _folds_mean(ctx.dtype):
            factor = factor / (target != ctx.ignore_index).sum().clamp_min(1)
        grads = (
            grad_x * factor if needs[0] else None,
            (grad_weight * factor).to(ctx.dtype) if needs[1] else None,
            (grad_bias * factor).to(ctx.dtype) if needs[2] else None,
        )
        return *grads, None, None, None, None
    x, weight, bias, target, lse = ctx.saved_tensors
    grad_rows = _row_weights(target, ctx.ignore_index, ctx.reduction, fold_mean=True) * grad_loss.float()
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


def _unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


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
        _unit_stride_rows(x),
        _unit_stride_rows(weight),
        None if bias is None else bias.contiguous(),
        target.contiguous(),
        ignore_index,
        reduction,
        needs if grads_now else [False, False, False],
    )
    return loss, num_correct
