"""Fine-tuning and linear probing: classification with top-1/top-5 evaluation
(microsoft/unilm ``run_class_finetuning.py``; the probe follows MAE, see ``LinearProbe``)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..data import EvalTransform, FinetuneTransform, MixupCutmix, build_dataset, build_loader
from ..models import LinearProbe, create_model, get_parameter_groups, load_for_finetuning
from .config import ConfigError, TrainConfig
from .distributed import Distributed, all_reduce
from .loop import Task, TrainData
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
    model = create_model(
        config.model, img_size=config.input_size, num_classes=0 if linprobe else config.nb_classes,
        drop_path_rate=0.0 if linprobe else config.drop_path, use_mean_pooling=not config.use_cls,
        init_values=config.layer_scale_init_value or None, **config.model_kwargs,
    )  # fmt: skip
    if config.finetune:
        load_for_finetuning(
            model, config.finetune, model_key=config.model_key, model_prefix=config.model_prefix,
            model_filter_name=config.model_filter_name,
        )  # fmt: skip
    if linprobe:
        model = LinearProbe(model, config.nb_classes, block=config.linprobe_block, pool=config.linprobe_pool)
    return model


def build_finetune_task(config: TrainConfig, world: Distributed) -> Task:
    config.validate()
    model = build_classifier(config)
    dataset = build_dataset(config.data_dir or "demo", "train")
    config_classes = getattr(dataset, "num_classes", config.nb_classes)
    if config_classes != config.nb_classes:
        raise ConfigError(f"--nb-classes {config.nb_classes} differs from the {config_classes} classes in the data")
    on_gpu = world.device.type == "cuda"
    if config.task == "linprobe":
        transform = FinetuneTransform(config.input_size, auto_augment=None, reprob=0.0, uint8_output=on_gpu)
    else:
        transform = FinetuneTransform(config.input_size, reprob=config.reprob, uint8_output=on_gpu)
    mixup = None
    if config.mixup > 0 or config.cutmix > 0:
        mixup = MixupCutmix(
            config.nb_classes, mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.smoothing
        )
    loader = build_loader(
        "classification", dataset, batch_size=config.batch_size, transform=transform, mixup=mixup, seed=config.seed,
        num_workers=config.num_workers, device=world.device,
    )  # fmt: skip
    eval_dataset = build_dataset(config.eval_data_dir or config.data_dir or "demo", "val")
    eval_loader = build_loader(
        "classification", eval_dataset, batch_size=config.batch_size, transform=EvalTransform(config.input_size),
        seed=config.seed, shuffle=False, drop_last=False, num_workers=config.num_workers, device=world.device,
    )  # fmt: skip

    def loss(model, batch):
        images, targets = batch
        value = classification_loss(model(images), targets, config.smoothing)
        return value, {}

    @torch.no_grad()
    def evaluate(model, step) -> dict[str, float]:
        sums = torch.zeros(3, device=world.device)  # correct@1, correct@5, images
        eval_loader.set_epoch(0)
        for images, labels in eval_loader:
            top5 = model(images).topk(min(5, config.nb_classes), dim=-1).indices
            hits = top5 == labels[:, None]
            sums += torch.stack(
                [hits[:, 0].sum(), hits.any(-1).sum(), torch.tensor(labels.numel(), device=hits.device)]
            )
        correct1, correct5, count = all_reduce(sums).tolist()
        return {"acc1": 100 * correct1 / count, "acc5": 100 * correct5 / count}

    backbone = model.backbone if config.task == "linprobe" else model
    forward = vit_forward_flops(backbone.patch_embed.num_patches + 1, backbone.embed_dim, len(backbone.blocks))
    layer_decay = config.layer_decay if config.task == "finetune" and config.layer_decay < 1 else None
    return Task(
        model=model, loss=loss,
        param_groups=lambda m: get_parameter_groups(m, config.weight_decay, layer_decay),
        data=TrainData.from_loader(loader), images_per_batch=config.batch_size,
        flops_per_image=forward if config.task == "linprobe" else 3 * forward, evaluate=evaluate,
    )  # fmt: skip
