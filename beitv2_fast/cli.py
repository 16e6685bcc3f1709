"""The ``beitv2`` command (also ``python -m beitv2_fast``, which is what ``torchrun -m`` runs).

    beitv2 demo                                   # offline: tokenizer, then BEiT v2, on built-in images
    beitv2 train-tokenizer --recipe vqkd_base_clip --teacher-weight ViT-B-16.pt --data-dir /imagenet
    torchrun --nproc-per-node 8 -m beitv2_fast pretrain --recipe beitv2_base_1600e \\
        --tokenizer-weight vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth --data-dir /imagenet
    beitv2 finetune --recipe finetune_base_1600e --finetune runs/beitv2/model.safetensors --data-dir /imagenet
    beitv2 linprobe --recipe linprobe_base --finetune runs/beitv2/model.safetensors --data-dir /imagenet
    torchrun --nproc-per-node 8 -m beitv2_fast segment --recipe seg_ade20k_base \\
        --finetune beitv2_base_patch16_224_pt1k.pth --data-dir /data/ADEChallengeData2016
    beitv2 eval --weights runs/finetune/model_best.safetensors --data-dir /imagenet    # top-1, top-5, loss
    beitv2 eval --task segment --weights runs/seg/model.safetensors --data-dir /data/ADEChallengeData2016
    beitv2 tokenize --tokenizer-weight vqkd.pth images/*.jpg --output-dir tokens/
    beitv2 convert beitv2_base_patch16_224_pt1k.pth out.safetensors --model beit_base_patch16_224_8k_vocab_cls_pt
    beitv2 env
"""

from __future__ import annotations

import argparse
import os
import sys

from .train.config import ArgumentParser

DEFAULT_TOKENIZER = "vqkd_encoder_base_decoder_3x768x12_clip"

TRAINING = {
    "train-tokenizer": "tokenizer", "pretrain": "pretrain", "finetune": "finetune", "linprobe": "linprobe",
    "segment": "segment",
}  # fmt: skip


def run_training(task: str, argv: list[str]) -> dict[str, float]:
    """Parse the flags of one training command and run it on this process's rank."""
    from .train.config import check_output_dir, config_from_args
    from .train.distributed import process_group
    from .train.loop import seed_everything, train
    from .train.metrics import setup_logging
    from .train.run_folder import plan_resume

    command = next(name for name, t in TRAINING.items() if t == task)
    config = config_from_args(argv, task=task, prog=f"beitv2 {command}")
    check_output_dir(config.output_dir)
    # Before any process group, model or data: a folder this run must not write, or one whose run ended.
    start = plan_resume(config, int(os.environ.get("WORLD_SIZE", "1")))
    if start.complete:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"beitv2 {command}: the run in {config.output_dir} is complete (step {start.step}); nothing to do")
        return {}
    with process_group() as world:
        setup_logging(world)
        seed_everything(config.seed, world.rank)
        if task == "tokenizer":
            from .train.tokenizer import build_tokenizer_task as build
        elif task == "pretrain":
            from .train.pretrain import build_pretrain_task as build
        elif task == "segment":
            from .train.segment import build_segment_task as build
        else:
            from .train.finetune import build_finetune_task as build
        return train(config, build(config, world), world)


def tokenize(argv: list[str]) -> int:
    """Images in, token ids (JSON) and a picture of the token maps out."""
    parser = ArgumentParser(prog="beitv2 tokenize", description=tokenize.__doc__, allow_abbrev=False)
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument(
        "--tokenizer-model", help=f"default: the one in the file's metadata (ours), else {DEFAULT_TOKENIZER}"
    )
    parser.add_argument("--tokenizer-weight", required=True, help="local VQ-KD checkpoint")
    parser.add_argument(
        "--tokenizer-kwargs", nargs="*", default=[], metavar="KEY=VALUE", help="default: the file's metadata"
    )
    parser.add_argument("--input-size", type=int, help="default: the file's metadata, else 224")
    parser.add_argument("--codebook-size", type=int, help="default: the file's metadata, else 8192")
    parser.add_argument("--codebook-dim", type=int, help="default: the file's metadata, else 32")
    parser.add_argument("--output-dir", default="tokens")
    parser.add_argument(
        "--torchcompile", action="store_true", help="compile the tokenizer's lookup (pays off for many images)"
    )
    args = parser.parse_args(argv)

    import json

    import torch

    from .data import EvalTransform, decode_image
    from .train.config import _parse_key_values
    from .train.finetune import safetensors_model
    from .train.pretrain import load_tokenizer
    from .viz import draw_token_maps

    try:
        extra = _parse_key_values(args.tokenizer_kwargs, "--tokenizer-kwargs")
    except ValueError as exc:
        parser.error(str(exc))
    missing = [path for path in args.images if not os.path.isfile(path)]
    if missing:
        parser.error(f"no such image file: {', '.join(missing)}")
    # A tokenizer of ours loads with the settings it was trained with; the options given win.
    saved = safetensors_model(args.tokenizer_weight) if os.path.isfile(args.tokenizer_weight) else {}
    name = args.tokenizer_model or saved.get("model") or DEFAULT_TOKENIZER
    settings = dict(saved["model_kwargs"]) if name == saved.get("model") else {}
    for option, key, default in (("input_size", "img_size", 224), ("codebook_size", "n_code", 8192),
                                 ("codebook_dim", "code_dim", 32)):  # fmt: skip
        saved_value = settings.pop(key, default)
        if getattr(args, option) is None:
            setattr(args, option, saved_value)
    tokenizer = load_tokenizer(
        name, args.tokenizer_weight, img_size=args.input_size, codebook_size=args.codebook_size,
        codebook_dim=args.codebook_dim, **{**settings, **extra},
    )  # fmt: skip
    if args.torchcompile:
        tokenizer.compile(fullgraph=True)
    transform = EvalTransform(args.input_size, mean=None, std=None)
    images = torch.stack([transform(decode_image(path)) for path in args.images])
    with torch.no_grad():
        ids = tokenizer.get_codebook_indices(images)
    grid = tokenizer.encoder.patch_embed.grid_size
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "tokens.json"), "w") as f:
        json.dump({path: row.tolist() for path, row in zip(args.images, ids, strict=True)}, f)
    picture = os.path.join(args.output_dir, "token_maps.png")
    draw_token_maps(images, ids.reshape(-1, *grid), args.codebook_size, picture)
    print(f"wrote {args.output_dir}/tokens.json and {picture}")
    return 0


def convert(argv: list[str]) -> int:
    """Convert a checkpoint between the official, timm, MMPretrain and safetensors layouts."""
    parser = ArgumentParser(prog="beitv2 convert", description=convert.__doc__, allow_abbrev=False)
    parser.add_argument("source", help="checkpoint file (official .pth, timm, MMPretrain, ours, .safetensors)")
    parser.add_argument("destination", help="output file")
    parser.add_argument("--model", required=True, help="model name the checkpoint belongs to (checked strictly)")
    parser.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--to", choices=["official", "timm", "mmpretrain", "safetensors"], default="safetensors")
    args = parser.parse_args(argv)

    import torch

    from .models import convert as conversions
    from .models import create_model
    from .train.config import _parse_key_values

    try:
        extra = _parse_key_values(args.model_kwargs, "--model-kwargs")
    except ValueError as exc:
        parser.error(str(exc))
    state_dict = conversions.load_state_dict_file(args.source)  # refuse a bad file before building anything
    model = create_model(args.model, **extra)
    conversions.load_checkpoint(model, state_dict, strict=True)
    if args.to == "safetensors":
        conversions.export_safetensors(model, args.destination)
    else:
        state = model.state_dict()
        if args.to == "timm":
            state = conversions.to_timm(state)
        elif args.to == "mmpretrain":
            state = conversions.to_mmpretrain(state)
        else:
            state = {"model": state}  # the official files wrap the weights this way
        torch.save(state, args.destination)
    print(f"wrote {args.destination} ({args.to} layout)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = ArgumentParser(
        prog="beitv2", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument(
        "command",
        choices=["demo", *TRAINING, "eval", "tokenize", "convert", "env"],
        help="what to run; COMMAND --help for its flags",
    )
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"beitv2 {__version__}")
        return 0
    command, rest = parser.parse_args(argv[:1]).command, argv[1:]
    try:
        return _run_command(command, rest)
    except _user_errors() as exc:  # a wrong option or file: say which, without a traceback
        if int(os.environ.get("RANK", "0")) == 0:  # the same line from every torchrun rank helps no one
            print(f"beitv2 {command}: error: {exc}", file=sys.stderr)
        return 2


def _option_value(argv: list[str], option: str) -> str | None:
    for i, item in enumerate(argv):
        if item == option and i + 1 < len(argv):
            return argv[i + 1]
        if item.startswith(option + "="):
            return item.split("=", 1)[1]
    return None


def _user_errors() -> tuple[type[Exception], ...]:
    from .models.convert import CheckpointMismatchError, CheckpointReadError
    from .train.config import ConfigError

    return ConfigError, CheckpointReadError, CheckpointMismatchError


def _run_command(command: str, rest: list[str]) -> int:
    if command == "env":
        ArgumentParser(prog="beitv2 env", description="Versions, devices and kernel backends: paste it into a bug "
                       "report.", allow_abbrev=False).parse_args(rest)  # fmt: skip
        from kernels.env import report

        print(report())
        return 0
    if command == "demo":
        from .demo import main as demo

        return demo(rest)
    if command == "tokenize":
        return tokenize(rest)
    if command == "convert":
        return convert(rest)
    if command == "eval":
        if _option_value(rest, "--task") == "segment":
            from .train.segment import evaluate_command
        else:
            from .train.finetune import evaluate_command

        return evaluate_command(rest)
    run_training(TRAINING[command], rest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
