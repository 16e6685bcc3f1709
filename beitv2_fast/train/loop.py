"""The one training loop, shared by tokenizer training, pretraining, fine-tuning and probing.

A task (``train/tokenizer.py``, ``train/pretrain.py``, ``train/finetune.py``, ``train/segment.py``) supplies a
:class:`TrainingTask`: the model, the loss of one batch, the parameter groups, the data and the FLOPs
of one image. The loop owns everything else: distribution, mixed precision, accumulation,
clipping, the non-finite check, the schedule, logging, checkpoints and exact resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig, check_output_dir, save_config
from .distributed import Distributed, barrier, broadcast_buffers, choose_parallel, parallelize, unwrap
from .ema import WeightEma
from .metrics import MetricLogger, log
from .run_folder import delete_run, plan_resume, run_settings, schedule_steps, trim_metrics
from .step import (  # noqa: F401 - NonFiniteError is re-exported
    NonFiniteError,
    NonFiniteGuard,
    begin_graphed_step,
    compile_student,
    cuda_graph_mode,
    phase,
    uses_deferred_check,
)

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclasses.dataclass
class TrainData:
    """The training batches of every epoch, resumable at any batch.

    Args:
        batches_per_epoch: micro-batches per epoch on each rank (identical on every rank).
        batches: ``batches(epoch, start)`` yields the batches of ``epoch`` from index ``start``;
            the same (epoch, index) must give the same batch in a resumed run.
        num_skipped: optional ``num_skipped()``: unreadable files replaced so far on this rank
            (logged as ``data_skipped``, summed over the ranks).
        state_dict, load_state_dict: optional; the data state saved with every checkpoint (the
            same on every rank) and restored on resume, where it refuses a changed data layout.
    """

    batches_per_epoch: int
    batches: Callable[[int, int], Iterator[Any]]
    num_skipped: Callable[[], int] | None = None
    state_dict: Callable[[], dict] | None = None
    load_state_dict: Callable[[dict], None] | None = None

    @classmethod
    def from_loader(cls, loader) -> TrainData:
        """Batches of a ``beitv2_fast.data`` loader, whose draws depend only on (seed, epoch, index)."""

        def batches(epoch: int, start: int) -> Iterator[Any]:
            loader.seek(epoch, start)
            return iter(loader)

        return cls(len(loader), batches, lambda: loader.num_skipped, loader.state_dict, loader.load_state_dict)


@dataclasses.dataclass
class TrainingTask:
    """What a task gives the loop.

    Args:
        model: the trainable module (unwrapped; the loop applies FSDP2/DDP and compilation).
        loss: ``loss(model, batch) -> (loss, metrics)``: a scalar loss and 0-d detached tensors.
        param_groups: ``param_groups(model) -> groups`` for AdamW, each with an ``lr_scale``.
        data: the training batches.
        images_per_batch: images in one micro-batch on one rank.
        flops_per_image: training FLOPs per image, for MFU.
        evaluate: optional ``evaluate(model, step) -> metrics``, run every ``eval_interval`` epochs.
        on_log: optional ``on_log(model) -> metrics`` added to each log line (e.g. codebook usage).
        on_epoch_start: optional ``on_epoch_start(model, epoch)`` (e.g. reset codebook usage).
        on_end: optional ``on_end(model, output_dir)`` after the last step (exports, pictures).
        frozen: modules that run without gradients (the tokenizer); moved to the device (in bf16
            under bf16 autocast: no fp32 master copy) and compiled with the model, never sharded
            or optimised.
        best_metric: the ``evaluate`` figure to maximise: the model with the best value so far is
            exported as ``model_best.safetensors``.
        model_settings: the constructor settings of ``model`` (``create_model(name, **settings)``),
            saved in the exports' metadata so that loading them needs no settings retyped.
        model_ema_decay: keep an EMA of the weights with this decay (``--model-ema``): evaluated
            with the model (its figures prefixed ``ema_``), checkpointed and exported as
            ``model_ema.safetensors``.
    """

    model: nn.Module
    loss: Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    param_groups: Callable[[nn.Module], list[dict]]
    data: TrainData
    images_per_batch: int
    flops_per_image: float
    evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None
    on_log: Callable[[nn.Module], dict[str, float]] | None = None
    on_epoch_start: Callable[[nn.Module, int], None] | None = None
    on_end: Callable[[nn.Module, str], None] | None = None
    frozen: list[nn.Module] = dataclasses.field(default_factory=list)
    best_metric: str | None = None
    model_settings: dict = dataclasses.field(default_factory=dict)
    model_ema_decay: float | None = None


def cosine_lr(step: int, total: int, warmup: int, base: float, final: float, start: float = 0.0) -> float:
    """Linear warmup from ``start`` over ``warmup`` steps, then cosine from ``base`` to ``final``
    (microsoft/unilm beit2/utils.py ``cosine_scheduler``, per step)."""
    if step < warmup:
        return start + (base - start) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * progress))


def poly_lr(
    step: int, total: int, warmup: int, base: float, final: float, power: float = 1.0, warmup_ratio: float = 1e-6
) -> float:
    """mmcv's ``poly`` policy with linear warmup, per step (the reference's segmentation schedule):
    ``(base - final) * (1 - step / total) ** power + final``, multiplied during the first
    ``warmup`` steps by ``1 - (1 - step / warmup) * (1 - warmup_ratio)``."""
    lr = (base - final) * (1.0 - step / total) ** power + final
    if step < warmup:
        lr *= 1.0 - (1.0 - step / warmup) * (1.0 - warmup_ratio)
    return lr


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 autocast is
    emulated and several times slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of ``--amp-dtype`` on ``device``: ``auto`` is bfloat16 on GPUs and on CPUs
    with native bf16, else float32 (said in the log)."""
    if name != "auto":
        return AMP_DTYPES[name]
    if device.type == "cuda" or cpu_has_native_bf16():
        return torch.bfloat16
    log.info("--amp-dtype auto: float32, as this CPU has no native bf16 (AVX512-BF16/AMX) and emulates it slowly")
    return torch.float32


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a NamedTuple batch
        return type(batch)(*(_move(b, device) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _move(v, device) for k, v in batch.items()}
    return batch


def _gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel) and not enabled:
        return model.no_sync()
    return contextlib.nullcontext()


def build_optimizer(groups: list[dict], config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused where torch supports it (CUDA, and CPU in recent releases)."""
    kwargs = dict(lr=config.lr, betas=tuple(config.opt_betas), eps=config.opt_eps, weight_decay=config.weight_decay)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except RuntimeError:
        log.warning("fused AdamW is unavailable on %s; using the foreach implementation", device)
        return torch.optim.AdamW(groups, **kwargs)


def train(config: TrainConfig, task: TrainingTask, world: Distributed) -> dict[str, float]:
    """Run ``task`` to the end of its schedule (or to ``max_steps``); return the last logged metrics.

    A folder whose run already ended is left as it is (an empty dict is returned)."""
    check_output_dir(config.output_dir)
    start = plan_resume(config, world.world_size)
    if start.complete:
        log.info("the run in %s is complete (step %d); nothing to do", config.output_dir, start.step)
        return {}
    device = world.device
    amp_dtype = resolve_amp_dtype(config.amp_dtype, device)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    model = task.model.to(device)
    parallel = choose_parallel(config.parallel, world)
    graph_mode = cuda_graph_mode(config.cuda_graphs, parallel)
    frozen_dtype = torch.bfloat16 if amp_dtype == torch.bfloat16 else torch.float32
    for module in task.frozen:
        module.to(device, dtype=frozen_dtype).eval().requires_grad_(False)
        if config.torchcompile:
            module.compile(fullgraph=True, mode=graph_mode)
    param_dtype = amp_dtype if (parallel == "fsdp" and device.type == "cuda" and amp_dtype != torch.float32) else None
    model = parallelize(
        model, world, parallel=parallel, compile_blocks=config.torchcompile and parallel != "none",
        grad_checkpointing=config.grad_checkpointing, param_dtype=param_dtype,
    )  # fmt: skip
    if config.torchcompile:
        log.info("%s", compile_student(model, parallel, mode=graph_mode))
    optimizer = build_optimizer(task.param_groups(unwrap(model)), config, device)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    guard = NonFiniteGuard(config.nonfinite, device, world.rank)
    deferred = uses_deferred_check(optimizer, scaler)

    steps_per_epoch = task.data.batches_per_epoch // config.grad_accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(
            f"--batch-size {config.batch_size} x --grad-accum-steps {config.grad_accum_steps} leaves no full step "
            f"in an epoch of {task.data.batches_per_epoch} batches per rank; lower --batch-size or "
            "--grad-accum-steps, or use more data"
        )
    total_steps, stop_step = schedule_steps(config, steps_per_epoch)
    warmup_steps = config.warmup_steps or round(config.warmup_epochs * steps_per_epoch)
    global_batch = task.images_per_batch * config.grad_accum_steps * world.world_size

    checkpoint_root = os.path.join(config.output_dir, "checkpoints")
    ema = WeightEma(unwrap(model), task.model_ema_decay) if task.model_ema_decay is not None else None
    extra = {"scaler_scale": torch.ones(())} if scaler is not None else {}
    if ema is not None:
        extra.update(ema.state_tensors())
    step = 0
    best = {}
    if start.checkpoint:
        state = ckpt.load_checkpoint(start.checkpoint, model, optimizer, world, extra_tensors=extra)
        step, best = state["step"], state.get("best", {})
        if task.data.load_state_dict is not None and "data" in state:
            try:  # refuses another data set size, world size, batch size or seed
                task.data.load_state_dict(state["data"])
            except ValueError as exc:
                raise ConfigError(f"--resume {start.checkpoint}: {exc}") from None
        if scaler is not None:
            scaler.update(new_scale=float(extra["scaler_scale"]))
        log.info("resumed from %s at step %d", start.checkpoint, step)
    if world.is_main:
        if start.overwrite:
            log.info("--overwrite: deleting the previous run's files in %s", config.output_dir)
            delete_run(config.output_dir)
        os.makedirs(config.output_dir, exist_ok=True)
        trim_metrics(config.output_dir, step)
        save_config(config, os.path.join(config.output_dir, "config.yaml"))
    barrier()

    logger = MetricLogger(
        config.output_dir, world, flops_per_image=task.flops_per_image, global_batch=global_batch,
        total_steps=stop_step, steps_per_epoch=steps_per_epoch, start_step=step, use_wandb=config.log_wandb,
        config=dataclasses.asdict(config),
    )  # fmt: skip
    log.info(
        "%s: %s, %d ranks (%s), %d steps of %d images (schedule: %d steps), %s", config.task, config.model,
        world.world_size, parallel, stop_step, global_batch, total_steps, str(amp_dtype).removeprefix("torch."),
    )  # fmt: skip
    run_state = {"run": run_settings(config, world.world_size), "steps_per_epoch": steps_per_epoch}
    metadata = export_metadata(config, task)

    def save(at_step: int) -> None:
        broadcast_buffers(model)
        if scaler is not None:
            extra["scaler_scale"].fill_(scaler.get_scale())
        state = {"epoch": at_step // steps_per_epoch, "best": best, **run_state}
        if task.data.state_dict is not None:
            state["data"] = task.data.state_dict()
        path = ckpt.save_checkpoint(
            checkpoint_root, at_step, model, optimizer, world, state=state, extra_tensors=extra,
            keep=config.keep_checkpoints,
        )  # fmt: skip
        log.info("saved checkpoint %s", os.path.basename(path))

    last: dict[str, float] = {}
    model.train()
    batches: Iterator[Any] | None = None
    while step < stop_step:
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        if batches is None or step_in_epoch == 0:
            batches = task.data.batches(epoch, step_in_epoch * config.grad_accum_steps)
            if task.on_epoch_start is not None and step_in_epoch == 0:
                task.on_epoch_start(unwrap(model), epoch)
        if config.sched == "poly":
            lr = poly_lr(step, total_steps, warmup_steps, config.lr, config.min_lr, config.poly_power)
        else:
            lr = cosine_lr(step, total_steps, warmup_steps, config.lr, config.min_lr, config.warmup_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

        data_seconds = 0.0
        loss_sum = torch.zeros((), device=device)
        metric_sums: dict[str, torch.Tensor] = {}
        for micro in range(config.grad_accum_steps):
            fetch_began = time.perf_counter()
            batch = _move(next(batches), device)
            data_seconds += time.perf_counter() - fetch_began
            begin_graphed_step(graph_mode)
            with _gradient_sync(model, micro == config.grad_accum_steps - 1), autocast:
                loss, metrics = task.loss(model, batch)
            scaled = loss / config.grad_accum_steps
            with phase("backward"):
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            loss_sum += loss.detach().float()
            for key, value in metrics.items():
                metric_sums[key] = metric_sums.get(key, 0) + value.detach().float() / config.grad_accum_steps

        with phase("clip + optimizer"):
            if scaler is not None:
                scaler.unscale_(optimizer)
            max_norm = config.clip_grad if config.clip_grad > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                grad_norm = grad_norm.full_tensor()
            # Skipped on the device; the flags are read below, only where the host looks anyway.
            applied = guard.step(optimizer, step, loss_sum, grad_norm, scaler, deferred=deferred)
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
        logger.update({"loss": loss_sum / config.grad_accum_steps, "grad_norm": grad_norm, **metric_sums}, data_seconds,
                      applied)  # fmt: skip
        step += 1

        log_now = step % config.log_interval == 0 or step == stop_step
        epoch_done = step % steps_per_epoch == 0
        evaluate_now = (
            task.evaluate is not None and epoch_done and (step // steps_per_epoch) % config.eval_interval == 0
        )
        by_epochs = (
            config.checkpoint_epochs and epoch_done and (step // steps_per_epoch) % config.checkpoint_epochs == 0
        )
        save_now = (not config.checkpoint_epochs and step % config.checkpoint_interval == 0) or by_epochs
        save_now = save_now or step == stop_step
        if log_now or save_now or evaluate_now:
            guard.check()  # stop (every rank: the flags are all-reduced) before anything is written
        if log_now and logger.steps:
            extra_values = {"lr": lr}
            if task.on_log is not None:
                extra_values.update(task.on_log(unwrap(model)))
            totals = {"data_skipped": task.data.num_skipped()} if task.data.num_skipped is not None else None
            last = logger.write(step, extra_values, totals) or last
        if evaluate_now:
            model.eval()
            broadcast_buffers(model)
            results = task.evaluate(model, step)
            if ema is not None:
                with ema.swapped_in():
                    results.update({f"ema_{key}": value for key, value in task.evaluate(model, step).items()})
            model.train()
            if task.best_metric is not None and results[task.best_metric] > best.get(task.best_metric, -math.inf):
                best = {**results, "step": step}
                ckpt.export_safetensors(
                    model, os.path.join(config.output_dir, "model_best.safetensors"), world, metadata
                )
            if task.best_metric is not None:
                results = {**results, f"best_{task.best_metric}": best[task.best_metric]}
            logger.scalars("eval", step, results)
        if save_now:
            save(step)

    broadcast_buffers(model)
    if task.on_end is not None:
        task.on_end(model, config.output_dir)
    ckpt.export_safetensors(model, os.path.join(config.output_dir, "model.safetensors"), world, metadata)
    if ema is not None:
        with ema.swapped_in():
            ckpt.export_safetensors(model, os.path.join(config.output_dir, "model_ema.safetensors"), world, metadata)
    logger.close()
    return last


def export_metadata(config: TrainConfig, task: TrainingTask) -> dict[str, str]:
    """The header of the exported weights: the model name and its constructor settings, so that
    ``tokenize``, ``convert``, ``eval`` and ``--finetune`` rebuild it without settings retyped."""
    return {
        "beitv2_fast.task": config.task,
        "beitv2_fast.model": config.model,
        "beitv2_fast.model_kwargs": json.dumps({**task.model_settings, **config.model_kwargs}),
    }
