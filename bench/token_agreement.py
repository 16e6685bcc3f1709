"""How many token ids the frozen tokenizer in bf16 (weights and activations, as pretraining runs it
under bf16 autocast) shares with the same tokenizer in fp32, on the built-in demo photographs.

    python -m bench.token_agreement                                  # random weights (see below)
    python -m bench.token_agreement --tokenizer-weight vqkd.pth      # a trained tokenizer

Without ``--tokenizer-weight`` the tokenizer has the recipe's architecture
(``vqkd_encoder_base_decoder_3x768x12_clip``, 8192 codes of 32) and random weights, since the
official weights cannot be downloaded here, and its codebook comes two ways: from the k-means
initialisation the quantizer does on the first batch of tokenizer training (here, on the fp32
features of the demo set's train crops), and random unit codes. Either way the figure measures how
often bf16 rounding moves a patch to another code for features of this distribution; a trained
tokenizer, whose features cluster around its codes, may differ. The official implementation
itself computes these distances under fp16 autocast.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from beitv2_fast.data import EvalTransform, build_dataset
from beitv2_fast.models import create_model
from beitv2_fast.train.pretrain import load_tokenizer


def demo_images(split: str, count: int, size: int) -> torch.Tensor:
    """The first ``count`` crops of the demo set's ``split``, in [0, 1], ``[count, 3, size, size]``."""
    dataset = build_dataset("demo", split, transform=EvalTransform(size, mean=None, std=None))
    step = max(1, len(dataset) // count)  # spread over the photographs
    return torch.stack([dataset[i][0] for i in range(0, step * count, step)])


def token_ids(tokenizer, images: torch.Tensor, dtype: torch.dtype, batch: int) -> torch.Tensor:
    """Ids as pretraining computes them: the tokenizer in ``dtype`` under that autocast."""
    tokenizer = tokenizer.to(dtype)
    autocast = torch.autocast(images.device.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.no_grad(), autocast:
        return torch.cat([tokenizer.get_codebook_indices(chunk) for chunk in images.split(batch)])


def kmeans_codebook(tokenizer, images: torch.Tensor, batch: int) -> None:
    """The quantizer's first-batch k-means initialisation, on the fp32 unit features of ``images``."""
    with torch.no_grad():
        features = torch.cat([tokenizer._task_features(tokenizer.pre_process(c))[0] for c in images.split(batch)])
        tokenizer.quantize.init_codebook(F.normalize(features.reshape(-1, features.shape[-1]), dim=-1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-model", default="vqkd_encoder_base_decoder_3x768x12_clip")
    parser.add_argument("--tokenizer-weight", default="", help="a trained tokenizer (default: random weights)")
    parser.add_argument("--images", type=int, default=8, help="demo crops to tokenize (val split)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.images < 1 or args.batch < 1:
        parser.error("--images and --batch must be at least 1")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    images = demo_images("val", args.images, args.img_size).to(device)
    if args.tokenizer_weight:
        tokenizers = {"trained": load_tokenizer(args.tokenizer_model, args.tokenizer_weight, img_size=args.img_size,
                                                codebook_size=8192, codebook_dim=32)}  # fmt: skip
    else:
        kmeans = create_model(args.tokenizer_model, as_tokenzer=True, img_size=args.img_size).eval().to(device)
        patches = kmeans.encoder.patch_embed.num_patches
        codes = kmeans.quantize.num_tokens
        kmeans_codebook(kmeans, demo_images("train", -(-codes // patches), args.img_size).to(device), args.batch)
        random_codes = copy.deepcopy(kmeans)
        codebook = random_codes.quantize.embedding.weight
        codebook.copy_(F.normalize(torch.randn_like(codebook), dim=-1))
        tokenizers = {"random weights, k-means codebook": kmeans, "random weights, random unit codes": random_codes}
    print(f"{len(images)} demo crops at {args.img_size} px on {device}; ids of the tokenizer in bf16 against fp32")
    for name, tokenizer in tokenizers.items():
        started = time.perf_counter()
        tokenizer = tokenizer.to(device)
        reference = token_ids(tokenizer, images, torch.float32, args.batch)
        low = token_ids(tokenizer, images, torch.bfloat16, args.batch)
        agree = (reference == low).double().mean().item()
        print(
            f"{name}: {100 * agree:.2f}% of {reference.numel()} ids agree; {reference.unique().numel()} distinct "
            f"codes in fp32 ({time.perf_counter() - started:.0f} s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
