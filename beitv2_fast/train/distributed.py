"""Process groups, devices and model wrapping for one process or many (``torchrun``).

The wrapping order is torchtitan's: activation checkpointing, then ``torch.compile`` per block,
then ``fully_shard`` per block and on the root (FSDP2), or DDP. Blocks are the members of the
model's ``nn.ModuleList`` children (``blocks``, ``cls_pt_layers``...).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

# Collectives normally finish in seconds; a rank that died must not leave the others waiting
# for NCCL's default 10 minutes (gloo: 30).
DEFAULT_TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("BEITV2_DIST_TIMEOUT", "300")))


@dataclass(frozen=True)
class Distributed:
    """Where this process runs: its rank among ``world_size`` and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Distributed:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    One process without ``torchrun`` runs on ``cuda:0`` when there is a GPU, else the CPU.
    Under ``torchrun`` each rank takes ``cuda:LOCAL_RANK`` with NCCL, or the CPU with gloo.
    """
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Distributed(device=torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, store=_attempt_store(timeout), rank=rank, world_size=world_size, timeout=timeout,
            device_id=device if backend == "nccl" else None,
        )  # fmt: skip
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _attempt_store(timeout: datetime.timedelta) -> dist.Store:
    """The ``env://`` store, with keys private to this torchrun attempt.

    Under ``torchrun`` the workers of every restart share the agent's store, and the process
    group's keys (each rank's address) have the same names in every attempt: a restarted rank
    could read the address of a process from the attempt before, which is gone, and fail to
    connect. A prefix per attempt (``TORCHELASTIC_RESTART_COUNT``) keeps the attempts apart.
    """
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    return dist.PrefixStore(f"beitv2-attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


@contextlib.contextmanager
def process_group(timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Iterator[Distributed]:
    """:func:`init_distributed` on the way in, :func:`shutdown` on the way out."""
    world = init_distributed(timeout)
    try:
        yield world
    except BaseException:
        shutdown(clean=False)
        raise
    shutdown()


def shutdown(*, clean: bool = True) -> None:
    """Leave the process group. After a clean run every rank first waits for the others: gloo
    aborts a rank (``terminate called without an active exception``) whose peer tears down the
    connections it is still closing. After an error there is no one reliable to wait for."""
    if dist.is_initialized():
        if clean:
            barrier()
        dist.destroy_process_group()


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce, a no-op without a process group."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics): per-rank BatchNorm lets them
    drift apart between DDP's broadcasts at each forward, and a checkpoint, an evaluation or an
    export must see one model. Statistics and counters only: index tables (``relative_position_index``)
    never change. A no-op without a process group."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for buffer in unwrap(model).buffers():
        if type(buffer).__name__ != "DTensor" and (buffer.is_floating_point() or buffer.numel() == 1):
            dist.broadcast(buffer, src=0)


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: members of every ``nn.ModuleList`` in the model."""
    return [block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module]


def choose_parallel(requested: str, world: Distributed) -> str:
    """``auto`` resolves to FSDP2 on GPUs and DDP on CPUs when there are several ranks."""
    if not world.enabled:
        return "none"
    if requested == "auto":
        return "fsdp" if world.device.type == "cuda" else "ddp"
    return requested


def parallelize(
    model: nn.Module,
    world: Distributed,
    *,
    parallel: str,
    compile_blocks: bool = False,
    grad_checkpointing: bool = False,
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Apply activation checkpointing, per-block compilation and FSDP2 or DDP, in that order.

    Args:
        parallel: ``none``, ``ddp`` or ``fsdp`` (resolved by :func:`choose_parallel`).
        param_dtype: FSDP2 mixed precision: the dtype blocks compute in (reductions stay fp32).
    """
    if grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"--grad-checkpointing: {type(model).__name__} has no set_grad_checkpointing()")
        model.set_grad_checkpointing(True)
    if compile_blocks:
        blocks = blocks_of(model)
        # Dynamo specialises on each block's drop-path rate (linspace over the depth): one graph per
        # block, more than its default limit of 8, which fullgraph=True turns into a hard error.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(blocks) + 8)
        for block in blocks:
            block.compile(fullgraph=True)
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = dist.device_mesh.init_device_mesh(world.device.type, (world.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in blocks_of(model):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
    elif parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [world.device.index] if world.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids)
    elif parallel != "none":
        raise ValueError(f"--parallel must be none, ddp or fsdp; got {parallel!r}")
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
