"""BEiT v2 pretraining: a frozen VQ-KD tokenizer gives the visual tokens, the student predicts
those of the masked patches through both heads (microsoft/unilm ``engine_for_pretraining.py``)."""

from __future__ import annotations

import torch

from ..data import MaskingGenerator, PretrainTransform, build_dataset, build_loader
from ..models import create_model, get_parameter_groups, load_checkpoint, load_state_dict_file
from .config import ConfigError, TrainConfig
from .distributed import Distributed
from .loop import Task, TrainData
from .metrics import vit_forward_flops
from .step import phase


def load_tokenizer(
    name: str, weight: str, *, img_size: int, codebook_size: int, codebook_dim: int, **kwargs
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
    tokenizer = create_model(
        name, as_tokenzer=True, img_size=img_size, n_code=codebook_size, code_dim=codebook_dim, **kwargs
    )
    load_checkpoint(tokenizer, state_dict, strict=True)
    return tokenizer.eval()


def build_tokenizer(config: TrainConfig) -> torch.nn.Module:
    """The frozen tokenizer of a pretraining run (``--tokenizer-model``, ``--tokenizer-weight``)."""
    return load_tokenizer(
        config.tokenizer_model, config.tokenizer_weight, img_size=config.second_input_size,
        codebook_size=config.codebook_size, codebook_dim=config.codebook_dim, **config.tokenizer_kwargs,
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


def build_pretrain_task(config: TrainConfig, world: Distributed) -> Task:
    config.validate()
    tokenizer = build_tokenizer(config)
    student = create_model(
        config.model, img_size=config.input_size, vocab_size=config.codebook_size, drop_path_rate=config.drop_path,
        init_values=config.layer_scale_init_value or None, early_layers=config.early_layers,
        head_layers=config.head_layers, shared_lm_head=config.shared_lm_head, **config.model_kwargs,
    )  # fmt: skip
    grid = student.patch_embed.grid_size
    if config.num_mask_patches > grid[0] * grid[1]:
        raise ConfigError(
            f"--num-mask-patches {config.num_mask_patches} exceeds the {grid[0] * grid[1]} patches of a "
            f"{config.input_size}px image"
        )
    dataset = build_dataset(config.data_dir or "demo", "train")
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

    return Task(
        model=student, loss=loss,
        param_groups=lambda model: get_parameter_groups(model, config.weight_decay),
        data=TrainData.from_loader(loader), images_per_batch=config.batch_size,
        flops_per_image=pretrain_flops_per_image(student, tokenizer, config.num_mask_patches),
        frozen=[tokenizer],
    )  # fmt: skip
