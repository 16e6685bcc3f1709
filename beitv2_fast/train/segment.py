"""Semantic segmentation: the ``segment`` training task and the evaluation (``beitv2 eval --task segment``).

Training follows microsoft/unilm ``beit2/semantic_segmentation`` (spec section 6.3): UperNet on
the BEiT backbone initialised from a pretraining or classification checkpoint, AdamW with
layer-wise lr decay, poly schedule with linear warmup, SyncBN across GPUs (BatchNorm per rank on
CPUs: gloo has no SyncBN).

Evaluation is mmsegmentation's: each image is resized (2048x512 keeping the aspect ratio, or
several ratios), run whole or in sliding 512x512 windows 341 apart (optionally flipped), the
probabilities are brought back to the original size and averaged, and the argmax is compared
with the label map. Intersections, unions, predicted and labelled areas per class are summed
over the whole set (and over the ranks); IoU and accuracy per class follow, mIoU and mAcc are
their means over the classes where they are defined (a class absent from both prediction and
ground truth has no IoU; one absent from the ground truth has no accuracy), aAcc is the labelled
pixels' accuracy.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from ..data import SegmentationTestTransform, SegmentationTrainTransform, build_loader, build_segmentation_dataset
from ..data.loader import workers_per_rank
from ..data.segmentation import IGNORE_INDEX
from ..models import create_model, get_parameter_groups, list_models, load_state_dict_file
from ..models.segmentation import (
    BEiTUperNet,
    WindowSizeError,
    convert_sync_batchnorm,
    fixed_size_forward,
    load_segmentation_checkpoint,
    predict_probabilities,
    segmentation_loss,
)
from .config import ArgumentParser, ConfigError, TrainConfig
from .distributed import Distributed, all_reduce, unwrap
from .loop import AMP_DTYPES, Task, TrainData
from .metrics import vit_forward_flops

log = logging.getLogger("beitv2_fast")
PICTURE_IMAGES = 4  # validation images drawn with their predictions


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------
class SegmentationMetrics:
    """mmsegmentation's ``mean_iou`` / ``eval_metrics``: per-class areas accumulated over a data set.

    Args:
        num_classes: classes ``0..num_classes-1``.
        ignore_index: label of unlabelled pixels (excluded, whatever the prediction).
        device: where the sums live (the evaluation's device, for the all-reduce).
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # intersection, union, predicted area, labelled area; int64 counts are exact.
        self.areas = torch.zeros(4, num_classes, dtype=torch.int64, device=device)

    def update(self, prediction: torch.Tensor, label: torch.Tensor) -> None:
        """Add one image (or a batch): class ids of the same shape."""
        if prediction.shape != label.shape:
            raise ValueError(
                f"SegmentationMetrics: prediction {tuple(prediction.shape)} and label {tuple(label.shape)} differ"
            )
        labelled = label != self.ignore_index
        prediction, label = prediction[labelled].long(), label[labelled].long()
        if label.numel() and (int(label.min()) < 0 or int(label.max()) >= self.num_classes):
            raise ValueError(
                f"SegmentationMetrics: labels must lie in 0..{self.num_classes - 1} or be {self.ignore_index}; got "
                f"{int(label.min())}..{int(label.max())}"
            )
        if prediction.numel() and (int(prediction.min()) < 0 or int(prediction.max()) >= self.num_classes):
            raise ValueError(f"SegmentationMetrics: predictions must lie in 0..{self.num_classes - 1}")
        counts = [
            torch.bincount(ids, minlength=self.num_classes)
            for ids in (prediction[prediction == label], prediction, label)
        ]
        intersection, predicted, labelled_area = (c.to(self.areas.device) for c in counts)
        self.areas += torch.stack([intersection, predicted + labelled_area - intersection, predicted, labelled_area])

    def all_reduce(self) -> SegmentationMetrics:
        """Sum the areas over the ranks (in place); returns self."""
        all_reduce(self.areas)
        return self

    def per_class(self) -> dict[str, np.ndarray]:
        """``iou`` and ``acc`` per class (NaN where undefined), and the four areas."""
        intersection, union, predicted, labelled = self.areas.double().cpu().numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = intersection / union
            acc = intersection / labelled
        iou[union == 0] = np.nan
        acc[labelled == 0] = np.nan
        return {"iou": iou, "acc": acc, "intersection": intersection, "union": union,
                "predicted": predicted, "labelled": labelled}  # fmt: skip

    def summary(self) -> dict[str, float]:
        """``mIoU``, ``mAcc`` and ``aAcc`` in percent (NaN when nothing was labelled)."""
        per_class = self.per_class()
        total = per_class["labelled"].sum()
        with np.errstate(invalid="ignore"):
            all_acc = per_class["intersection"].sum() / total if total else float("nan")
        defined_iou, defined_acc = (
            per_class["iou"][~np.isnan(per_class["iou"])],
            per_class["acc"][~np.isnan(per_class["acc"])],
        )
        return {
            "mIoU": 100.0 * float(defined_iou.mean()) if defined_iou.size else float("nan"),
            "mAcc": 100.0 * float(defined_acc.mean()) if defined_acc.size else float("nan"),
            "aAcc": 100.0 * float(all_acc),
        }

    def table(self, class_names: Sequence[str] | None = None) -> str:
        """The per-class IoU / Acc table (mmseg's layout), then the summary line."""
        names = list(class_names) if class_names is not None else [f"class {i}" for i in range(self.num_classes)]
        per_class = self.per_class()
        width = max(len("Class"), *(len(n) for n in names))
        lines = [f"| {'Class':<{width}} |    IoU |    Acc |", f"|{'-' * (width + 2)}|--------|--------|"]
        for name, iou, acc in zip(names, per_class["iou"], per_class["acc"], strict=True):
            lines.append(f"| {name:<{width}} | {100 * iou:6.2f} | {100 * acc:6.2f} |")
        summary = self.summary()
        lines.append("  ".join(f"{k} {v:.2f}" for k, v in summary.items()))
        return "\n".join(lines)


def _finite_or_none(values: dict) -> dict:
    """JSON has no NaN: undefined figures (a class never seen) become null."""
    return {k: (_finite_or_none(v) if isinstance(v, dict) else (None if v != v else v)) for k, v in values.items()}


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
class _EvalSamples(torch.utils.data.Dataset):
    """This rank's share of a segmentation set (every ``world_size``-th image, none repeated), as
    ``(index, resized normalised images, label [H, W] int64, original uint8 image or None)``."""

    def __init__(self, dataset, transform: SegmentationTestTransform, indices: Sequence[int], keep_images: int):
        self.dataset, self.transform, self.indices, self.keep_images = dataset, transform, list(indices), keep_images

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        image, mask = self.dataset.load(index)
        original = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous() if index < self.keep_images else None
        return index, self.transform(image), torch.from_numpy(np.ascontiguousarray(mask)).long(), original


def inference_model(model: nn.Module, build: Callable[[], BEiTUperNet], device: torch.device) -> BEiTUperNet:
    """The module to evaluate: ``model`` itself, or for an FSDP2-sharded one a full replica on this
    rank (sliding windows give each rank its own number of forward passes, which sharded
    parameters, gathered in every forward, cannot allow)."""
    module = unwrap(model)
    if not any(isinstance(p, DTensor) for p in module.parameters()):
        return module
    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    replica = build().to(device)
    replica.load_state_dict(full)
    return replica


@torch.no_grad()
def evaluate_segmentation(
    model: BEiTUperNet,
    dataset,
    world: Distributed,
    *,
    mode: str = "slide",
    stride: int | None = None,
    ratios: Sequence[float] = (1.0,),
    flip: bool = False,
    amp_dtype: torch.dtype = torch.float32,
    num_workers: int = 2,
    max_images: int = 0,
    picture: str | None = None,
) -> SegmentationMetrics:
    """mIoU/mAcc/aAcc of ``model`` over ``dataset`` (each rank takes its share; the sums are
    all-reduced), with the reference's test pipeline.

    Args:
        mode: "slide" (windows of the model's input size, ``stride`` apart: default 2/3 of it,
            341 at 512) or "whole".
        ratios: test scales of the (4 x input, input) base scale; several: multi-scale testing.
        flip: add horizontally flipped views.
        amp_dtype: autocast dtype of the forward passes (float32: none).
        max_images: evaluate only the first ones (0: all).
        picture: where to draw the first images with their predictions (rank 0), or None.
    """
    was_training = model.training
    model.eval()
    window = model.input_size
    stride = stride or window[0] * 2 // 3
    transform = SegmentationTestTransform(scale=(4 * window[0], window[0]), ratios=ratios, min_short=window[0])
    count = min(len(dataset), max_images) if max_images else len(dataset)
    keep = PICTURE_IMAGES if picture and world.is_main else 0
    samples = _EvalSamples(dataset, transform, range(world.rank, count, world.world_size), keep)
    loader = torch.utils.data.DataLoader(samples, batch_size=None, num_workers=num_workers)
    metrics = SegmentationMetrics(model.num_classes, device=world.device)
    forward = fixed_size_forward(model)
    drawn: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    autocast = torch.autocast(world.device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)
    for _, images, label, original in loader:
        views = [image[None].to(world.device, non_blocking=True) for image in images]
        label = label.to(world.device, non_blocking=True)
        with autocast:
            probabilities = predict_probabilities(
                forward, views, label.shape, model.num_classes, mode=mode, crop_size=window, stride=(stride, stride),
                flip=flip,
            )  # fmt: skip
        prediction = probabilities.argmax(1)[0]
        metrics.update(prediction, label)
        if original is not None:
            drawn.append((original, label.cpu(), prediction.cpu()))
    metrics.all_reduce()
    if drawn:
        from ..viz import draw_segmentation

        draw_segmentation(*zip(*drawn, strict=True), model.num_classes, picture)
    model.train(was_training)
    return metrics


# ------------------------------------------------------------------------------------------------
# The training task
# ------------------------------------------------------------------------------------------------
def segmentation_flops_per_image(model: BEiTUperNet, training: bool = True) -> float:
    """Forward FLOPs (2 per multiply-add) of one image at the model's input size: the blocks up to
    the last pyramid level, the patch embedding, and every convolution of the pyramid and the
    heads (norms, pooling, interpolation and the loss ignored); training: 3x, with the auxiliary head."""
    backbone = model.backbone
    patch_h, patch_w = backbone.patch_embed.patch_size
    height, width = model.input_size
    patches = (height // patch_h) * (width // patch_w)
    dim = backbone.embed_dim
    flops = vit_forward_flops(patches + 1, dim, max(backbone.out_indices) + 1)
    flops += 2 * patches * dim * 3 * patch_h * patch_w
    level = [patches * patch_h * patch_w // (stride * stride) for stride in backbone.strides]  # pixels per level

    def conv(module: nn.Module, pixels: int) -> float:
        kernel = module.weight.shape[2] * module.weight.shape[3]
        if isinstance(module, nn.ConvTranspose2d):  # a 2x2, stride-2 kernel: one tap per output pixel
            kernel = 1
        return 2.0 * pixels * module.out_channels * module.in_channels * kernel

    for fpn in (backbone.fpn1, backbone.fpn2):
        pixels = patches
        for layer in fpn.modules():
            if isinstance(layer, nn.ConvTranspose2d):
                pixels *= 4
                flops += conv(layer, pixels)
    head = model.decode_head
    flops += sum(conv(lateral.conv, level[i]) for i, lateral in enumerate(head.lateral_convs))
    flops += sum(conv(output.conv, level[i]) for i, output in enumerate(head.fpn_convs))
    flops += sum(conv(branch[1].conv, branch[0].output_size ** 2) for branch in head.psp_modules)
    flops += conv(head.bottleneck.conv, level[-1]) + conv(head.fpn_bottleneck.conv, level[0])
    flops += conv(head.conv_seg, level[0])
    if not training:
        return flops
    aux = model.auxiliary_head
    if aux is not None:
        flops += sum(conv(c.conv, level[aux.in_index]) for c in aux.convs) + conv(aux.conv_seg, level[aux.in_index])
    return 3 * flops


def check_segmentation_model(name: str) -> None:
    if name not in list_models("upernet_*"):
        raise ConfigError(
            f"--model {name} is not a segmentation model; choose one of {', '.join(list_models('upernet_*'))}"
        )


def build_segmentor(config: TrainConfig, num_classes: int) -> BEiTUperNet:
    """The UperNet model of ``--model`` at ``--input-size``, with ``--finetune`` weights if given."""
    check_segmentation_model(config.model)
    model = create_model(
        config.model, img_size=config.input_size, num_classes=num_classes, drop_path_rate=config.drop_path,
        init_values=config.layer_scale_init_value or None, **config.model_kwargs,
    )  # fmt: skip
    if config.finetune:
        unused = load_segmentation_checkpoint(model, config.finetune)
        log.info("loaded %s (%d entries unused: %s)", config.finetune, len(unused), ", ".join(unused[:8]))
    return model


def open_segmentation_dataset(option: str, data_dir: str, split: str, num_classes: int | None):
    """:func:`build_segmentation_dataset`, its errors as a :class:`ConfigError` naming ``option``."""
    try:
        return build_segmentation_dataset(data_dir, split, num_classes=num_classes)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"{option} {data_dir}: {exc}") from None


def segment_datasets(config: TrainConfig):
    """The training and validation sets of ``--data-dir`` / ``--eval-data-dir`` (default: synthetic)."""
    train_dir = config.data_dir or "synthetic"
    train_set = open_segmentation_dataset("--data-dir", train_dir, "train", config.nb_classes)
    val_set = open_segmentation_dataset("--eval-data-dir", config.eval_data_dir or train_dir, "val", config.nb_classes)
    for split, dataset in (("training", train_set), ("validation", val_set)):
        if dataset.num_classes != config.nb_classes:
            raise ConfigError(
                f"--nb-classes {config.nb_classes} differs from the {dataset.num_classes} classes of the {split} data"
            )
    return train_set, val_set


def build_segment_task(config: TrainConfig, world: Distributed) -> Task:
    config.validate()
    train_set, val_set = segment_datasets(config)
    sync_bn = world.enabled and world.device.type == "cuda"  # the official SyncBN (gloo on CPUs has none)
    if config.batch_size < 2 and not sync_bn:
        raise ConfigError(
            f"--batch-size {config.batch_size}: the heads' BatchNorm (the 1x1 pyramid pooling above all) needs at "
            "least 2 images per rank, or SyncBN over several GPUs"
        )
    model = build_segmentor(config, config.nb_classes)
    if sync_bn:
        model = convert_sync_batchnorm(model)
    transform = SegmentationTrainTransform(config.input_size, scale=(4 * config.input_size, config.input_size))
    loader = build_loader(
        "segmentation", train_set, batch_size=config.batch_size, transform=transform, seed=config.seed,
        num_workers=config.num_workers, device=world.device,
    )  # fmt: skip
    aux_weight = model.aux_loss_weight
    layer_decay = config.layer_decay if config.layer_decay < 1 else None
    amp_dtype = AMP_DTYPES[config.amp_dtype]

    def build_replica() -> BEiTUperNet:
        return create_model(config.model, img_size=config.input_size, num_classes=config.nb_classes,
                            init_values=config.layer_scale_init_value or None, **config.model_kwargs)  # fmt: skip

    def loss(model, batch):
        return segmentation_loss(model(batch.images), batch.labels, aux_weight=aux_weight)

    def evaluate(model, step, picture: str | None = None) -> dict[str, float]:
        module = inference_model(model, build_replica, world.device)
        metrics = evaluate_segmentation(
            module,
            val_set,
            world,
            amp_dtype=amp_dtype,
            num_workers=min(workers_per_rank(config.num_workers), 4),
            picture=picture,
        )
        if world.is_main:
            log.info("segmentation at step %d:\n%s", step, metrics.table(val_set.classes))
        return metrics.summary()

    def on_end(model, output_dir: str) -> None:
        summary = evaluate(model, -1, picture=os.path.join(output_dir, "predictions.png"))
        if world.is_main:
            with open(os.path.join(output_dir, "segmentation_eval.json"), "w") as f:
                json.dump(_finite_or_none(summary), f, indent=1)

    return Task(
        model=model, loss=loss,
        param_groups=lambda m: get_parameter_groups(m, config.weight_decay, layer_decay),
        data=TrainData.from_loader(loader), images_per_batch=config.batch_size,
        flops_per_image=segmentation_flops_per_image(model), evaluate=evaluate, on_end=on_end,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# beitv2 eval --task segment
# ------------------------------------------------------------------------------------------------
def eval_parser(prog: str = "beitv2 eval") -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=prog, description="Evaluate a segmentation model: mIoU, mAcc, aAcc and per-class IoU.",
                            allow_abbrev=False)  # fmt: skip
    parser.add_argument("--task", choices=["segment"], required=True, help="what to evaluate")
    parser.add_argument("--model", default="upernet_beit_base_patch16_512", help="segmentation model name")
    parser.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--weights", required=True,
                        help="model.safetensors of a segment run, or an official beitv2_*_ftade20k.pth")  # fmt: skip
    parser.add_argument(
        "--data-dir", default="synthetic", help="ADE20K root, images/+annotations/ folders, or synthetic"
    )
    parser.add_argument("--split", default="val", help="split to evaluate (val)")
    parser.add_argument("--nb-classes", type=int, default=0,
                        help="number of classes (default: the data set's, 150 for ADE20K; needed for folder pairs)")  # fmt: skip
    parser.add_argument("--input-size", type=int, default=512, help="the model's window (crop) size")
    parser.add_argument("--mode", choices=["slide", "whole"], default="slide", help="slide (official) or whole")
    parser.add_argument("--stride", type=int, default=0, help="slide stride (default: 2/3 of the input size, 341)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0],
                        help="test ratios; several for multi-scale (official: 0.5 0.75 1.0 1.25 1.5 1.75)")  # fmt: skip
    parser.add_argument("--flip", action="store_true", help="add horizontally flipped views")
    parser.add_argument("--amp-dtype", choices=sorted(AMP_DTYPES), default="float32", help="autocast of the forwards")
    parser.add_argument("--max-images", type=int, default=0, help="evaluate only the first N images (0: all)")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--output-dir", default="runs/eval", help="writes eval.json and predictions.png")
    return parser


def evaluate_command(argv: list[str]) -> int:
    """``beitv2 eval --task segment``: one process or ``torchrun`` ranks (each evaluates its share)."""
    parser = eval_parser()
    args = parser.parse_args(argv)
    from .config import _parse_key_values, check_output_dir
    from .distributed import process_group
    from .metrics import setup_logging

    try:
        extra = _parse_key_values(args.model_kwargs, "--model-kwargs")
    except ValueError as exc:
        parser.error(str(exc))
    if args.input_size < 1 or args.nb_classes < 0:
        parser.error("--input-size must be at least 1 and --nb-classes cannot be negative")
    if args.stride < 0 or args.max_images < 0 or args.num_workers < 0 or min(args.scales) <= 0:
        parser.error("--stride, --max-images and --num-workers cannot be negative; --scales must be positive")
    check_output_dir(args.output_dir)
    check_segmentation_model(args.model)
    weights = load_state_dict_file(args.weights, unwrap=False)  # a bad file fails before the data is read
    dataset = open_segmentation_dataset("--data-dir", args.data_dir, args.split, args.nb_classes or None)
    if args.nb_classes and dataset.num_classes != args.nb_classes:
        raise ConfigError(f"--nb-classes {args.nb_classes} differs from the {dataset.num_classes} classes of the data")
    model = create_model(args.model, img_size=args.input_size, num_classes=dataset.num_classes, **extra)
    load_segmentation_checkpoint(model, weights)
    with process_group() as world:
        setup_logging(world)
        try:
            metrics = evaluate_segmentation(
                model.to(world.device), dataset, world, mode=args.mode, stride=args.stride or None,
                ratios=args.scales, flip=args.flip, amp_dtype=AMP_DTYPES[args.amp_dtype], num_workers=args.num_workers,
                max_images=args.max_images, picture=os.path.join(args.output_dir, "predictions.png"),
            )  # fmt: skip
        except WindowSizeError as exc:
            raise ConfigError(f"--mode {args.mode}: {exc}") from None
        if world.is_main:
            print(metrics.table(dataset.classes))
            per_class = metrics.per_class()
            iou = dict(zip(dataset.classes, map(float, 100 * per_class["iou"]), strict=True))
            with open(os.path.join(args.output_dir, "eval.json"), "w") as f:
                json.dump(_finite_or_none({**metrics.summary(), "per_class_iou": iou}), f, indent=1)
    return 0
