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
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

Task = Literal["tokenizer", "pretrain", "finetune", "linprobe", "segment"]


class ConfigError(ValueError):
    """An option with an impossible value (the message names the option); the CLI prints it as
    one line and exits with status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but an error is one line (the option and what is wrong), not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _f(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field whose help text is also the CLI help."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """Everything a run needs; every field is a flag of the same name (``_`` -> ``-``)."""

    # -- what to train ----------------------------------------------------------------------
    task: Task = _f("pretrain", "tokenizer | pretrain | finetune | linprobe | segment")
    model: str = _f("beit_base_patch16_224_8k_vocab_cls_pt", "model name (beitv2_fast.models.create_model)")
    model_kwargs: dict = _f({}, "extra model constructor arguments, as key=value (e.g. depth=4 embed_dim=192)")
    input_size: int = _f(224, "image size of the model's input")
    drop_path: float = _f(0.0, "stochastic depth rate")
    layer_scale_init_value: float = _f(0.1, "layer scale init (0.1 base, 1e-5 large); 0 disables layer scale")
    # -- BEiT v2 pretraining ----------------------------------------------------------------
    tokenizer_model: str = _f("vqkd_encoder_base_decoder_3x768x12_clip", "VQ-KD tokenizer for the MIM targets")
    tokenizer_weight: str = _f("", "local path of the tokenizer checkpoint (never downloaded)")
    tokenizer_kwargs: dict = _f({}, "extra tokenizer constructor arguments, as key=value")
    codebook_size: int = _f(8192, "number of visual tokens")
    codebook_dim: int = _f(32, "dimension of a code")
    second_input_size: int = _f(224, "image size of the tokenizer view")
    num_mask_patches: int = _f(75, "masked patches per image")
    min_mask_patches_per_block: int = _f(16, "smallest masked block")
    max_mask_patches_per_block: int | None = _f(None, "largest masked block (default: num_mask_patches)")
    min_crop_scale: float = _f(0.2, "RandomResizedCrop's smallest area fraction")
    early_layers: int = _f(9, "block whose patch tokens feed the patch aggregation head")
    head_layers: int = _f(2, "blocks of the patch aggregation head")
    shared_lm_head: bool = _f(True, "share the final norm and LM head between both branches")
    # -- VQ-KD tokenizer training -----------------------------------------------------------
    teacher: str = _f("clip", "clip | dino | hog (weight-free, for offline runs)")
    teacher_weight: str = _f("", "local path of the teacher checkpoint (CLIP or DINO)")
    quantize_kmeans_init: bool = _f(True, "k-means initialisation of the codebook on the first batch")
    ema_decay: float = _f(0.99, "codebook EMA decay")
    # -- fine-tuning / linear probing -------------------------------------------------------
    finetune: str = _f("", "pretrained checkpoint to start from (official, ours, timm or MMPretrain layout)")
    model_key: str = _f("model|module", "--finetune: the first of these keys present holds the weights (|-separated)")
    model_prefix: str = _f("", "--finetune: use only the keys under this prefix, without it (e.g. module.)")
    model_filter_name: str = _f("", "--finetune: use only this submodule's keys (encoder: a VQ-KD tokenizer's encoder)")
    nb_classes: int = _f(1000, "number of classes")
    layer_decay: float = _f(1.0, "layer-wise lr decay (0.6-0.65 base, 0.8 large); 1 disables it")
    use_cls: bool = _f(False, "classify from the CLS token instead of mean pooling")
    mixup: float = _f(0.8, "mixup alpha; 0 disables")
    cutmix: float = _f(1.0, "cutmix alpha; 0 disables")
    smoothing: float = _f(0.1, "label smoothing")
    reprob: float = _f(0.25, "random erasing probability")
    linprobe_block: int = _f(-1, "linear probe: block whose output is probed (-1: the last)")
    linprobe_pool: str = _f("mean", "linear probe pooling: mean | cls")
    # -- data -------------------------------------------------------------------------------
    data_dir: str = _f(
        "",
        "image folder (ImageNet layout, or flat for pretraining; ADE20K or images/ + annotations/ "
        "for segmentation); empty: the built-in demo images (segmentation: synthetic scenes)",
    )
    eval_data_dir: str = _f("", "validation folder for fine-tuning and linear probing")
    num_workers: int = _f(
        -1, "data loader worker processes per rank; -1: the cores available per local rank, less one (logged)"
    )
    fast_decode: bool = _f(
        False,
        "pretraining: decode each JPEG at the smallest DCT scale that leaves the crop at least as large as the "
        "views (the same crops and masks; pixels within resampling noise, see the README)",
    )
    data_backend: str = _f(
        "pil", "pil | gpu (batched JPEG decoding by torchvision on the GPU) | dali (when nvidia-dali is installed)"
    )
    # -- optimisation -----------------------------------------------------------------------
    batch_size: int = _f(128, "images per rank per step")
    grad_accum_steps: int = _f(1, "micro-batches per optimizer step")
    epochs: int = _f(300, "training epochs")
    max_steps: int = _f(0, "stop after this many optimizer steps (0: run all epochs)")
    warmup_epochs: float = _f(10, "linear warmup from 0")
    warmup_steps: int = _f(0, "linear warmup in optimizer steps; overrides --warmup-epochs when positive")
    sched: str = _f("cosine", "cosine | poly: the learning-rate schedule after the warmup")
    poly_power: float = _f(1.0, "exponent of the poly schedule (mmcv's PolyLrUpdaterHook)")
    lr: float = _f(1.5e-3, "peak learning rate (absolute; not rescaled by batch size)")
    min_lr: float = _f(1e-5, "final learning rate of the schedule")
    weight_decay: float = _f(0.05, "AdamW weight decay (none on biases, norms, tokens, position tables, gammas)")
    opt_betas: list = _f([0.9, 0.98], "AdamW betas")
    opt_eps: float = _f(1e-8, "AdamW eps")
    clip_grad: float = _f(3.0, "global gradient-norm clip; 0 disables")
    # -- systems ----------------------------------------------------------------------------
    amp_dtype: str = _f("bfloat16", "bfloat16 | float16 (with a gradient scaler) | float32")
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
    checkpoint_interval: int = _f(1000, "optimizer steps between checkpoints (the last step is always saved)")
    keep_checkpoints: int = _f(2, "complete checkpoints kept (at least 2: the newest may be in flight)")
    log_interval: int = _f(10, "optimizer steps between log lines")
    log_wandb: bool = _f(False, "also log to Weights & Biases (needs wandb)")
    eval_interval: int = _f(1, "epochs between evaluations (fine-tuning, linear probing, segmentation)")

    def validate(self) -> None:
        """Reject impossible values before any work starts, naming the option (:class:`ConfigError`)."""
        checks = [
            (self.task in typing.get_args(Task), "--task must be tokenizer, pretrain, finetune, linprobe or segment"),
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
            (0 <= self.reprob <= 1, "--reprob must lie in [0, 1]"),
            (self.mixup >= 0 and self.cutmix >= 0, "--mixup and --cutmix cannot be negative"),
            (self.amp_dtype in ("bfloat16", "float16", "float32"), "--amp-dtype must be bfloat16, float16 or float32"),
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

    def _validate_task(self) -> None:
        if self.task == "pretrain":
            if not self.tokenizer_weight:
                raise ConfigError(
                    "--tokenizer-weight is required: a local VQ-KD checkpoint (official vqkd_*.pth, or "
                    "model.safetensors from `beitv2 train-tokenizer`); a random tokenizer gives meaningless targets"
                )
            patch = self.model_kwargs.get("patch_size") or _patch_size_in_name(self.model)
            if patch:
                if self.input_size % patch:
                    raise ConfigError(f"--input-size {self.input_size} is not a multiple of the patch size {patch}")
                patches = (self.input_size // patch) ** 2
                if self.num_mask_patches > patches:
                    raise ConfigError(
                        f"--num-mask-patches {self.num_mask_patches} exceeds the {patches} patches of a "
                        f"{self.input_size}px image with {patch}px patches"
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
            if path and path not in ("demo", "synthetic") and not os.path.isdir(path):
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


def build_parser(prog: str = "beitv2") -> argparse.ArgumentParser:
    """A parser with one flag per :class:`TrainConfig` field, plus ``--recipe`` and ``--config``.

    Flags default to ``None`` so that only what the user typed overrides the recipe and file.
    """
    parser = ArgumentParser(prog=prog, allow_abbrev=False, argument_default=None)
    parser.add_argument("--recipe", choices=sorted(RECIPES), help="named settings from the paper")
    parser.add_argument("-c", "--config", help="YAML file of field: value overrides (applied after the recipe)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flags = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name:
            flags.append(f"--{f.name}")  # the reference's spelling
        kind = hints[f.name]
        help_text = f"{f.metadata['help']} (default: {f.default if f.default is not dataclasses.MISSING else f.default_factory()})"
        if kind is bool:
            parser.add_argument(*flags, dest=f.name, type=_bool, nargs="?", const=True, metavar="BOOL", help=help_text)
        elif kind in (list, dict):
            parser.add_argument(*flags, dest=f.name, nargs="+", metavar="VALUE", help=help_text)
        else:
            scalar = {int: int, float: float, str: str}.get(kind, _optional_int if kind == int | None else str)
            choices = typing.get_args(kind) if typing.get_origin(kind) is Literal else None
            parser.add_argument(*flags, dest=f.name, type=scalar, choices=choices, help=help_text)
    return parser


def _has_field_type(name: str, value: Any) -> bool:
    """Whether a value read from a YAML file fits the field (ints are accepted for floats)."""
    kind = typing.get_type_hints(TrainConfig)[name]
    if kind is bool:
        return isinstance(value, bool)
    if kind is int or kind == int | None:
        return (isinstance(value, int) and not isinstance(value, bool)) or (kind is not int and value is None)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind in (list, dict):
        return isinstance(value, kind)
    return isinstance(value, str)


def _optional_int(value: str) -> int | None:
    return None if value.lower() in ("none", "") else int(value)


def config_from_args(argv: list[str] | None = None, *, task: str | None = None, prog: str = "beitv2") -> TrainConfig:
    """Parse flags into a validated :class:`TrainConfig`: recipe, then YAML file, then flags."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
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
    for f in dataclasses.fields(TrainConfig):
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
