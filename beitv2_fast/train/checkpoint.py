"""Training checkpoints with torch.distributed.checkpoint (DCP), safe against kills mid-save.

Layout under ``<output-dir>/checkpoints``::

    step-00001000/          a complete checkpoint (published by an atomic rename)
        .metadata           DCP's index, written last by DCP
        __0_0.distcp ...    model and optimizer shards, one file per rank
        rng-rank0.pt ...    each rank's RNG states (tensors only)
        state.json          step, epoch, data position and what else the run needs
    step-00002000.incomplete/   a save in progress, or one killed: never loaded
    step-00000500.deleting/     an old checkpoint being deleted (unpublished first): never loaded

A save writes everything into ``step-N.incomplete`` and rank 0 renames it to ``step-N`` once
every rank has finished, so a checkpoint is either complete or invisible. A save that fails on
any rank (disk full, unwritable folder) raises :class:`CheckpointSaveError` on every rank and
leaves the previous checkpoints as they were. The newest ``k`` complete checkpoints are kept
(at least 2, as the newest may still be in flight elsewhere). Resuming restores model,
optimizer, step, data position and RNG, so the run continues the same loss curve. DCP
unpickles its ``.metadata``: load only checkpoints you trust; share weights as safetensors
(:func:`export_safetensors`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from .distributed import Distributed, all_reduce, barrier

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step-(\d+)$")
INCOMPLETE = ".incomplete"
DELETING = ".deleting"


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, unwritable folder...); raised on every rank.
    The previous complete checkpoint is left as it was."""


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:08d}")


def _is_complete(path: str) -> bool:
    return all(os.path.exists(os.path.join(path, name)) for name in (".metadata", "state.json"))


def list_checkpoints(root: str) -> tuple[list[tuple[int, str]], list[str]]:
    """``([(step, path), ...] complete and sorted by step, [incomplete paths])``."""
    complete, incomplete = [], []
    if not os.path.isdir(root):
        return complete, incomplete
    for name in os.listdir(root):
        path = os.path.join(root, name)
        match = STEP_DIR.match(name)
        if match and _is_complete(path):
            complete.append((int(match.group(1)), path))
        elif name.startswith("step-"):
            incomplete.append(path)
    return sorted(complete), sorted(incomplete)


def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint, reporting (not loading) any incomplete ones."""
    complete, incomplete = list_checkpoints(root)
    for path in incomplete:
        log.warning("ignoring incomplete checkpoint %s (a save or deletion that did not finish)", path)
    return complete[-1][1] if complete else None


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    root: str,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    world: Distributed,
    *,
    state: dict,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
) -> str:
    """Save a complete checkpoint for ``step`` and return its folder.

    Args:
        state: JSON-serialisable run state (epoch, data position, ...), saved by rank 0.
        extra_tensors: more state saved with the model (e.g. a gradient scaler's scale).
        keep: complete checkpoints to keep (older ones are deleted by rank 0).
    """
    final = step_dir(root, step)
    if os.path.isdir(final) and _is_complete(final):
        return final  # already saved (e.g. the last step coincides with an interval)
    staging = final + INCOMPLETE
    failure = None
    if world.is_main:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)  # a previous attempt that was killed
            os.makedirs(staging)
        except OSError as exc:
            failure = exc
    _raise_on_any_rank(failure, step, staging, root, world)
    try:
        model_state, optim_state = get_state_dict(model, optimizer)
        # DCP's save is collective: a write error on one rank is raised on every rank.
        dcp.save({"model": model_state, "optim": optim_state, **(extra_tensors or {})}, checkpoint_id=staging)
        torch.save(_rng_state(), os.path.join(staging, f"rng-rank{world.rank}.pt"))
    except (OSError, dcp.CheckpointException) as exc:
        failure = exc
    _raise_on_any_rank(failure, step, staging, root, world)
    if world.is_main:
        try:
            with open(os.path.join(staging, "state.json"), "w") as f:
                json.dump({"step": step, "world_size": world.world_size, **state}, f)
                f.flush()
                os.fsync(f.fileno())
            os.rename(staging, final)
            _fsync_dir(root)
        except OSError as exc:
            failure = exc
    _raise_on_any_rank(failure, step, staging, root, world)
    if world.is_main:
        _prune(root, keep)
    barrier()
    return final


def _raise_on_any_rank(failure: BaseException | None, step: int, staging: str, root: str, world: Distributed) -> None:
    """Agree on success; if any rank failed, every rank raises (none waits in a later collective),
    after rank 0 removed the partial save so that it does not hold the disk space that ran out."""
    failed = all_reduce(torch.tensor(int(failure is not None), device=world.device), op=dist.ReduceOp.MAX)
    if not failed.item():
        return
    if world.is_main:
        shutil.rmtree(staging, ignore_errors=True)
    complete, _ = list_checkpoints(root)
    previous = f"the previous checkpoint {complete[-1][1]} is intact" if complete else "there is no earlier checkpoint"
    reason = _describe(failure) if failure is not None else "it failed on another rank"
    raise CheckpointSaveError(
        f"step {step}: could not save the checkpoint in {staging} ({reason}); {previous}. "
        "Free disk space or fix the output folder, then resume."
    ) from failure


def _describe(failure: BaseException) -> str:
    if isinstance(failure, dcp.CheckpointException):  # one line per failed rank, not DCP's tracebacks
        return "; ".join(f"rank {rank}: {type(exc).__name__}: {exc}" for rank, (exc, _) in failure.failures.items())
    return f"{type(failure).__name__}: {failure}"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: str, keep: int) -> None:
    complete, incomplete = list_checkpoints(root)
    for _, path in complete[:-keep]:
        try:
            # Unpublish first: a kill during the deletion must not leave a folder that looks complete.
            doomed = path + DELETING
            os.rename(path, doomed)
            shutil.rmtree(doomed)
        except OSError as exc:  # retention must not kill training
            log.warning("could not delete old checkpoint %s: %s", path, exc)
    for path in incomplete:
        shutil.rmtree(path, ignore_errors=True)


def read_state(path: str) -> dict:
    """The run state (``state.json``) of a complete checkpoint folder."""
    if not _is_complete(path):
        raise FileNotFoundError(f"--resume {path}: not a complete checkpoint (no .metadata or state.json)")
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)


def load_checkpoint(
    path: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    world: Distributed,
    *,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Restore model, optimizer, extra tensors and this rank's RNG; return the run state."""
    state = read_state(path)
    if state["world_size"] != world.world_size:
        raise ValueError(
            f"--resume {path}: saved with {state['world_size']} ranks, resumed with {world.world_size}; "
            "the data position cannot be resharded, resume with the same number of ranks"
        )
    model_state, optim_state = get_state_dict(model, optimizer)
    to_load = {"model": model_state, "optim": optim_state, **(extra_tensors or {})}
    dcp.load(to_load, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=to_load["model"], optim_state_dict=to_load["optim"])
    from ..models.convert import load_state_dict_file  # tensors only, and an error naming the file

    _set_rng_state(load_state_dict_file(os.path.join(path, f"rng-rank{world.rank}.pt"), unwrap=False))
    return state


def export_safetensors(model: nn.Module, path: str, world: Distributed, metadata: dict[str, str] | None = None) -> None:
    """Write the full model weights (official key names) as one safetensors file, from rank 0,
    through a temporary file so that a crash never leaves a truncated export. ``metadata``: string
    pairs for the header (the model name and constructor settings)."""
    from ..models.convert import export_safetensors as write_safetensors

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if world.is_main:
        tmp = path + ".tmp"
        write_safetensors(full, tmp, metadata={"format": "pt", **(metadata or {})})
        os.replace(tmp, path)
    barrier()
