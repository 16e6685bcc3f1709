"""One run per ``--output-dir``: what a command may do with the folder it is given.

- An empty or new folder: a new run.
- A folder with a checkpoint, ``--resume auto`` (or a checkpoint path): that run continues, if it
  was started with the same defining settings (:data:`RUN_SETTINGS` and the number of ranks);
  otherwise the command stops with one line naming each difference, unless
  ``--allow-changed-settings`` says the change is deliberate (never for the number of ranks: the
  data position cannot be resharded). A run that already reached its last step is complete:
  the command says so and rewrites nothing.
- A folder that holds another run, with ``--resume none`` (or other settings and no checkpoint
  yet): refused unless ``--overwrite``, which deletes that run's files first.

The defining settings are saved in each checkpoint's ``state.json`` (``run``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import yaml

from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig

# What a checkpoint cannot be resumed with a different value of (weights, data order, schedule).
RUN_SETTINGS = (
    "task", "model", "model_kwargs", "input_size", "second_input_size", "tokenizer_model", "tokenizer_kwargs",
    "codebook_size", "codebook_dim", "nb_classes", "early_layers", "head_layers", "batch_size", "grad_accum_steps",
)  # fmt: skip
# The files of a run (what --overwrite deletes).
RUN_FILES = ("checkpoints", "metrics.jsonl", "tb", "config.yaml", "model.safetensors", "model_best.safetensors")


def run_settings(config: TrainConfig, world_size: int) -> dict:
    """The defining settings of a run, as JSON gives them back (tuples become lists)."""
    settings = {name: getattr(config, name) for name in RUN_SETTINGS}
    return json.loads(json.dumps({**settings, "world_size": world_size}))


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """Where a run starts: ``checkpoint`` (None: from scratch) at ``step``; ``complete``: the run in
    the folder already ended, there is nothing to do; ``overwrite``: delete the old run first."""

    checkpoint: str | None = None
    step: int = 0
    state: dict | None = None
    complete: bool = False
    overwrite: bool = False


def _holds_run(output_dir: str) -> bool:
    return any(os.path.exists(os.path.join(output_dir, name)) for name in RUN_FILES)


def _differences(saved: dict, current: dict) -> list[str]:
    return [
        f"{name} {saved[name]!r} (now {current[name]!r})"
        for name in current
        if name in saved and saved[name] != current[name]
    ]


def plan_resume(config: TrainConfig, world_size: int) -> ResumePoint:
    """Decide, reading only, where the run in ``config.output_dir`` starts (see the module docstring);
    raises :class:`ConfigError` for a run it must not mix with."""
    out = config.output_dir
    if config.overwrite:
        return ResumePoint(overwrite=_holds_run(out))
    another_run = (
        f"--output-dir {out} holds another run; resume it with --resume auto and its settings, start afresh with "
        "--overwrite (deletes its checkpoints, logs and exports), or choose a new --output-dir"
    )
    if config.resume in ("none", ""):
        if _holds_run(out):
            raise ConfigError(another_run)
        return ResumePoint()
    path = ckpt.latest_checkpoint(os.path.join(out, "checkpoints")) if config.resume == "auto" else config.resume
    current = run_settings(config, world_size)
    if path is None:  # a run that stopped before its first checkpoint, if the same: start it again
        saved_config = os.path.join(out, "config.yaml")
        if os.path.exists(saved_config):
            with open(saved_config) as f:
                saved = yaml.safe_load(f) or {}
            saved = {name: value for name, value in json.loads(json.dumps(saved)).items() if name in RUN_SETTINGS}
            if _differences(saved, current):
                raise ConfigError(f"{another_run} ({'; '.join(_differences(saved, current))})")
        return ResumePoint()
    state = ckpt.read_state(path)
    saved = state.get("run")
    if saved is not None:
        if saved.get("world_size", world_size) != world_size:
            raise ConfigError(
                f"--resume {path}: saved by {saved['world_size']} ranks, resumed with {world_size}; the data position "
                f"cannot be resharded: resume with {saved['world_size']} ranks (torchrun --nproc-per-node), or start "
                "afresh in a new --output-dir"
            )
        differences = _differences(saved, current)
        if differences and not config.allow_changed_settings:
            raise ConfigError(
                f"--resume {path}: the checkpoint's run differs: {'; '.join(differences)}; resume with its settings, "
                "pass --allow-changed-settings if the change is deliberate, or use a new --output-dir"
            )
    complete = state["step"] >= stop_step(config, state.get("steps_per_epoch")) and os.path.exists(
        os.path.join(out, "model.safetensors")
    )
    return ResumePoint(checkpoint=path, step=state["step"], state=state, complete=complete)


def schedule_steps(config: TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """``(schedule length, stop step)``: the schedule spans --epochs (--max-steps alone when there
    are none); --max-steps stops earlier on it."""
    total = steps_per_epoch * config.epochs if config.epochs else config.max_steps
    return total, min(total, config.max_steps) if config.max_steps else total


def stop_step(config: TrainConfig, steps_per_epoch: int | None) -> float:
    """The step this configuration stops at (infinite when unknown: a checkpoint of an older version)."""
    return float("inf") if steps_per_epoch is None else schedule_steps(config, steps_per_epoch)[1]


def delete_run(output_dir: str) -> None:
    """Remove the files of the run in ``output_dir`` (``--overwrite``), nothing else."""
    for name in RUN_FILES:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def trim_metrics(output_dir: str, step: int) -> None:
    """Drop the rows of ``metrics.jsonl`` after ``step`` (logged after the checkpoint a run resumes
    from: the resumed run logs those steps again), through a temporary file."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            row_step = json.loads(line).get("step", 0)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if row_step <= step:
            kept.append(line)
    if len(kept) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
