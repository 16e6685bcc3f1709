"""Training metrics: throughput, MFU, data wait, memory; console lines, TensorBoard, W&B.

Metrics stay on the device between log lines (no ``.item()`` per step); every ``log_interval``
steps they are summed across ranks and written once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import torch

from .distributed import Distributed, all_reduce

log = logging.getLogger("beitv2_fast")

# Dense bf16 tensor-core peaks (NVIDIA datasheets; the headline figures with sparsity are 2x).
APPLIED = "_applied_steps"  # the window's count of applied updates, summed over the ranks with the means
PEAK_BF16_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "B200": 2250e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None where it is unknown (the CPU: MFU is then not shown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def vit_forward_flops(tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """FLOPs (2 per multiply-add) of ``depth`` pre-norm transformer blocks on ``tokens`` tokens:
    qkv, projection and MLP matmuls plus the two attention products (norms and softmax ignored)."""
    linear = 2 * tokens * dim * dim * (4 + 2 * mlp_ratio)
    attention = 4 * tokens * tokens * dim
    return depth * (linear + attention)


def setup_logging(world: Distributed) -> None:
    level = logging.INFO if world.is_main else logging.WARNING
    logging.basicConfig(
        level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout, force=True
    )


class MetricLogger:
    """Accumulates device-side metrics and writes one line per interval.

    Args:
        output_dir: run folder; TensorBoard events go to ``<output_dir>/tb`` and the log lines to
            ``<output_dir>/metrics.jsonl`` (rank 0 only).
        flops_per_image: training FLOPs of one image (forward + backward + frozen parts) for MFU.
        global_batch: images per optimizer step over all ranks.
    """

    def __init__(
        self,
        output_dir: str,
        world: Distributed,
        *,
        flops_per_image: float,
        global_batch: int,
        total_steps: int,
        use_wandb: bool = False,
        config: dict | None = None,
    ):
        self.world = world
        self.flops_per_image = flops_per_image
        self.global_batch = global_batch
        self.total_steps = total_steps
        self.peak = peak_flops(world.device)
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.data_seconds = 0.0
        self.window_start = time.perf_counter()
        self.writer = None
        self.jsonl = None
        self.wandb = None
        self.progress = None
        if world.is_main:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(output_dir, exist_ok=True)
            self.writer = SummaryWriter(os.path.join(output_dir, "tb"))
            self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a")  # noqa: SIM115 - closed in close()
            if use_wandb:
                import wandb

                self.wandb = wandb.init(project="beitv2-fast", config=config, dir=output_dir)
            if sys.stderr.isatty():
                from tqdm import tqdm

                self.progress = tqdm(total=total_steps, dynamic_ncols=True, leave=False)

    def update(self, metrics: dict[str, torch.Tensor], data_seconds: float, applied: torch.Tensor) -> None:
        """Add one optimizer step's metrics (0-d device tensors, already detached); a step whose
        update was skipped (``applied`` False, a 0-d device bool: no host synchronisation) counts
        in the throughput but not in the means."""
        for key, value in {**metrics, APPLIED: applied}.items():
            value = torch.where(applied, value.detach().float(), 0.0)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.steps += 1
        self.data_seconds += data_seconds
        if self.progress is not None:
            self.progress.update(1)

    def write(self, step: int, extra: dict[str, float], totals: dict[str, float] | None = None) -> dict[str, float]:
        """Reduce the window over ranks, log it, and start a new window. Returns the values.

        ``extra`` values are logged as rank 0 has them; ``totals`` (per-rank counts) are summed
        over the ranks, in the same all-reduce as the window's means."""
        elapsed = time.perf_counter() - self.window_start
        keys, totals = sorted(self.sums), totals or {}
        values = {}
        if keys or totals:
            device = self.sums[keys[0]].device if keys else self.world.device
            local = [self.sums[k] for k in keys] + [torch.tensor(float(v), device=device) for v in totals.values()]
            reduced = dict(zip(keys + list(totals), all_reduce(torch.stack(local)).tolist(), strict=True))
            applied = reduced.pop(APPLIED, 0.0)
            if keys and not applied:  # every update of the window was skipped: no line, as no means
                self._start_window()
                return {}
            values = {k: reduced.pop(k) / applied for k in keys if k != APPLIED}
            values.update(reduced)
        images_per_second = self.steps * self.global_batch / elapsed
        values.update(extra)
        values["images_per_s"] = images_per_second
        values["data_wait_pct"] = 100.0 * self.data_seconds / elapsed
        if self.peak:
            values["mfu_pct"] = 100.0 * self.flops_per_image * images_per_second / (self.peak * self.world.world_size)
        if self.world.device.type == "cuda":
            values["memory_gib"] = torch.cuda.max_memory_allocated(self.world.device) / 2**30
        if self.world.is_main:
            self._emit(step, values)
        self._start_window()
        return values

    def _start_window(self) -> None:
        self.sums, self.steps, self.data_seconds = {}, 0, 0.0
        self.window_start = time.perf_counter()

    def _emit(self, step: int, values: dict[str, float]) -> None:
        parts = [f"step {step}/{self.total_steps}"]
        for key, value in values.items():
            parts.append(f"{key} {value:.4g}")
        line = "  ".join(parts)
        if self.progress is not None:
            self.progress.write(line)
        else:
            log.info(line)
        for key, value in values.items():
            self.writer.add_scalar(f"train/{key}", value, step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def scalars(self, prefix: str, step: int, values: dict[str, float]) -> None:
        """Log other scalars (evaluation, codebook usage) on rank 0."""
        if not self.world.is_main:
            return
        log.info("%s step %d  %s", prefix, step, "  ".join(f"{k} {v:.4g}" for k, v in values.items()))
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.jsonl.write(json.dumps({"step": step, "split": prefix, **values}) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.close()
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
