"""A toy training run with injectable faults, used in-process and as a worker script by the
training-loop tests and the reliability suite.

The task: a 3-block MLP with dropout (so a resume must restore the RNG), data that is a function
of (epoch, batch) only. Faults are
keyed by the 0-based optimizer step (carried in each batch), so they hit the same step in a
resumed run, and by rank and torchrun attempt:

    python tests/toy_training.py OUTPUT_DIR '{"config": {...}, "faults": {...}}'

runs one rank (``torchrun`` or RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT in the environment);
``"dropout"`` in the spec sets the model's dropout (0 to compare with a one-process run).
Faults (all optional):

- ``nan_loss``: ``[step, rank]``: that rank's loss value is NaN (its gradient stays finite, so
  only the all-reduced finiteness flag can stop the other ranks).
- ``nan_grad``: ``[step, rank]``: that rank's gradients are NaN (the loss stays finite).
- ``die``: ``[step, rank]``: that rank SIGKILLs itself during the step, on torchrun's first
  attempt only (``TORCHELASTIC_RESTART_COUNT``); ``die_always``: on every attempt.
- ``exit``: ``[step, rank]``: ``SystemExit`` during the step (an in-process run that dies).
- ``hang``: ``[step, rank]``: that rank sleeps for an hour during the step.
- ``step_seconds``: sleep this long in every step (to give random kills something to hit).
- ``kill_in_save``: ``[step, phase]``: SIGKILL during the save of that step's checkpoint, phase
  ``"after_dcp"`` (shards and .metadata written, nothing else), ``"before_rename"`` (everything
  written, not yet published) or ``"in_prune"`` (while deleting an old checkpoint, after its
  first file is gone).

When it ends, by an exception too, the worker writes its model weights to
``OUTPUT_DIR/final-rank{rank}.pt`` (to check that nothing was updated after a stop, and that
the ranks agree). :func:`launch_ranks` starts the ranks of one run as separate processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import torch
from torch import nn

from beitv2_fast.train import checkpoint as ckpt
from beitv2_fast.train.config import TrainConfig
from beitv2_fast.train.distributed import Distributed, process_group
from beitv2_fast.train.loop import TrainData, TrainingTask, train

GLOBAL_BATCH = 8
DIM = 16
BATCHES_PER_EPOCH = 4
WORKER = os.path.abspath(__file__)
# Worker processes train on the CPU with gloo, on a GPU machine too (one GPU cannot host two
# NCCL ranks, and the in-process runs they are compared with are on the CPU).
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


class ToyNet(nn.Module):
    def __init__(self, dropout: float = 0.1):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(DIM, DIM), nn.GELU(), nn.Dropout(dropout)) for _ in range(3)
        )
        self.head = nn.Linear(DIM, 1)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x).squeeze(-1)


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _hits(fault, step: int, rank: int) -> bool:
    return fault is not None and fault[0] == step and fault[1] == rank


def toy_task(world: Distributed, faults: dict | None = None, *, dropout: float = 0.1) -> TrainingTask:
    faults = faults or {}
    torch.manual_seed(0)  # identical initial weights on every rank and in every run
    per_rank = GLOBAL_BATCH // world.world_size
    first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0

    def batches(epoch, start):
        for index in range(start, BATCHES_PER_EPOCH):
            g = torch.Generator().manual_seed(1000 * epoch + index)
            x = torch.randn(GLOBAL_BATCH, DIM, generator=g)
            rows = slice(world.rank * per_rank, (world.rank + 1) * per_rank)
            yield x[rows], x[rows].sum(-1).sin(), epoch * BATCHES_PER_EPOCH + index

    def loss(model, batch):
        x, y, step = batch
        if faults.get("step_seconds"):
            time.sleep(faults["step_seconds"])
        if (first_attempt and _hits(faults.get("die"), step, world.rank)) or _hits(
            faults.get("die_always"), step, world.rank
        ):
            _kill_self()
        if _hits(faults.get("exit"), step, world.rank):
            raise SystemExit(3)
        if _hits(faults.get("hang"), step, world.rank):
            time.sleep(3600)
        out = model(x)
        if _hits(faults.get("nan_grad"), step, world.rank):
            out = _NaNGradient.apply(out)
        value = (out - y).pow(2).mean()
        if _hits(faults.get("nan_loss"), step, world.rank):
            value = value + value.detach() * float("nan")
        return value, {"mse": value.detach()}

    def param_groups(model):
        return [{"params": list(model.parameters()), "lr_scale": 1.0}]

    return TrainingTask(
        model=ToyNet(dropout), loss=loss, param_groups=param_groups, data=TrainData(BATCHES_PER_EPOCH, batches),
        images_per_batch=per_rank, flops_per_image=1.0,
    )  # fmt: skip


def toy_config(output_dir, **overrides) -> TrainConfig:
    values = dict(
        task="pretrain", model="toy", batch_size=GLOBAL_BATCH, epochs=2, warmup_epochs=0.5, lr=1e-2, min_lr=1e-3,
        weight_decay=0.05, clip_grad=1.0, amp_dtype="float32", output_dir=str(output_dir), log_interval=1,
        checkpoint_interval=1, keep_checkpoints=3, num_workers=0, parallel="ddp",
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


def logged_rows(output_dir) -> list[dict]:
    """Every training row of metrics.jsonl, in order (a resumed run appends to the same file)."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return [row for row in rows if "split" not in row]


def losses(output_dir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in logged_rows(output_dir)}


def _kill_self() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install_save_kill(step: int, phase: str) -> None:
    """SIGKILL this process at ``phase`` of the save of ``step``'s checkpoint."""
    target = os.path.basename(ckpt.step_dir("", step))
    if phase == "after_dcp":
        original_save = ckpt.dcp.save

        def save(state, *, checkpoint_id, **kwargs):
            result = original_save(state, checkpoint_id=checkpoint_id, **kwargs)
            if os.path.basename(checkpoint_id) == target + ckpt.INCOMPLETE:
                _kill_self()
            return result

        ckpt.dcp.save = save
    elif phase == "before_rename":
        original_rename = ckpt.os.rename

        def rename(src, dst):
            if os.path.basename(dst) == target:
                _kill_self()
            return original_rename(src, dst)

        ckpt.os.rename = rename
    elif phase == "in_prune":
        original_rmtree = ckpt.shutil.rmtree

        def rmtree(path, *args, **kwargs):
            # The prune that follows this step's publication: delete one data file, then die.
            if os.path.isdir(os.path.join(os.path.dirname(path), target)) and not path.endswith(ckpt.INCOMPLETE):
                shards = sorted(name for name in os.listdir(path) if name.endswith(".distcp"))
                os.remove(os.path.join(path, shards[0]))
                _kill_self()
            return original_rmtree(path, *args, **kwargs)

        ckpt.shutil.rmtree = rmtree
    else:
        raise ValueError(f"unknown save phase {phase!r}")


def main(argv: list[str]) -> None:
    output_dir, spec = argv[0], json.loads(argv[1]) if len(argv) > 1 else {}
    faults = spec.get("faults", {})
    if faults.get("kill_in_save"):
        install_save_kill(*faults["kill_in_save"])
    from beitv2_fast.train.metrics import setup_logging

    with process_group() as world:
        setup_logging(world)
        task = toy_task(world, faults, dropout=spec.get("dropout", 0.1))
        try:
            train(toy_config(output_dir, **spec.get("config", {})), task, world)
        finally:
            torch.save(task.model.state_dict(), os.path.join(output_dir, f"final-rank{world.rank}.pt"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(world_size: int, output_dir, spec: dict, *, timeout_s: int = 30) -> list[subprocess.Popen]:
    """Start the ranks of one run (gloo on the loopback), with collectives that give up after
    ``timeout_s`` (``BEITV2_DIST_TIMEOUT``); stdout and stderr are pipes (read them with communicate)."""
    os.makedirs(output_dir, exist_ok=True)
    port = str(free_port())
    processes = []
    for rank in range(world_size):
        env = dict(os.environ, **CPU_ONLY, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, BEITV2_DIST_TIMEOUT=str(timeout_s))  # fmt: skip
        processes.append(
            subprocess.Popen(
                [sys.executable, WORKER, str(output_dir), json.dumps(spec)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
        )
    return processes


if __name__ == "__main__":
    main(sys.argv[1:])
