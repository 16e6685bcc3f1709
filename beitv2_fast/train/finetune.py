"""Fine-tuning and linear probing: classification with top-1/top-5 evaluation
(microsoft/unilm ``run_class_finetuning.py``; the probe follows MAE, see ``LinearProbe``)."""

from __future__ import annotations

import argparse
import json
import logging
import os

import torch
import torch.nn.functional as F

from ..data import EvalTransform, FinetuneTransform, MixupCutmix, build_loader
from ..models import LinearProbe, get_parameter_groups, load_for_finetuning
from .config import ArgumentParser, ConfigError, TrainConfig
from .distributed import Distributed, all_reduce
from .inputs import check_batch_fits, create_checked_model, open_image_dataset, validation_folder
from .loop import AMP_DTYPES, TrainData, TrainingTask
from .metrics import vit_forward_flops

log = logging.getLogger("beitv2_fast")


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Soft-target cross-entropy for mixed batches ([B, K] targets, smoothing already folded in),
    label-smoothed cross-entropy otherwise."""
    if targets.dim() == 2:
        return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)


def build_classifier(config: TrainConfig) -> torch.nn.Module:
    """The fine-tuning model, or a linear probe on a frozen backbone, with the pretrained weights."""
    linprobe = config.task == "linprobe"
    settings = dict(
        img_size=config.input_size, num_classes=0 if linprobe else config.nb_classes,
        drop_path_rate=0.0 if linprobe else config.drop_path, use_mean_pooling=not config.use_cls,
        **config.layer_scale_kwargs(),
    )  # fmt: skip
    model = create_checked_model(config.model, settings, {**inherited_settings(config.finetune), **config.model_kwargs})
    if config.finetune:
        load_for_finetuning(
            model, config.finetune, model_key=config.model_key, model_prefix=config.model_prefix,
            model_filter_name=config.model_filter_name,
        )  # fmt: skip
    if linprobe:
        model = LinearProbe(model, config.nb_classes, block=config.linprobe_block, pool=config.linprobe_pool)
    return model


def build_finetune_task(config: TrainConfig, world: Distributed) -> TrainingTask:
    config.validate()
    model = build_classifier(config)
    dataset = open_image_dataset("--data-dir", config.data_dir, "train", need_classes=True)
    check_batch_fits(config.batch_size, dataset, world.world_size)
    if dataset.num_classes != config.nb_classes:
        raise ConfigError(
            f"--nb-classes {config.nb_classes} differs from the {dataset.num_classes} classes in --data-dir "
            f"{config.data_dir}; pass --nb-classes {dataset.num_classes}"
        )
    on_gpu = world.device.type == "cuda"
    if config.task == "linprobe":
        transform = FinetuneTransform(
            config.input_size, auto_augment=None, reprob=0.0, interpolation=config.train_interpolation,
            uint8_output=on_gpu,
        )  # fmt: skip
    else:
        transform = FinetuneTransform(
            config.input_size, reprob=config.reprob, interpolation=config.train_interpolation, uint8_output=on_gpu
        )
    mixup = None
    if config.task == "finetune" and (config.mixup > 0 or config.cutmix > 0):  # a probe never mixes
        mixup = MixupCutmix(
            config.nb_classes, mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.smoothing
        )
    loader = build_loader(
        "classification", dataset, batch_size=config.batch_size, transform=transform, mixup=mixup, seed=config.seed,
        num_workers=config.num_workers, device=world.device,
    )  # fmt: skip
    eval_dir = validation_folder(config.data_dir, config.eval_data_dir)
    evaluate = None
    if eval_dir is not None:
        option = "--eval-data-dir" if config.eval_data_dir else "--data-dir (its val/ folder)"
        eval_dataset = open_image_dataset(option, eval_dir, "val", need_classes=True)
        if eval_dataset.num_classes != config.nb_classes:
            raise ConfigError(
                f"{option} {eval_dir}: {eval_dataset.num_classes} classes, the training data {config.nb_classes}"
            )
        eval_loader = build_loader(
            "classification", eval_dataset, batch_size=config.batch_size, transform=EvalTransform(config.input_size),
            seed=config.seed, shuffle=False, drop_last=False, num_workers=config.num_workers, device=world.device,
        )  # fmt: skip

        def evaluate(model, step) -> dict[str, float]:
            return evaluate_classifier(model, eval_loader, world)

    def loss(model, batch):
        images, targets = batch
        value = classification_loss(model(images), targets, config.smoothing)
        return value, {}

    backbone = model.backbone if config.task == "linprobe" else model
    forward = vit_forward_flops(backbone.patch_embed.num_patches + 1, backbone.embed_dim, len(backbone.blocks))
    layer_decay = config.layer_decay if config.task == "finetune" and config.layer_decay < 1 else None
    return TrainingTask(
        model=model, loss=loss,
        param_groups=lambda m: get_parameter_groups(m, config.weight_decay, layer_decay),
        data=TrainData.from_loader(loader), images_per_batch=config.batch_size,
        flops_per_image=forward if config.task == "linprobe" else 3 * forward, evaluate=evaluate,
        best_metric="acc1", model_ema_decay=config.model_ema_decay if config.model_ema else None,
        model_settings={} if config.task == "linprobe" else dict(
            img_size=config.input_size, num_classes=config.nb_classes, use_mean_pooling=not config.use_cls,
            **config.layer_scale_kwargs(),
        ),
    )  # fmt: skip


# Constructor settings of our exports that fine-tuning sets itself, or that only pretraining has.
OWN_SETTINGS = frozenset(
    ("img_size", "num_classes", "use_mean_pooling", "init_values", "drop_path_rate", "vocab_size", "early_layers",
     "head_layers", "shared_lm_head")
)  # fmt: skip


def inherited_settings(weights: str) -> dict:
    """The architecture settings (``depth=...``) that a pretraining or fine-tuning export of ours
    was built with, so that ``--finetune`` needs them not retyped (``--model-kwargs`` wins). A
    different architecture still fails to load, naming what differs."""
    saved = safetensors_model(weights) if os.path.isfile(weights) else {}
    if saved.get("task") not in ("pretrain", "finetune"):
        return {}
    inherited = {key: value for key, value in saved["model_kwargs"].items() if key not in OWN_SETTINGS}
    if inherited:
        log.info("--finetune %s: model settings from its metadata: %s", weights, inherited)
    return inherited


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, loader, world: Distributed) -> dict[str, float]:
    """Top-1, top-5 (percent) and cross-entropy of ``model`` over ``loader`` (each rank its share,
    summed over the ranks), as the official ``engine_for_finetuning.evaluate``."""
    sums = torch.zeros(4, device=world.device, dtype=torch.float64)  # correct@1, correct@5, loss sum, images
    loader.set_epoch(0)
    for images, labels in loader:
        logits = model(images).float()
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top5 == labels[:, None]
        loss = F.cross_entropy(logits, labels, reduction="sum")
        sums += torch.stack(
            [hits[:, 0].sum(), hits.any(-1).sum(), loss, torch.tensor(labels.numel(), device=hits.device)]
        ).double()
    correct1, correct5, loss_sum, count = all_reduce(sums).tolist()
    return {"acc1": 100 * correct1 / count, "acc5": 100 * correct5 / count, "loss": loss_sum / count}


# ------------------------------------------------------------------------------------------------
# beitv2 eval (classification)
# ------------------------------------------------------------------------------------------------
def eval_parser(prog: str = "beitv2 eval") -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=prog, allow_abbrev=False,
        description="Top-1, top-5 and loss of a classifier on an image folder (--task segment: segmentation).",
    )  # fmt: skip
    parser.add_argument("--task", choices=["classify", "segment"], default="classify", help="what to evaluate")
    parser.add_argument(
        "--weights", "--checkpoint", required=True,
        help="model.safetensors of a finetune run, or an official or timm fine-tuned checkpoint",
    )  # fmt: skip
    parser.add_argument("--data-dir", "--data_path", required=True, help="ImageNet-layout folder (its val/ if any)")
    parser.add_argument(
        "--model", help="model name (default: the one in the file's metadata, else beit_base_patch16_224)"
    )
    parser.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--input-size", type=int, help="image size (default: the file's, else 224)")
    parser.add_argument("--crop-pct", type=float, help="centre-crop fraction (default: the official 224/256 rule)")
    parser.add_argument("-b", "--batch-size", type=int, default=64, help="images per rank per batch")
    parser.add_argument("-j", "--num-workers", type=int, default=4)
    parser.add_argument("--amp-dtype", choices=sorted(AMP_DTYPES), default="float32", help="autocast of the forwards")
    parser.add_argument("--output-dir", default="runs/eval", help="writes eval.json")
    return parser


def evaluate_command(argv: list[str]) -> int:
    """``beitv2 eval``: a classifier's top-1/top-5/loss, one process or ``torchrun`` ranks."""
    parser = eval_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.num_workers < 0 or (args.input_size is not None and args.input_size < 1):
        parser.error("--batch-size and --input-size must be at least 1, --num-workers cannot be negative")
    if not os.path.isfile(args.weights):
        parser.error(f"--weights {args.weights}: no such file")
    from ..models import load_checkpoint, load_state_dict_file
    from .config import _parse_key_values, check_output_dir
    from .distributed import process_group
    from .loop import resolve_amp_dtype
    from .metrics import setup_logging

    try:
        extra = _parse_key_values(args.model_kwargs, "--model-kwargs")
    except ValueError as exc:
        parser.error(str(exc))
    check_output_dir(args.output_dir)
    saved = safetensors_model(args.weights)
    name = args.model or saved.get("model") or "beit_base_patch16_224"
    settings = saved.get("model_kwargs", {}) if name == saved.get("model") else {}
    input_size = args.input_size or settings.get("img_size", 224)
    state_dict = load_state_dict_file(args.weights)  # a bad file fails before the data is read
    with process_group() as world:
        setup_logging(world)
        dataset = open_image_dataset("--data-dir", args.data_dir, "val", need_classes=True)
        settings = {**settings, "img_size": input_size, "num_classes": dataset.num_classes}
        model = create_checked_model(name, settings, extra)
        load_checkpoint(model, state_dict, strict=True)
        loader = build_loader(
            "classification", dataset, batch_size=args.batch_size, seed=0, shuffle=False, drop_last=False,
            transform=EvalTransform(input_size, crop_pct=args.crop_pct), num_workers=args.num_workers,
            device=world.device,
        )  # fmt: skip
        amp_dtype = resolve_amp_dtype(args.amp_dtype, world.device)
        model = model.to(world.device).eval()
        with torch.autocast(world.device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            results = evaluate_classifier(model, loader, world)
        if world.is_main:
            print(f"{args.weights}: acc1 {results['acc1']:.3f}  acc5 {results['acc5']:.3f}  loss {results['loss']:.4f}")
            with open(os.path.join(args.output_dir, "eval.json"), "w") as f:
                json.dump({"weights": args.weights, "model": name, "images": len(dataset), **results}, f, indent=1)
    return 0


def safetensors_model(path: str) -> dict:
    """The task, model name and constructor settings in the metadata of one of our exports ({} otherwise)."""
    if not path.endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        metadata = f.metadata() or {}
    if "beitv2_fast.model" not in metadata:
        return {}
    return {
        "task": metadata.get("beitv2_fast.task"), "model": metadata["beitv2_fast.model"],
        "model_kwargs": json.loads(metadata["beitv2_fast.model_kwargs"]),
    }  # fmt: skip
