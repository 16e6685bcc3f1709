"""BEiT v2 pretraining: a frozen VQ-KD tokenizer gives the visual tokens, the student predicts
those of the masked patches through both heads (microsoft/unilm ``engine_for_pretraining.py``)."""

from __future__ import annotations

import re

import torch

from ..data import MaskingGenerator, PretrainTransform, build_loader
from ..models import get_parameter_groups, load_checkpoint, load_state_dict_file
from .config import ConfigError, TrainConfig
from .distributed import Distributed
from .inputs import check_batch_fits, create_checked_model, open_image_dataset
from .loop import TrainData, TrainingTask
from .metrics import vit_forward_flops
from .step import phase


def load_tokenizer(
    name: str,
    weight: str,
    *,
    img_size: int,
    codebook_size: int,
    codebook_dim: int,
    size_option: str = "--input-size",
    **kwargs,
) -> torch.nn.Module:
    """A frozen VQ-KD tokenizer from a local checkpoint (as the reference's ``as_tokenzer=True``).

    The checkpoint's codebook is compared with ``--codebook-size`` / ``--codebook-dim`` before the
    model is built, so a mismatch is reported as the option it is.
    """
    state_dict = load_state_dict_file(weight)
    codes = state_dict.get("quantize.embedding.weight")
    if codes is not None and codes.dim() == 2:
        for option, given, saved in (("--codebook-size", codebook_size, codes.shape[0]),
                                     ("--codebook-dim", codebook_dim, codes.shape[1])):  # fmt: skip
            if given != saved:
                raise ConfigError(
                    f"{option} {given} does not match the tokenizer checkpoint {weight!r}, whose codebook holds "
                    f"{codes.shape[0]} codes of dimension {codes.shape[1]}"
                )
    tokenizer = create_checked_model(
        name, dict(as_tokenzer=True, img_size=img_size, n_code=codebook_size, code_dim=codebook_dim), kwargs,
        model_option="--tokenizer-model", settings_option="--tokenizer-kwargs",
    )  # fmt: skip
    _check_tokenizer_size(tokenizer, state_dict, weight, img_size, size_option)
    load_checkpoint(tokenizer, state_dict, strict=True)
    return tokenizer.eval()


def _check_tokenizer_size(tokenizer, state_dict: dict, weight: str, img_size: int, option: str) -> None:
    """A checkpoint's absolute position table fixes the image size it was trained at."""
    key = "encoder.pos_embed"
    saved, built = state_dict.get(key), tokenizer.state_dict().get(key)
    if saved is None or built is None or saved.shape == built.shape:
        return
    patch = tokenizer.encoder.patch_embed.patch_size[0]
    side = round((saved.shape[1] - 1) ** 0.5) * patch
    raise ConfigError(
        f"{option} {img_size} does not match the tokenizer checkpoint {weight!r}, trained at {side}px: "
        f"use {option} {side}"
    )


def build_tokenizer(config: TrainConfig) -> torch.nn.Module:
    """The frozen tokenizer of a pretraining run (``--tokenizer-model``, ``--tokenizer-weight``)."""
    return load_tokenizer(
        config.tokenizer_model, config.tokenizer_weight, img_size=config.second_input_size,
        codebook_size=config.codebook_size, codebook_dim=config.codebook_dim, size_option="--second-input-size",
        **config.tokenizer_kwargs,
    )  # fmt: skip


def tokenizer_forward_flops(tokenizer) -> float:
    """The frozen tokenizer's forward per image: encoder, task layer and codebook similarities."""
    encoder = tokenizer.encoder
    codes, code_dim = tokenizer.quantize.embedding.weight.shape
    patches, dim = encoder.patch_embed.num_patches, encoder.embed_dim
    flops = vit_forward_flops(patches + 1, dim, len(encoder.blocks))
    return flops + 2 * patches * (dim * dim + dim * code_dim) + 2 * patches * codes * code_dim


def pretrain_flops_per_image(student, tokenizer, num_mask_patches: int) -> float:
    """Student forward + backward (3x forward), both LM heads, and the tokenizer's forward."""
    tokens = student.patch_embed.num_patches + 1
    dim = student.embed_dim
    forward = vit_forward_flops(tokens, dim, len(student.blocks) + len(student.cls_pt_layers))
    forward += 2 * (tokens - 1) * dim * 3 * student.patch_embed.patch_size[0] * student.patch_embed.patch_size[1]
    heads = 2 if len(student.cls_pt_layers) else 1
    forward += heads * 2 * num_mask_patches * dim * student.vocab_size
    return 3 * forward + tokenizer_forward_flops(tokenizer)


def pretrain_loss(student, tokenizer, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One batch's MIM loss: the frozen tokenizer's ids of every patch, then the student's forward
    and loss on the masked ones (each a compiled graph when the run compiles)."""
    images, tokenizer_images, mask_index = batch
    with phase("tokenizer"), torch.no_grad():
        target_ids = tokenizer.get_codebook_indices(tokenizer_images)
    with phase("student forward + loss"):
        out = student(images, mask_index, target_ids)
    return out["loss"], {k: v for k, v in out.items() if k != "loss"}


def build_student(config: TrainConfig) -> torch.nn.Module:
    """The BEiT v2 student of ``--model``; ``--early-layers`` (default: the model's) must lie below its depth."""
    settings = dict(
        img_size=config.input_size, vocab_size=config.codebook_size, drop_path_rate=config.drop_path,
        head_layers=config.head_layers, shared_lm_head=config.shared_lm_head, **config.layer_scale_kwargs(),
    )  # fmt: skip
    if config.early_layers is not None:
        settings["early_layers"] = config.early_layers
    try:
        student = create_checked_model(config.model, settings, config.model_kwargs)
    except ValueError as exc:  # the constructor refuses an early layer beyond the depth
        depth = re.search(r"early_layers.*depth=(\d+)", str(exc))
        if depth is None:
            raise
        raise ConfigError(_early_layers_error(config.early_layers, int(depth.group(1)))) from None
    if config.head_layers and student.early_layers >= len(student.blocks):
        raise ConfigError(_early_layers_error(student.early_layers, len(student.blocks)))
    return student


def _early_layers_error(early_layers: int, depth: int) -> str:
    return (
        f"--early-layers {early_layers} must lie below the model's depth {depth} (the official: 9 of 12 for base, "
        "21 of 24 for large)"
    )


def build_pretrain_task(config: TrainConfig, world: Distributed) -> TrainingTask:
    config.validate()
    tokenizer = build_tokenizer(config)
    student = build_student(config)
    grid = student.patch_embed.grid_size
    if config.num_mask_patches > grid[0] * grid[1]:
        raise ConfigError(
            f"--num-mask-patches {config.num_mask_patches} exceeds the {grid[0] * grid[1]} patches of a "
            f"{config.input_size}px image"
        )
    dataset = open_image_dataset("--data-dir", config.data_dir, "train")
    check_batch_fits(config.batch_size, dataset, world.world_size)
    transform = PretrainTransform(
        config.input_size, config.second_input_size, min_crop_scale=config.min_crop_scale,
        uint8_output=world.device.type == "cuda", fast_decode=config.fast_decode,
    )  # fmt: skip
    masking = MaskingGenerator(
        grid, config.num_mask_patches, min_num_patches=min(config.min_mask_patches_per_block, config.num_mask_patches),
        max_num_patches=config.max_mask_patches_per_block,
    )  # fmt: skip
    loader = build_loader(
        "pretrain", dataset, batch_size=config.batch_size, transform=transform, masking=masking, seed=config.seed,
        num_workers=config.num_workers, device=world.device, backend={"pil": "torch"}.get(config.data_backend, config.data_backend),
    )  # fmt: skip

    def loss(model, batch):
        return pretrain_loss(model, tokenizer, batch)

    return TrainingTask(
        model=student, loss=loss,
        param_groups=lambda model: get_parameter_groups(model, config.weight_decay),
        data=TrainData.from_loader(loader), images_per_batch=config.batch_size,
        flops_per_image=pretrain_flops_per_image(student, tokenizer, config.num_mask_patches),
        frozen=[tokenizer],
        model_settings=dict(
            img_size=config.input_size, vocab_size=config.codebook_size, early_layers=student.early_layers,
            head_layers=config.head_layers, shared_lm_head=config.shared_lm_head, **config.layer_scale_kwargs(),
        ),
    )  # fmt: skip
