"""Training configuration: one typed dataclass, named recipes, and the command-line parser.

Flags follow timm's names where the concept is shared (``--model``, ``--data-dir``,
``--batch-size``, ``--lr``, ``--epochs``, ``--resume``, ``--amp-dtype``, ``--grad-accum-steps``,
``--layer-decay``, ``--torchcompile``) and the reference's (microsoft/unilm ``beit2/``) for the
MIM settings (``--num-mask-patches``, ``--tokenizer-model``, ``--early-layers``...). Both
``--num-mask-patches`` and the reference's ``--num_mask_patches`` spellings are accepted.
A recipe (``--recipe``) sets the paper's values; ``--config FILE.yaml`` and flags override it,
in that order. The resolved configuration is written to ``<output-dir>/config.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import tempfile
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

TaskName = Literal["tokenizer", "pretrain", "finetune", "linprobe", "segment"]


AMP_CHOICES = ("auto", "bfloat16", "float16", "float32")
INTERPOLATIONS = ("bicubic", "bilinear", "lanczos", "nearest")
BUILTIN_DATA = ("demo", "synthetic")  # --data-dir values that name a built-in data set


class ConfigError(ValueError):
    """An option with an impossible value (the message names the option); the CLI prints it as
    one line and exits with status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but an error is one line (the option and what is wrong), not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Which commands use a field (its flag appears only in their --help); None: every command.
PRETRAIN, TOKENIZER, CLASSIFY = ("pretrain",), ("tokenizer",), ("finetune", "linprobe")
STUDENTS = ("pretrain", "finetune", "linprobe", "segment")  # BEiT backbones (drop path, layer scale)
EVALUATED = ("finetune", "linprobe", "segment")


def _f(default: Any, help: str, tasks: tuple[str, ...] | None = None, **kwargs) -> Any:
    """A dataclass field whose help text is also the CLI help; ``tasks``: the commands that use it."""
    metadata = {"help": help, "tasks": tasks, **kwargs}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything a run needs; every field is a flag of the same name (``_`` -> ``-``).

    These are the pretraining command's defaults; every other command starts from
    :data:`TASK_DEFAULTS` (the official script of that task).
    """

    # -- what to train ----------------------------------------------------------------------
    task: TaskName = _f("pretrain", "tokenizer | pretrain | finetune | linprobe | segment (set by the command)")
    model: str = _f("beit_base_patch16_224_8k_vocab_cls_pt", "model name (beitv2_fast.models.create_model)")
    model_kwargs: dict = _f({}, "extra model constructor arguments, as key=value (e.g. depth=4 embed_dim=192)")
    input_size: int = _f(224, "image size of the model's input")
    drop_path: float = _f(0.0, "stochastic depth rate", STUDENTS)
    layer_scale_init_value: float | None = _f(
        None, "layer scale init; default: the model's (0.1 base, 1e-5 large); 0 disables layer scale", STUDENTS
    )
    # -- BEiT v2 pretraining ----------------------------------------------------------------
    tokenizer_model: str = _f(
        "vqkd_encoder_base_decoder_3x768x12_clip", "VQ-KD tokenizer for the MIM targets", PRETRAIN
    )
    tokenizer_weight: str = _f("", "local path of the tokenizer checkpoint (never downloaded)", PRETRAIN)
    tokenizer_kwargs: dict = _f({}, "extra tokenizer constructor arguments, as key=value", PRETRAIN)
    codebook_size: int = _f(8192, "number of visual tokens", ("pretrain", "tokenizer"))
    codebook_dim: int = _f(32, "dimension of a code", ("pretrain", "tokenizer"))
    second_input_size: int = _f(224, "image size of the tokenizer view (the tokenizer checkpoint's)", PRETRAIN)
    second_interpolation: str = _f(
        "bicubic", "resize of the tokenizer view: bicubic | bilinear | lanczos ...", PRETRAIN
    )
    num_mask_patches: int = _f(75, "masked patches per image", PRETRAIN)
    min_mask_patches_per_block: int = _f(16, "smallest masked block", PRETRAIN)
    max_mask_patches_per_block: int | None = _f(None, "largest masked block (default: num_mask_patches)", PRETRAIN)
    min_crop_scale: float = _f(0.2, "RandomResizedCrop's smallest area fraction", ("pretrain", "tokenizer"))
    early_layers: int | None = _f(
        None, "block whose patch tokens feed the patch aggregation head; default: the model's (9 base, 21 large)",
        PRETRAIN,
    )  # fmt: skip
    head_layers: int = _f(2, "blocks of the patch aggregation head", PRETRAIN)
    shared_lm_head: bool = _f(True, "share the final norm and LM head between both branches", PRETRAIN)
    # -- VQ-KD tokenizer training -----------------------------------------------------------
    teacher: str = _f("clip", "clip | dino | hog (weight-free, for offline runs)", TOKENIZER)
    teacher_weight: str = _f("", "local path of the teacher checkpoint (CLIP or DINO)", TOKENIZER)
    quantize_kmeans_init: bool = _f(True, "k-means initialisation of the codebook on the first batch", TOKENIZER)
    ema_decay: float = _f(0.99, "codebook EMA decay", TOKENIZER)
    # -- fine-tuning / linear probing -------------------------------------------------------
    finetune: str = _f("", "pretrained checkpoint to start from (official, ours, timm or MMPretrain layout)", EVALUATED)
    model_key: str = _f(
        "model|module", "--finetune: the first of these keys present holds the weights (|-separated)", EVALUATED
    )
    model_prefix: str = _f("", "--finetune: use only the keys under this prefix, without it (e.g. module.)", EVALUATED)
    model_filter_name: str = _f(
        "", "--finetune: use only this submodule's keys (encoder: a VQ-KD tokenizer's encoder)", EVALUATED
    )
    nb_classes: int = _f(1000, "number of classes", EVALUATED)
    layer_decay: float = _f(
        1.0, "layer-wise lr decay (0.6-0.65 base, 0.8 large); 1 disables it", ("finetune", "segment")
    )
    use_cls: bool = _f(False, "classify from the CLS token instead of mean pooling", ("finetune",))
    model_ema: bool = _f(
        False,
        "keep an EMA of the weights: evaluated (ema_acc1 ...) and exported as model_ema.safetensors",
        ("finetune",),
    )
    model_ema_decay: float = _f(0.9999, "--model-ema: decay per optimizer step", ("finetune",))
    mixup: float = _f(0.8, "mixup alpha; 0 disables", ("finetune",))
    cutmix: float = _f(1.0, "cutmix alpha; 0 disables", ("finetune",))
    smoothing: float = _f(0.1, "label smoothing", ("finetune",))
    reprob: float = _f(0.25, "random erasing probability", ("finetune",))
    train_interpolation: str = _f("bicubic", "resize of the training crops: bicubic | bilinear | lanczos ...", CLASSIFY)
    linprobe_block: int = _f(-1, "linear probe: block whose output is probed (-1: the last)", ("linprobe",))
    linprobe_pool: str = _f("mean", "linear probe pooling: mean | cls", ("linprobe",))
    # -- data -------------------------------------------------------------------------------
    data_dir: str = _f(
        "",
        "required: image folder (ImageNet layout, or flat for pretraining; ADE20K or images/ + annotations/ "
        "for segmentation), or demo (the built-in photographs; segmentation: synthetic)",
    )
    eval_data_dir: str = _f(
        "", "validation folder (default: a val/ folder next to --data-dir's train/, else no evaluation)", EVALUATED
    )
    num_workers: int = _f(
        -1, "data loader worker processes per rank; -1: the cores available per local rank, less one (logged)"
    )
    fast_decode: bool = _f(
        False,
        "pretraining: decode each JPEG at the smallest DCT scale that leaves the crop at least as large as the "
        "views (the same crops and masks; pixels within resampling noise, see the README)",
        PRETRAIN,
    )
    data_backend: str = _f(
        "pil",
        "pil | gpu (batched JPEG decoding by torchvision on the GPU) | dali (when nvidia-dali is installed)",
        PRETRAIN,
    )
    # -- optimisation -----------------------------------------------------------------------
    batch_size: int = _f(128, "images per rank per step")
    grad_accum_steps: int = _f(1, "micro-batches per optimizer step")
    epochs: int = _f(300, "training epochs (the length of the learning-rate schedule)")
    max_steps: int = _f(0, "stop after this many optimizer steps, keeping the schedule of --epochs (0: all)")
    warmup_epochs: float = _f(10, "linear warmup from --warmup-lr")
    warmup_steps: int = _f(0, "linear warmup in optimizer steps; overrides --warmup-epochs when positive")
    warmup_lr: float = _f(0.0, "learning rate at the start of the warmup")
    sched: str = _f("cosine", "cosine | poly: the learning-rate schedule after the warmup")
    poly_power: float = _f(1.0, "exponent of the poly schedule (mmcv's PolyLrUpdaterHook)")
    lr: float = _f(
        1.5e-3,
        "peak learning rate, absolute: never rescaled by the batch size (the official VQ-KD script multiplies its "
        "--lr by the total batch / 128)",
    )
    min_lr: float = _f(1e-5, "final learning rate of the schedule")
    weight_decay: float = _f(0.05, "AdamW weight decay (none on biases, norms, tokens, position tables, gammas)")
    opt_betas: list = _f([0.9, 0.98], "AdamW betas")
    opt_eps: float = _f(1e-8, "AdamW eps")
    clip_grad: float = _f(3.0, "global gradient-norm clip; 0 disables")
    # -- systems ----------------------------------------------------------------------------
    amp_dtype: str = _f(
        "auto",
        "auto | bfloat16 | float16 (with a gradient scaler) | float32; auto: bfloat16 on GPUs and on CPUs with "
        "native bf16 (AVX512-BF16/AMX), else float32",
    )
    parallel: str = _f("auto", "auto | fsdp | ddp | none: auto is FSDP2 on GPUs, DDP on CPUs, none for one process")
    torchcompile: bool = _f(False, "torch.compile the student (one graph; per block under DDP/FSDP2) and the tokenizer")
    cuda_graphs: bool = _f(
        False, "CUDA graphs of the compiled graphs (torch.compile mode reduce-overhead); needs --torchcompile and a GPU"
    )
    grad_checkpointing: bool = _f(False, "activation checkpointing per block")
    seed: int = _f(0, "random seed")
    nonfinite: str = _f("stop", "stop | skip: what a non-finite loss or gradient norm does")
    # -- output -----------------------------------------------------------------------------
    output_dir: str = _f("runs/beitv2", "folder for checkpoints, logs and exports")
    resume: str = _f("auto", "auto (newest complete checkpoint in output-dir) | PATH of a step folder | none")
    overwrite: bool = _f(False, "start afresh in an --output-dir that holds another run, deleting that run's files")
    allow_changed_settings: bool = _f(
        False, "resume although the model, sizes, batch size or task differ from the checkpoint's run"
    )
    checkpoint_interval: int = _f(1000, "optimizer steps between checkpoints (the last step is always saved)")
    checkpoint_epochs: int = _f(0, "epochs between checkpoints, as the official --save_ckpt_freq (0: by steps)")
    keep_checkpoints: int = _f(2, "complete checkpoints kept (at least 2: the newest may be in flight)")
    log_interval: int = _f(10, "optimizer steps between log lines")
    log_wandb: bool = _f(False, "also log to Weights & Biases (needs wandb)")
    eval_interval: int = _f(1, "epochs between evaluations", EVALUATED)

    def layer_scale_kwargs(self) -> dict:
        """The model constructor's ``init_values``: the model's own unless --layer-scale-init-value is given."""
        if self.layer_scale_init_value is None:
            return {}
        return {"init_values": self.layer_scale_init_value or None}

    def validate(self) -> None:
        """Reject impossible values before any work starts, naming the option (:class:`ConfigError`)."""
        checks = [
            (
                self.task in typing.get_args(TaskName),
                "--task must be tokenizer, pretrain, finetune, linprobe or segment",
            ),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.grad_accum_steps >= 1, "--grad-accum-steps must be at least 1"),
            (self.epochs >= 1 or self.max_steps >= 1, "--epochs or --max-steps must be at least 1"),
            (self.epochs >= 0 and self.max_steps >= 0, "--epochs and --max-steps cannot be negative"),
            (self.keep_checkpoints >= 2, "--keep-checkpoints must be at least 2 (the newest may still be in flight)"),
            (self.checkpoint_interval >= 1, "--checkpoint-interval must be at least 1"),
            (self.log_interval >= 1, "--log-interval must be at least 1"),
            (self.eval_interval >= 1, "--eval-interval must be at least 1"),
            (self.num_workers >= -1, "--num-workers must be -1 (from the cores) or at least 0"),
            (self.input_size >= 1, "--input-size must be at least 1"),
            (self.second_input_size >= 1, "--second-input-size must be at least 1"),
            (self.codebook_size >= 1, "--codebook-size must be at least 1"),
            (self.codebook_dim >= 1, "--codebook-dim must be at least 1"),
            (self.nb_classes >= 1, "--nb-classes must be at least 1"),
            (self.lr > 0, "--lr must be positive"),
            (0 <= self.min_lr <= self.lr, "--min-lr must lie between 0 and --lr"),
            (self.warmup_epochs >= 0, "--warmup-epochs cannot be negative"),
            (self.warmup_steps >= 0, "--warmup-steps cannot be negative"),
            (self.sched in ("cosine", "poly"), "--sched must be cosine or poly"),
            (self.poly_power > 0, "--poly-power must be positive"),
            (self.weight_decay >= 0, "--weight-decay cannot be negative"),
            (self.clip_grad >= 0, "--clip-grad cannot be negative (0 disables clipping)"),
            (0 <= self.drop_path < 1, "--drop-path must lie in [0, 1)"),
            (0 <= self.smoothing < 1, "--smoothing must lie in [0, 1)"),
            (0 < self.model_ema_decay < 1, "--model-ema-decay must lie in (0, 1)"),
            (0 <= self.reprob <= 1, "--reprob must lie in [0, 1]"),
            (self.mixup >= 0 and self.cutmix >= 0, "--mixup and --cutmix cannot be negative"),
            (self.amp_dtype in AMP_CHOICES, "--amp-dtype must be auto, bfloat16, float16 or float32"),
            (self.parallel in ("auto", "fsdp", "ddp", "none"), "--parallel must be auto, fsdp, ddp or none"),
            (self.nonfinite in ("stop", "skip"), "--nonfinite must be stop or skip"),
            (self.teacher in ("clip", "dino", "hog"), "--teacher must be clip, dino or hog"),
            (self.data_backend in ("pil", "gpu", "dali"), "--data-backend must be pil, gpu or dali"),
            (
                not self.fast_decode or (bool(self.data_dir) and self.data_backend == "pil"),
                "--fast-decode reads JPEG files on the CPU: give --data-dir, with --data-backend pil",
            ),
            (
                self.data_backend == "pil" or bool(self.data_dir),
                f"--data-backend {self.data_backend} decodes JPEG files: give --data-dir (or use --data-backend pil)",
            ),
            (self.linprobe_pool in ("mean", "cls"), "--linprobe-pool must be mean or cls"),
            (self.num_mask_patches >= 1, "--num-mask-patches must be at least 1"),
            (0 < self.min_crop_scale <= 1, "--min-crop-scale must lie in (0, 1]"),
            (len(self.opt_betas) == 2, "--opt-betas needs two values"),
            (not self.cuda_graphs or self.torchcompile, "--cuda-graphs needs --torchcompile (it graphs what compiles)"),
            (self.train_interpolation in INTERPOLATIONS, f"--train-interpolation must be one of {INTERPOLATIONS}"),
            (self.second_interpolation in INTERPOLATIONS, f"--second-interpolation must be one of {INTERPOLATIONS}"),
            (0 <= self.warmup_lr <= self.lr, "--warmup-lr must lie between 0 and --lr"),
            (self.checkpoint_epochs >= 0, "--checkpoint-epochs cannot be negative"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.cuda_graphs:
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("--cuda-graphs needs a CUDA GPU and none is visible; drop --cuda-graphs")
        self._validate_task()
        self._validate_paths()
        if not self.data_dir:
            builtin = "synthetic (generated scenes)" if self.task == "segment" else "demo (the built-in photographs)"
            raise ConfigError(f"--data-dir is required: an image folder, or {builtin}")

    def _validate_task(self) -> None:
        if self.task == "pretrain" and not self.tokenizer_weight:
            raise ConfigError(
                "--tokenizer-weight is required: a local VQ-KD checkpoint (official vqkd_*.pth, or "
                "model.safetensors from `beitv2 train-tokenizer`); a random tokenizer gives meaningless targets"
            )
        patch = self.model_kwargs.get("patch_size") or _patch_size_in_name(self.model)
        if self.task == "tokenizer":
            encoder = self.model_kwargs.get("encoder_config") or {}
            patch = encoder.get("patch_size", 16) if isinstance(encoder, dict) else 16
        if patch and isinstance(patch, int):
            if self.input_size % patch:
                lower = self.input_size - self.input_size % patch
                raise ConfigError(
                    f"--input-size {self.input_size} is not a multiple of the patch size {patch}; use "
                    f"{lower or patch} or {lower + patch}"
                )
            patches = (self.input_size // patch) ** 2
            if self.task == "pretrain" and self.num_mask_patches > patches:
                raise ConfigError(
                    f"--num-mask-patches {self.num_mask_patches} exceeds the {patches} patches of a "
                    f"{self.input_size}px image with {patch}px patches"
                )
        if self.task == "pretrain" and self.min_mask_patches_per_block > self.num_mask_patches:
            raise ConfigError(
                f"--min-mask-patches-per-block {self.min_mask_patches_per_block} is above --num-mask-patches "
                f"{self.num_mask_patches}: no masked block can be that large; lower it"
            )
        if self.task == "tokenizer" and self.teacher in ("clip", "dino") and not self.teacher_weight:
            raise ConfigError(
                f"--teacher {self.teacher} needs --teacher-weight: a local checkpoint (never downloaded); "
                "--teacher hog needs none"
            )
        if self.task == "segment" and self.nb_classes > 255:
            raise ConfigError(
                f"--nb-classes {self.nb_classes}: segmentation label maps hold 0..254 (255 is unlabelled); "
                "ADE20K has 150 classes, the built-in synthetic set 4"
            )
        if self.task == "linprobe" and not self.finetune:
            raise ConfigError("--finetune is required for linear probing: the pretrained checkpoint to probe")

    def _validate_paths(self) -> None:
        files = {"--tokenizer-weight": self.tokenizer_weight, "--teacher-weight": self.teacher_weight,
                 "--finetune": self.finetune}  # fmt: skip
        for option, path in files.items():
            if path and not os.path.isfile(path):
                raise ConfigError(f"{option} {path!r}: no such file (weights are never downloaded)")
        folders = {"--data-dir": self.data_dir, "--eval-data-dir": self.eval_data_dir}
        for option, path in folders.items():
            if path and path not in BUILTIN_DATA and not os.path.isdir(path):
                raise ConfigError(f"{option} {path!r}: no such folder")
        if self.resume not in ("auto", "none", "") and not os.path.isdir(self.resume):
            raise ConfigError(f"--resume {self.resume!r}: no such checkpoint folder (or use auto / none)")


def _patch_size_in_name(model: str) -> int | None:
    """The patch size that a registered name spells (``beit_base_patch16_224`` -> 16), if any."""
    match = re.search(r"patch(\d+)", model)
    return int(match.group(1)) if match else None


def check_output_dir(path: str) -> None:
    """Create ``--output-dir`` and check that a file can be written in it, before any work starts."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigError(f"--output-dir {path!r} is not writable: {exc.strerror or exc}") from exc


# --------------------------------------------------------------------------------------------
# Each command's defaults: the official script of its task (microsoft/unilm beit2/), where the
# dataclass defaults (pretraining: the paper's ViT-B 300-epoch recipe) do not already match
# --------------------------------------------------------------------------------------------
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": dict(output_dir="runs/beitv2"),
    # run_vqkd_training.py, except its lr, which it multiplies by the total batch / 128: ours is
    # absolute, and 5e-5 x 512 / 128 (the paper's 8 x 64 images) = 2e-4.
    "tokenizer": dict(
        model="vqkd_encoder_base_decoder_3x768x12_clip", batch_size=64, epochs=100, warmup_epochs=5, lr=2e-4,
        min_lr=1e-5, weight_decay=1e-4, opt_betas=[0.9, 0.999], clip_grad=0.0, min_crop_scale=0.08,
        output_dir="runs/tokenizer",
    ),
    # run_class_finetuning.py (its --opt_betas None is AdamW's (0.9, 0.999), --clip_grad None is 0).
    "finetune": dict(
        model="beit_base_patch16_224", batch_size=64, epochs=30, warmup_epochs=5, lr=5e-4, min_lr=1e-6,
        warmup_lr=1e-6, weight_decay=0.05, opt_betas=[0.9, 0.999], clip_grad=0.0, layer_decay=0.9, drop_path=0.1,
        mixup=0.0, cutmix=0.0, smoothing=0.1, reprob=0.25, output_dir="runs/finetune",
    ),
    # No official protocol (microsoft/unilm#1574): the linprobe_base recipe's MAE-style probe,
    # without mixup, cutmix, erasing or smoothing.
    "linprobe": dict(
        model="beit_base_patch16_224", batch_size=1024, epochs=90, warmup_epochs=10, lr=4e-3, min_lr=0.0,
        weight_decay=0.0, opt_betas=[0.9, 0.999], clip_grad=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0, reprob=0.0,
        drop_path=0.0, output_dir="runs/linprobe",
    ),
    "segment": dict(model="upernet_beit_base_patch16_512", input_size=512, nb_classes=150, output_dir="runs/segment"),
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Recipes: the paper's settings (beit2_spec.md sections 1.4, 5, 6)
# --------------------------------------------------------------------------------------------
RECIPES: dict[str, dict[str, Any]] = {
    # VQ-KD base with the CLIP teacher: 8 x 64 images, 100 epochs (TOKENIZER.md)
    "vqkd_base_clip": dict(
        task="tokenizer", model="vqkd_encoder_base_decoder_3x768x12_clip", teacher="clip", batch_size=64,
        epochs=100, warmup_epochs=10, lr=2e-4, min_lr=1e-5, weight_decay=1e-4, opt_betas=[0.9, 0.99],
        clip_grad=0.0, min_crop_scale=0.08,
    ),
    "beitv2_base_300e": dict(
        task="pretrain", model="beit_base_patch16_224_8k_vocab_cls_pt", batch_size=128, epochs=300,
        warmup_epochs=10, lr=1.5e-3, min_lr=1e-5, weight_decay=0.05, opt_betas=[0.9, 0.98], clip_grad=3.0,
        drop_path=0.0, layer_scale_init_value=0.1, early_layers=9, head_layers=2,
    ),
    "beitv2_base_1600e": dict(
        task="pretrain", model="beit_base_patch16_224_8k_vocab_cls_pt", batch_size=128, epochs=1600,
        warmup_epochs=10, lr=1.5e-3, min_lr=1e-5, weight_decay=0.05, opt_betas=[0.9, 0.999], clip_grad=3.0,
        drop_path=0.1, layer_scale_init_value=0.1, early_layers=9, head_layers=2,
    ),
    "beitv2_large_300e": dict(
        task="pretrain", model="beit_large_patch16_224_8k_vocab_cls_pt", batch_size=32, epochs=300,
        warmup_epochs=10, lr=1.5e-3, min_lr=1e-5, weight_decay=0.05, opt_betas=[0.9, 0.98], clip_grad=3.0,
        drop_path=0.0, layer_scale_init_value=1e-5, early_layers=21, head_layers=2,
    ),
    "beitv2_large_1600e": dict(
        task="pretrain", model="beit_large_patch16_224_8k_vocab_cls_pt", batch_size=32, epochs=1600,
        warmup_epochs=10, lr=1.5e-3, min_lr=1e-5, weight_decay=0.05, opt_betas=[0.9, 0.999], clip_grad=3.0,
        drop_path=0.1, layer_scale_init_value=1e-5, early_layers=21, head_layers=2,
    ),
    # Fine-tuning from 1600-epoch pretraining: batch 1024, lr 5e-4, layer decay 0.6, drop path 0.2;
    # the warmup is not stated by the reference, MMPretrain uses 20 epochs.
    "finetune_base_1600e": dict(
        task="finetune", model="beit_base_patch16_224", batch_size=128, epochs=100, warmup_epochs=20, lr=5e-4,
        min_lr=1e-6, weight_decay=0.05, opt_betas=[0.9, 0.999], clip_grad=0.0, layer_decay=0.6, drop_path=0.2,
        mixup=0.8, cutmix=1.0, smoothing=0.1, reprob=0.25,
    ),
    "finetune_base_300e": dict(
        task="finetune", model="beit_base_patch16_224", batch_size=128, epochs=100, warmup_epochs=20, lr=5e-4,
        min_lr=1e-6, weight_decay=0.05, opt_betas=[0.9, 0.999], clip_grad=0.0, layer_decay=0.65, drop_path=0.1,
        mixup=0.8, cutmix=1.0, smoothing=0.1, reprob=0.25,
    ),
    "finetune_large_1600e": dict(
        task="finetune", model="beit_large_patch16_224", batch_size=128, epochs=50, warmup_epochs=5, lr=2e-4,
        min_lr=1e-6, weight_decay=0.05, opt_betas=[0.9, 0.999], clip_grad=0.0, layer_decay=0.8, drop_path=0.2,
        mixup=0.8, cutmix=1.0, smoothing=0.1, reprob=0.25,
    ),
    # Linear probing: the reference published no protocol (microsoft/unilm#1574), so this follows
    # MAE's: BatchNorm without affine before the head, 90 epochs with 10 of warmup, no weight
    # decay, no mixup/cutmix/erasing. MAE uses LARS, which torch lacks; AdamW stands in for it.
    "linprobe_base": dict(
        task="linprobe", model="beit_base_patch16_224", batch_size=1024, epochs=90, warmup_epochs=10, lr=4e-3,
        min_lr=0.0, weight_decay=0.0, opt_betas=[0.9, 0.999], clip_grad=0.0, mixup=0.0, cutmix=0.0,
        smoothing=0.0, reprob=0.0, linprobe_block=-1, linprobe_pool="mean",
    ),
    # ADE20K semantic segmentation with UperNet (beit2/semantic_segmentation configs, spec 6.3):
    # 160k iterations of 16 images (8 ranks x 2), AdamW, poly decay (power 1) after 1500 linear
    # warmup iterations, no clipping; evaluation every 13 epochs of ADE20K's 1263 steps (the
    # reference: every 16k iterations).
    "seg_ade20k_base": dict(
        task="segment", model="upernet_beit_base_patch16_512", input_size=512, nb_classes=150, batch_size=2,
        epochs=0, max_steps=160000, warmup_steps=1500, sched="poly", poly_power=1.0, lr=5e-5, min_lr=0.0,
        weight_decay=0.05, opt_betas=[0.9, 0.999], clip_grad=0.0, layer_decay=0.75, drop_path=0.15,
        layer_scale_init_value=0.1, eval_interval=13,
    ),
    "seg_ade20k_large": dict(
        task="segment", model="upernet_beit_large_patch16_512", input_size=512, nb_classes=150, batch_size=2,
        epochs=0, max_steps=160000, warmup_steps=1500, sched="poly", poly_power=1.0, lr=4e-5, min_lr=0.0,
        weight_decay=0.05, opt_betas=[0.9, 0.999], clip_grad=0.0, layer_decay=0.9, drop_path=0.2,
        layer_scale_init_value=1e-6, eval_interval=13,
    ),
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _parse_key_values(items: list[str], option: str) -> dict:
    parsed = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{option} expects key=value items; got {item!r}")
        key, value = item.split("=", 1)
        parsed[key] = yaml.safe_load(value)
    return parsed


def _bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false); got {value!r}")


# Other spellings of our flags: the official scripts' (microsoft/unilm beit2/) and timm's
# train.py's, for the settings both have. (Every ``--a-b`` flag is also accepted as ``--a_b``.)
ALIASES: dict[str, tuple[str, ...]] = {
    "data_dir": ("--data_path",),
    "eval_data_dir": ("--eval_data_path",),
    "grad_accum_steps": ("--update_freq",),
    "checkpoint_epochs": ("--save_ckpt_freq",),
    "batch_size": ("-b",),
    "num_workers": ("-j", "--workers"),
    "nb_classes": ("--num-classes", "--num_classes"),
    "input_size": ("--img-size", "--img_size"),
    "output_dir": ("--output",),
    "keep_checkpoints": ("--checkpoint-hist", "--checkpoint_hist"),
    "finetune": ("--initial-checkpoint", "--initial_checkpoint"),
    "codebook_size": ("--codebook_n_emd",),
    "codebook_dim": ("--codebook_emd_dim",),
    "teacher": ("--teacher_model_type",),
}
# Flags of the official scripts and timm that we do not support, with the reason; and those
# that only restate what we always do (accepted, with the value we use).
UNSUPPORTED: dict[str, str] = {
    "--drop": "dropout after the attention and MLP projections is not implemented (BEiT v2 uses none)",
    "--attn_drop_rate": "attention dropout is not implemented (BEiT v2 uses none)",
    "--attn-drop-rate": "attention dropout is not implemented (BEiT v2 uses none)",
    "--weight_decay_end": "the weight decay is constant (the official default: no weight-decay schedule)",
    "--color_jitter": "colour jitter is not applied (the official fine-tuning ignores it under RandAugment)",
    "--color-jitter": "colour jitter is not applied (the official fine-tuning ignores it under RandAugment)",
    "--eval": "evaluation alone is its own command: beitv2 eval --weights FILE --data-dir DIR",
    "--channels-last": "the channels-last memory format does not apply to a ViT",
    "--aa": "the fine-tuning RandAugment is fixed at the official rand-m9-mstd0.5-inc1",
    "--model_ema_force_cpu": "the EMA of the weights stays on the device, sharded as they are",
    "--enable_deepspeed": "DeepSpeed is not used: FSDP2 or DDP",
    "--crop-pct": "the evaluation crop is the official 224/256 rule; beitv2 eval has --crop-pct",
    "--crop_pct": "the evaluation crop is the official 224/256 rule; beitv2 eval has --crop-pct",
}
ALWAYS_ON = {
    "--imagenet_default_mean_and_std": "the ImageNet mean and std are always used",
    "--dist_eval": "evaluation is always split over the ranks",
    "--pin_mem": "batches are always pinned on GPUs",
}
ONLY_VALUE = {"--opt": ("adamw", "AdamW is the only optimizer")}


class _Unsupported(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        if values is not None and _is_zero(values):
            return  # off, as we always are
        parser.error(f"{option_string} is not supported by beitv2-fast: {UNSUPPORTED[option_string]}")


def _is_zero(value: str) -> bool:
    try:
        return float(value) == 0
    except ValueError:
        return False


class _OnlyValue(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        allowed, reason = ONLY_VALUE[option_string]
        if values.lower() != allowed:
            parser.error(f"{option_string} {values}: not supported, {reason} ({option_string} {allowed})")


def task_fields(task: str | None) -> list[dataclasses.Field]:
    """The fields a command uses (its flags), in declaration order."""
    return [
        f
        for f in dataclasses.fields(TrainConfig)
        if task is None or f.metadata["tasks"] is None or task in f.metadata["tasks"]
    ]


def task_default(task: str | None, f: dataclasses.Field) -> Any:
    if task is not None and f.name in TASK_DEFAULTS[task]:
        return TASK_DEFAULTS[task][f.name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def build_parser(prog: str = "beitv2", task: str | None = None) -> argparse.ArgumentParser:
    """The flags of one command (``task``; None: every field), plus ``--recipe`` and ``--config``.

    Flags default to ``None`` so that only what the user typed overrides the recipe and file.
    """
    description = f"Train: {task} (defaults of the official script; a recipe sets the paper's values)" if task else None
    parser = ArgumentParser(prog=prog, allow_abbrev=False, argument_default=None, description=description)
    recipes = sorted(name for name, recipe in RECIPES.items() if task is None or recipe["task"] == task)
    parser.add_argument("--recipe", choices=recipes, help="named settings from the paper")
    parser.add_argument("-c", "--config", help="YAML file of field: value overrides (applied after the recipe)")
    hints = typing.get_type_hints(TrainConfig)
    for f in task_fields(task):
        flags = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name:
            flags.append(f"--{f.name}")  # the reference's spelling
        flags += [alias for alias in ALIASES.get(f.name, ()) if alias not in flags]
        kind = hints[f.name]
        default = task_default(task, f)
        help_text = f.metadata["help"] if default is None else f"{f.metadata['help']} (default: {default})"
        if f.name == "task":
            help_text = argparse.SUPPRESS  # the command says it
        if kind is bool:
            parser.add_argument(*flags, dest=f.name, type=_bool, nargs="?", const=True, metavar="BOOL", help=help_text)
        elif kind in (list, dict):
            parser.add_argument(*flags, dest=f.name, nargs="+", metavar="VALUE", help=help_text)
        else:
            scalar = (
                _optional_number(kind)
                if kind in (int | None, float | None)
                else {int: int, float: float}.get(kind, str)
            )
            choices = typing.get_args(kind) if typing.get_origin(kind) is Literal else None
            parser.add_argument(*flags, dest=f.name, type=scalar, choices=choices, help=help_text)
    taken = set(parser._option_string_actions)
    for flag in UNSUPPORTED:
        if flag not in taken:
            parser.add_argument(flag, nargs="?", action=_Unsupported, help=argparse.SUPPRESS)
    for flag in ALWAYS_ON:
        if flag not in taken:
            parser.add_argument(flag, nargs=0, action=_Ignored, help=argparse.SUPPRESS)
    for flag in ONLY_VALUE:
        if flag not in taken:
            parser.add_argument(flag, action=_OnlyValue, help=argparse.SUPPRESS)
    return parser


class _Ignored(argparse.Action):
    """A flag of the official scripts that states what we always do."""

    def __call__(self, parser, namespace, values, option_string=None):
        pass


def _has_field_type(name: str, value: Any) -> bool:
    """Whether a value read from a YAML file fits the field (ints are accepted for floats)."""
    kind = typing.get_type_hints(TrainConfig)[name]
    if kind is bool:
        return isinstance(value, bool)
    if kind is int or kind == int | None:
        return (isinstance(value, int) and not isinstance(value, bool)) or (kind is not int and value is None)
    if kind == float | None and value is None:
        return True
    if kind is float or kind == float | None:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind in (list, dict):
        return isinstance(value, kind)
    return isinstance(value, str)


def _optional_number(kind) -> Callable[[str], Any]:
    """The parser of an ``int | None`` or ``float | None`` flag (``none`` gives None)."""
    number = int if kind == int | None else float

    def parse(value: str):
        return None if value.lower() in ("none", "") else number(value)

    parse.__name__ = number.__name__  # argparse names it in "invalid int value"
    return parse


def config_from_args(argv: list[str] | None = None, *, task: str | None = None, prog: str = "beitv2") -> TrainConfig:
    """Parse flags into a validated :class:`TrainConfig`: the command's defaults, then the recipe,
    then the YAML file, then flags."""
    parser = build_parser(prog, task)
    args = parser.parse_args(argv)
    values: dict[str, Any] = dict(TASK_DEFAULTS[task]) if task is not None else {}
    if args.recipe:
        values.update(RECIPES[args.recipe])
    if args.config:
        try:
            with open(args.config) as f:
                from_file = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as exc:
            parser.error(f"--config {args.config}: {exc}")
        if not isinstance(from_file, dict):
            parser.error(f"--config {args.config}: expected field: value pairs")
        unknown = set(from_file) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            parser.error(f"unknown option(s) in {args.config}: {', '.join(sorted(unknown))}")
        for name, value in from_file.items():
            if not _has_field_type(name, value):
                parser.error(f"{name} in {args.config}: {value!r} is not a {typing.get_type_hints(TrainConfig)[name]}")
        values.update(from_file)
    for f in task_fields(task):
        given = getattr(args, f.name)
        if given is None:
            continue
        if f.name in ("model_kwargs", "tokenizer_kwargs"):
            try:
                given = _parse_key_values(given, f"--{f.name.replace('_', '-')}")
            except ValueError as exc:
                parser.error(str(exc))
        elif f.name == "opt_betas":
            try:
                given = [float(v) for v in given]
            except ValueError:
                parser.error(f"--opt-betas expects two numbers; got {' '.join(given)}")
        values[f.name] = given
    if task is not None:
        if values.get("task", task) != task:
            parser.error(f"--task {values['task']} contradicts the command, which trains {task}")
        values["task"] = task
    config = TrainConfig(**values)
    try:
        config.validate()
    except ConfigError as exc:
        parser.error(str(exc))
    return config


def save_config(config: TrainConfig, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(dataclasses.asdict(config), f, sort_keys=False)
