"""VQ-KD tokenizer training: reconstruct a frozen teacher's patch features from quantized codes
(microsoft/unilm ``engine_for_vqkd.py``), with codebook usage in every log line."""

from __future__ import annotations

from ..data import TokenizerTransform, build_loader
from ..models import get_parameter_groups
from .config import TrainConfig
from .distributed import Distributed
from .inputs import check_batch_fits, create_checked_model, open_image_dataset
from .loop import TrainData, TrainingTask
from .metrics import vit_forward_flops


def tokenizer_flops_per_image(tokenizer, teacher: str) -> float:
    """Encoder and decoder forward + backward, plus the teacher's forward: a ViT-B/16 for CLIP
    and DINO, next to nothing for HOG."""
    encoder, decoder = tokenizer.encoder, tokenizer.decoder
    tokens = encoder.patch_embed.num_patches + 1
    trained = vit_forward_flops(tokens, encoder.embed_dim, len(encoder.blocks))
    trained += vit_forward_flops(decoder.patch_embed.num_patches + 1, decoder.embed_dim, len(decoder.blocks))
    teacher_flops = vit_forward_flops(tokens, 768, 12) if teacher in ("clip", "dino") else 0.0
    return 3 * trained + teacher_flops


def build_tokenizer_task(config: TrainConfig, world: Distributed) -> TrainingTask:
    config.validate()
    teacher_kwargs = {"teacher": config.teacher}
    if config.teacher in ("clip", "dino"):
        teacher_kwargs["teacher_checkpoint"] = config.teacher_weight
    settings = dict(
        img_size=config.input_size, n_code=config.codebook_size, code_dim=config.codebook_dim,
        quantize_kmeans_init=config.quantize_kmeans_init, decay=config.ema_decay, **teacher_kwargs,
    )  # fmt: skip
    tokenizer = create_checked_model(config.model, settings, config.model_kwargs)
    dataset = open_image_dataset("--data-dir", config.data_dir, "train")
    check_batch_fits(config.batch_size, dataset, world.world_size)
    transform = TokenizerTransform(config.input_size, min_crop_scale=config.min_crop_scale)
    loader = build_loader(
        "tokenizer", dataset, batch_size=config.batch_size, transform=transform, seed=config.seed,
        num_workers=config.num_workers, device=world.device,
    )  # fmt: skip

    def loss(model, batch):
        (images,) = batch
        total, log = model(images)
        return total, {key.split("/")[-1]: value for key, value in log.items() if not key.endswith("total_loss")}

    def usage(model) -> dict[str, float]:
        return {key: float(value) for key, value in model.quantize.usage_metrics().items()}

    return TrainingTask(
        model=tokenizer, loss=loss,
        param_groups=lambda model: get_parameter_groups(model, config.weight_decay),
        data=TrainData.from_loader(loader), images_per_batch=config.batch_size,
        flops_per_image=tokenizer_flops_per_image(tokenizer, config.teacher),
        on_log=usage,
        on_epoch_start=lambda model, epoch: model.quantize.reset_cluster_size(),
        model_settings=dict(img_size=config.input_size, n_code=config.codebook_size, code_dim=config.codebook_dim),
    )  # fmt: skip
