"""``beitv2 demo``: the whole method, offline, on two CPU cores in a few minutes.

1. Train a small VQ-KD tokenizer that distils HOG features (a teacher without weights) on
   crops of scikit-image's bundled photographs.
2. Pretrain a small BEiT v2 (patch aggregation included) to predict that tokenizer's tokens of
   masked patches.
3. Measure on held-out crops: the MIM token accuracy against always predicting the most frequent
   token, the codebook usage; draw loss curves, codebook usage and token maps.

Everything lands in ``--output-dir``: ``summary.json``, ``curves.png``, ``codebook_usage.png``,
``token_maps.png``, the two runs (logs, TensorBoard events, checkpoints, ``model.safetensors``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from .data import EvalTransform, MaskingGenerator, build_dataset, build_loader
from .models import create_model
from .train.config import TrainConfig
from .train.distributed import Distributed
from .train.loop import seed_everything, train
from .train.metrics import setup_logging
from .train.pretrain import build_pretrain_task
from .train.tokenizer import build_tokenizer_task
from .viz import draw_token_maps, plot_codebook_usage, plot_curves

IMAGE_SIZE = 112  # 7 x 7 patches of 16 px
NUM_MASK = 19  # 39% of the patches, BEiT v2's 75 of 196
# A short run needs help against codebook collapse: a faster EMA (0.9 instead of 0.99) and restarts
# of dead codes (both off in the paper's recipe) and a codebook of 128 codes.
TOKENIZER = dict(
    model="vqkd_encoder_tiny_decoder_1x192x3_hog",
    model_kwargs={"encoder_config": {"depth": 4}, "dead_code_threshold": 1.0},
    codebook_size=128, codebook_dim=32, ema_decay=0.9,
)  # fmt: skip
STUDENT = dict(model="beit_tiny_patch16_224_8k_vocab_cls_pt", model_kwargs={"depth": 6}, early_layers=4, head_layers=1)


def _configs(output_dir: str, seed: int, quick: bool) -> tuple[TrainConfig, TrainConfig]:
    common = dict(
        data_dir="demo", input_size=IMAGE_SIZE, second_input_size=IMAGE_SIZE, codebook_size=TOKENIZER["codebook_size"],
        codebook_dim=TOKENIZER["codebook_dim"], amp_dtype="float32", num_workers=1, seed=seed, log_interval=10,
        checkpoint_interval=10_000, resume="none", parallel="none",
    )  # fmt: skip
    tokenizer = TrainConfig(
        task="tokenizer", model=TOKENIZER["model"], model_kwargs=TOKENIZER["model_kwargs"], teacher="hog",
        ema_decay=TOKENIZER["ema_decay"], batch_size=32, epochs=2 if quick else 8, warmup_epochs=1, lr=5e-4, min_lr=1e-5, weight_decay=1e-4,
        opt_betas=[0.9, 0.99], clip_grad=0.0, min_crop_scale=0.2, output_dir=os.path.join(output_dir, "tokenizer"),
        **common,
    )  # fmt: skip
    student = TrainConfig(
        task="pretrain", model=STUDENT["model"], model_kwargs=STUDENT["model_kwargs"],
        early_layers=STUDENT["early_layers"], head_layers=STUDENT["head_layers"],
        tokenizer_model=TOKENIZER["model"], tokenizer_kwargs=TOKENIZER["model_kwargs"],
        tokenizer_weight=os.path.join(tokenizer.output_dir, "model.safetensors"),
        num_mask_patches=NUM_MASK, min_mask_patches_per_block=4, batch_size=32, epochs=3 if quick else 16,
        warmup_epochs=1, lr=1.5e-3, min_lr=1e-5, weight_decay=0.05, opt_betas=[0.9, 0.98], clip_grad=3.0,
        output_dir=os.path.join(output_dir, "pretrain"), **common,
    )  # fmt: skip
    return tokenizer, student


@torch.no_grad()
def evaluate(student_config: TrainConfig, student: torch.nn.Module, tokenizer: torch.nn.Module, seed: int) -> dict:
    """MIM accuracy on the held-out crops (fixed masks) and the most-frequent-token baseline."""
    transform = EvalTransform(IMAGE_SIZE, crop_pct=1.0, mean=None, std=None)
    grid = tokenizer.encoder.patch_embed.grid_size
    num_codes = student_config.codebook_size
    train_images = build_loader(
        "tokenizer", build_dataset("demo", "train"), batch_size=64, transform=transform, shuffle=False,
        drop_last=False, num_workers=0, seed=seed,
    )  # fmt: skip
    counts = torch.zeros(num_codes)
    for (images,) in train_images:
        counts += torch.bincount(tokenizer.get_codebook_indices(images).reshape(-1), minlength=num_codes).float()
    most_frequent = int(counts.argmax())

    masking = MaskingGenerator(grid, NUM_MASK, min_num_patches=4)
    draws = np.random.default_rng(seed)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    correct = baseline = total = 0
    shown = None
    val = build_loader(
        "tokenizer", build_dataset("demo", "val"), batch_size=64, transform=transform, shuffle=False, drop_last=False,
        num_workers=0, seed=seed,
    )  # fmt: skip
    student.eval()
    for (images,) in val:
        ids = tokenizer.get_codebook_indices(images)
        mask_index = torch.stack([torch.from_numpy(masking.sample_index(draws)) for _ in range(len(images))])
        logits_main, _ = student((images - mean) / std, mask_index, return_logits=True)
        labels = torch.gather(ids, 1, mask_index).reshape(-1)
        correct += int((logits_main.argmax(-1) == labels).sum())
        baseline += int((labels == most_frequent).sum())
        total += labels.numel()
        if shown is None:
            shown = (images[:8], ids[:8].reshape(-1, *grid))
    return {
        "mim_accuracy": correct / total,
        "most_frequent_token_accuracy": baseline / total,
        "masked_tokens_evaluated": total,
        "train_token_counts": counts,
        "shown": shown,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="beitv2 demo", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--output-dir", default="runs/demo", help="where everything is written")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few epochs only (for tests)")
    args = parser.parse_args(argv)

    world = Distributed()
    setup_logging(world)
    started = time.perf_counter()
    tokenizer_config, student_config = _configs(args.output_dir, args.seed, args.quick)

    seed_everything(args.seed, 0)
    tokenizer_log = train(tokenizer_config, build_tokenizer_task(tokenizer_config, world), world)
    tokenizer_seconds = time.perf_counter() - started

    seed_everything(args.seed, 0)
    pretrain_task = build_pretrain_task(student_config, world)
    pretrain_log = train(student_config, pretrain_task, world)
    tokenizer = pretrain_task.frozen[0]

    student = create_model(
        student_config.model, img_size=IMAGE_SIZE, vocab_size=student_config.codebook_size,
        early_layers=student_config.early_layers, head_layers=student_config.head_layers,
        pretrained=True, pretrained_weight=os.path.join(student_config.output_dir, "model.safetensors"),
        **student_config.model_kwargs,
    )  # fmt: skip
    result = evaluate(student_config, student, tokenizer, args.seed)

    out = args.output_dir
    plot_curves(
        {"tokenizer": os.path.join(tokenizer_config.output_dir, "metrics.jsonl"),
         "BEiT v2": os.path.join(student_config.output_dir, "metrics.jsonl")},
        ["loss", "rec_loss", "mlm_acc_1", "mlm_acc_2"], os.path.join(out, "curves.png"),
    )  # fmt: skip
    usage = plot_codebook_usage(result["train_token_counts"], os.path.join(out, "codebook_usage.png"),
                                title="tokens of the training crops")  # fmt: skip
    images, ids = result["shown"]
    draw_token_maps(images, ids, student_config.codebook_size, os.path.join(out, "token_maps.png"))
    summary = {
        "mim_accuracy": result["mim_accuracy"],
        "most_frequent_token_accuracy": result["most_frequent_token_accuracy"],
        "beats_most_frequent_baseline": result["mim_accuracy"] > result["most_frequent_token_accuracy"],
        "masked_tokens_evaluated": result["masked_tokens_evaluated"],
        "codebook_used_fraction": usage["used_fraction"],
        "codebook_perplexity": usage["perplexity"],
        "codebook_size": student_config.codebook_size,
        "tokenizer_final": {k: tokenizer_log.get(k) for k in ("loss", "rec_loss", "quant_loss", "images_per_s")},
        "pretrain_final": {k: pretrain_log.get(k) for k in ("loss", "mlm_acc_1", "mlm_acc_2", "images_per_s")},
        "tokenizer_seconds": tokenizer_seconds,
        "total_seconds": time.perf_counter() - started,
        "device": "cpu",
        "threads": torch.get_num_threads(),
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    print(f"\nwrote {out}/summary.json, curves.png, codebook_usage.png, token_maps.png")
    return 0
