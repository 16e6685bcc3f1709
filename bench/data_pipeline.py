"""Input-pipeline benchmark: images/s and CPU seconds per image of the pretraining and fine-tuning
data pipelines, ours against the official implementation (microsoft/unilm ``beit2/``), on the same
JPEG files, with 1 and N DataLoader workers.

    python -m bench.data_pipeline --unilm-dir ../unilm                 # both tasks, 1 and all cores
    python -m bench.data_pipeline --task pretrain --workers 1 --num-images 192
    python -m bench.data_pipeline --image-size 1000x750 --task pretrain  # larger files (DCT scaling pays)

Pipelines (``--pipelines``):

- ``official``: pretraining: ``DataAugmentationForBEiT`` (colour jitter 0.4, flip, one random
  resized crop resized for both views, ``ToTensor`` + ``Normalize`` of the student view, the
  official ``MaskingGenerator``) over the official ``ImageFolder`` (PIL decode), batched by a
  ``DataLoader`` with the default collate, as ``run_beitv2_pretraining.py`` builds it with the
  recipe's arguments (224/224 px, bicubic/bicubic, ``--min_crop_scale 0.2``, 75 masked patches,
  blocks of at least 16). Fine-tuning: ``build_transform(is_train=True)`` (timm's
  ``create_transform``: random resized crop, flip, RandAugment ``rand-m9-mstd0.5-inc1``, random
  erasing 0.25 "pixel") and timm's ``Mixup`` (0.8/1.0, smoothing 0.1) applied to each batch in the
  main process, where the official engine applies it.
- ``ours``: ``build_loader`` with ``PretrainTransform`` (float output: normalised in the workers)
  or ``FinetuneTransform`` + ``MixupCutmix``.
- ``ours-uint8``: uint8 views out of the workers (``uint8_output=True``); the float conversion and
  normalisation (for fine-tuning also erasing and mixup), which a GPU run does on the GPU, run here
  in the main process and are counted.
- ``ours-fast-decode`` (pretraining): ``ours-uint8`` with ``fast_decode=True``: each JPEG decoded at
  the smallest DCT scale that leaves the sampled crop at least as large as both views.
- ``ours-gpu`` (pretraining, by default only where CUDA is available): ``backend="gpu"``: the
  workers read bytes and draw, the main process decodes the batch with nvJPEG and makes both views
  on the GPU (``--device``); the batches are finished on the GPU and the time is synchronised.

Measurement: the files (``--num-images`` JPEGs of ``--image-size`` at quality 90, cut from the
built-in photographs, in the ImageNet folder layout) are written once to a temporary folder.
Each (pipeline, workers) run builds a fresh loader, reads ``--warmup`` batches, then times
``--batches`` batches; the epoch is longer than that by more than the prefetched batches, so the
workers stay busy through the window and the work done in it is the work handed out. CPU time is
the main process's (all threads) plus its worker processes' (``/proc/<pid>/stat``), read at both
ends of the window. ``img/s/core`` is images per CPU second, the speed one core gives; the ratio
column divides it by the official pipeline's. The runs go round-robin over the pipelines
(``--repeats`` rounds, the median kept), so a machine busy with other work slows all alike.

``--psnr`` adds the fast decode's check: the same draws (seed per file) with and without
``fast_decode``: the share of crops whose geometry differs (must be 0), the share decoded at a
reduced scale, and the PSNR of the views against the full decode's.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import PIL.Image
import torch

from . import _common

PRETRAIN_PIPELINES = ("official", "ours", "ours-uint8", "ours-fast-decode", "ours-gpu")
FINETUNE_PIPELINES = ("official", "ours", "ours-uint8")
CLK_TCK = os.sysconf("SC_CLK_TCK")
NUM_CLASSES = 1000  # the fine-tuning head's classes (mixup's soft targets); the files have fewer


# --------------------------------------------------------------------------------------------
# Test files
# --------------------------------------------------------------------------------------------
def write_test_images(root: str, count: int, size: tuple[int, int] = (500, 375), quality: int = 90) -> str:
    """``count`` JPEGs in the ImageNet layout ``root/<photo>/<index>.JPEG``: random crops (half to
    all of each side) of the built-in photographs, resized to ``size`` (landscape crops) or its
    transpose (portrait ones). Returns ``root``."""
    from beitv2_fast.data.datasets import DEMO_PHOTOS, demo_photo

    rng = np.random.default_rng(0)
    for index in range(count):
        name = DEMO_PHOTOS[index % len(DEMO_PHOTOS)]
        photo = PIL.Image.fromarray(demo_photo(name))
        scale = rng.uniform(0.5, 1.0)
        width, height = int(photo.width * scale), int(photo.height * scale)
        left, top = int(rng.integers(0, photo.width - width + 1)), int(rng.integers(0, photo.height - height + 1))
        out_size = size if width >= height else size[::-1]
        image = photo.resize(out_size, PIL.Image.Resampling.BICUBIC, box=(left, top, left + width, top + height))
        os.makedirs(os.path.join(root, name), exist_ok=True)
        image.save(os.path.join(root, name, f"{index:05d}.JPEG"), quality=quality)
    return root


# --------------------------------------------------------------------------------------------
# CPU time of this process and its workers
# --------------------------------------------------------------------------------------------
def _children_cpu_seconds() -> float:
    """utime + stime of this process's live child processes (the DataLoader workers)."""
    me, total = os.getpid(), 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # fields after the name: state, ppid, ...; utime, stime are 14th, 15th
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def cpu_seconds() -> float:
    return time.process_time() + _children_cpu_seconds()


# --------------------------------------------------------------------------------------------
# The pipelines
# --------------------------------------------------------------------------------------------
def import_official(unilm_dir: str):
    """The reference's ``datasets.py`` (with its ``transforms``, ``masking_generator`` and
    ``dataset_folder``) under a private name, so that no installed ``datasets`` package shadows it."""
    from .reference import unilm

    path = unilm.find_beit2(unilm_dir)
    if path not in sys.path:
        sys.path.insert(0, path)
    spec = importlib.util.spec_from_file_location("unilm_beit2_datasets", os.path.join(path, "datasets.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def official_args() -> argparse.Namespace:
    """The recipe's arguments (``PRETRAINING.md``, ``run_class_finetuning.py`` defaults)."""
    return argparse.Namespace(
        imagenet_default_mean_and_std=True, input_size=224, second_input_size=224, min_crop_scale=0.2,
        train_interpolation="bicubic", second_interpolation="bicubic", window_size=(14, 14),
        num_mask_patches=75, max_mask_patches_per_block=None, min_mask_patches_per_block=16,
        color_jitter=0.4, aa="rand-m9-mstd0.5-inc1", reprob=0.25, remode="pixel", recount=1,
    )  # fmt: skip


class OfficialLoader:
    """The official dataset and transform in a ``DataLoader``; fine-tuning batches go through
    timm's ``Mixup`` in this process."""

    def __init__(self, official, task: str, root: str, batch_size: int, workers: int, seed: int) -> None:
        args = official_args()
        if task == "pretrain":
            transform = official.DataAugmentationForBEiT(args)
            self.mixup = None
        else:
            from timm.data.mixup import Mixup

            transform = official.build_transform(True, args)
            self.mixup = Mixup(
                mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=NUM_CLASSES, mode="batch"
            )
        dataset = official.ImageFolder(root, transform=transform)
        self.dataloader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.dataloader)

    def __iter__(self):
        for batch in self.dataloader:
            if self.mixup is not None:
                images, labels = batch
                batch = self.mixup(images, labels)
            yield batch


def build_ours(pipeline: str, task: str, root: str, batch_size: int, workers: int, seed: int, device: str = "cpu"):
    from beitv2_fast.data import (
        FinetuneTransform,
        ImageFolderDataset,
        MaskingGenerator,
        MixupCutmix,
        PretrainTransform,
        build_loader,
    )

    dataset = ImageFolderDataset(root)
    uint8 = pipeline != "ours"
    common = {"batch_size": batch_size, "seed": seed, "num_workers": workers, "prefetch_factor": 2}
    if task == "pretrain":
        transform = PretrainTransform(
            224, 224, min_crop_scale=0.2, uint8_output=uint8, fast_decode=pipeline == "ours-fast-decode"
        )
        if pipeline == "ours-gpu":
            common.update(backend="gpu", device=device)
        return build_loader("pretrain", dataset, transform=transform, masking=MaskingGenerator(14, 75, 16), **common)
    mixup = MixupCutmix(NUM_CLASSES, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    transform = FinetuneTransform(224, uint8_output=uint8)
    return build_loader("classification", dataset, transform=transform, mixup=mixup, **common)


def _batches(loader):
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def measure(loader, batch_size: int, warmup: int, batches: int, device: str) -> dict:
    """Images/s and CPU seconds per image over ``batches`` batches after ``warmup``."""
    synchronize = torch.cuda.synchronize if device == "cuda" else lambda: None
    iterator = _batches(loader)
    for _ in range(warmup):
        next(iterator)
    synchronize()
    wall, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
        next(iterator)
    synchronize()
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    iterator.close()
    images = batches * batch_size
    return {"img_per_s": images / wall, "cpu_ms_per_img": 1e3 * cpu / images}


# --------------------------------------------------------------------------------------------
# The fast decode's check
# --------------------------------------------------------------------------------------------
def same_draws(a: dict, b: dict) -> bool:
    """Whether two ``PretrainTransform.sample_params`` results are the same draws."""
    if a["flip"] != b["flip"] or a["box"] != b["box"] or (a["jitter"] is None) != (b["jitter"] is None):
        return False
    return a["jitter"] is None or all(
        torch.equal(v, b["jitter"][k]) if isinstance(v, torch.Tensor) else v == b["jitter"][k]
        for k, v in a["jitter"].items()
    )


def fast_decode_check(root: str, num_images: int) -> dict:
    """Geometry and PSNR of ``fast_decode`` against the full decode, on the same draws."""
    from beitv2_fast.data import ImageFolderDataset, PretrainTransform
    from beitv2_fast.data.decode import decode_for_crop

    dataset = ImageFolderDataset(root)
    full = PretrainTransform(224, 224, min_crop_scale=0.2, uint8_output=True)
    fast = PretrainTransform(224, 224, min_crop_scale=0.2, uint8_output=True, fast_decode=True)
    squared_errors, moved, reduced = [], 0, 0
    count = min(num_images, len(dataset))
    for index in range(count):
        path = dataset.path(index)
        torch.manual_seed(index)
        decoded = decode_for_crop(path, fast)
        torch.manual_seed(index)
        reference_params = full.sample_params(*decoded.full_size)
        moved += not same_draws(reference_params, decoded.params)
        reduced += decoded.reduction > 1
        torch.manual_seed(index)
        expected = full(dataset._decode(index))
        got = fast(decoded)
        for a, b in zip(expected, got, strict=True):
            squared_errors.append(float(((a.double() - b.double()) ** 2).mean()))
    mse = statistics.mean(squared_errors)
    worst = max(squared_errors)
    return {
        "images": count,
        "geometry_differs": moved / count,
        "reduced_share": reduced / count,
        "psnr_db": math.inf if mse == 0 else 10 * math.log10(255**2 / mse),
        "worst_view_psnr_db": math.inf if worst == 0 else 10 * math.log10(255**2 / worst),
    }


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 500x375; got {text!r}") from None
    if width < 64 or height < 64:
        raise argparse.ArgumentTypeError(f"the images must be at least 64x64; got {text!r}")
    return width, height


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", nargs="+", choices=("pretrain", "finetune"), default=["pretrain", "finetune"])
    parser.add_argument("--pipelines", nargs="+", choices=PRETRAIN_PIPELINES, default=None)
    parser.add_argument(
        "--workers", nargs="+", type=int, default=None, help="DataLoader workers (default: 1 and all cores)"
    )
    parser.add_argument("--num-images", type=int, default=320, help="JPEG files written (default 320)")
    parser.add_argument("--image-size", type=_size, default=(500, 375), help="WIDTHxHEIGHT of the files (500x375)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3, help="batches read before the window")
    parser.add_argument("--batches", type=int, default=None, help="batches timed (default: what the epoch allows)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the pipelines; the median is kept")
    parser.add_argument("--data-dir", default="", help="an ImageNet-layout folder of JPEGs to read instead")
    parser.add_argument("--psnr", action="store_true", help="check fast_decode's geometry and PSNR too")
    parser.add_argument(
        "--unilm-dir", default=os.environ.get("BEITV2_UNILM_DIR", ""),
        help="a checkout of microsoft/unilm (or its beit2/) for the official pipeline ($BEITV2_UNILM_DIR)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
        help="where ours-gpu decodes (default: cuda when available)",
    )  # fmt: skip
    parser.add_argument("--markdown", default="", help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    if args.pipelines is None:
        args.pipelines = [p for p in PRETRAIN_PIPELINES if p != "ours-gpu" or torch.cuda.is_available()]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (use --device cpu)")
    args.workers = args.workers or sorted({1, os.cpu_count() or 1})
    if min(args.workers) < 1:
        parser.error("--workers must be at least 1 (the CPU time is counted in worker processes)")
    if args.batch_size < 1 or args.num_images < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error("--batch-size, --num-images and --repeats must be at least 1, --warmup at least 0")
    prefetched = 2 * max(args.workers)
    epoch = args.num_images // args.batch_size
    # By default the window ends before the epoch does, with the workers still busy (see above);
    # a longer --batches reads on into the next epochs.
    args.batches = args.batches or epoch - args.warmup - prefetched
    if args.batches < 1 or epoch < 1:
        parser.error(
            f"--num-images {args.num_images} gives {epoch} batches of {args.batch_size}: too few for --warmup "
            f"{args.warmup} and {prefetched} prefetched; write more images or give --batches"
        )
    if args.data_dir and not os.path.isdir(args.data_dir):
        parser.error(f"--data-dir {args.data_dir!r} is not a folder")
    if args.unilm_dir:
        from .reference import unilm

        try:
            unilm.find_beit2(args.unilm_dir)
        except ValueError as error:
            parser.error(str(error))
    elif "official" in args.pipelines:
        print("no --unilm-dir: the official pipeline is left out", file=sys.stderr)
        args.pipelines = [p for p in args.pipelines if p != "official"]
    return args


def run(args: argparse.Namespace, root: str) -> list[dict]:
    warnings.simplefilter("ignore", UserWarning)
    torch.set_num_threads(1)  # the main process collates; the workers run one thread each, as DataLoader sets
    official = import_official(args.unilm_dir) if "official" in args.pipelines else None
    env = _common.environment(torch.device("cpu"))
    rows = []
    for task in args.task:
        pipelines = [p for p in args.pipelines if task == "pretrain" or p in FINETUNE_PIPELINES]
        for workers in args.workers:
            samples: dict[str, list[dict]] = {p: [] for p in pipelines}
            for _ in range(args.repeats):
                for pipeline in pipelines:
                    if pipeline == "official":
                        loader = OfficialLoader(official, task, root, args.batch_size, workers, args.seed)
                    else:
                        loader = build_ours(pipeline, task, root, args.batch_size, workers, args.seed, args.device)
                    device = args.device if pipeline == "ours-gpu" else "cpu"
                    samples[pipeline].append(measure(loader, args.batch_size, args.warmup, args.batches, device))
                    del loader
            baseline = None
            for pipeline in pipelines:
                row = {key: statistics.median(s[key] for s in samples[pipeline]) for key in samples[pipeline][0]}
                per_core = 1e3 / row["cpu_ms_per_img"]
                baseline = per_core if pipeline == "official" else baseline
                rows.append({
                    **env, "task": task, "pipeline": pipeline, "workers": workers,
                    "decode": args.device if pipeline == "ours-gpu" else "cpu",
                    "images": f"{args.image_size[0]}x{args.image_size[1]}", "batch": args.batch_size,
                    "img_per_s": f"{row['img_per_s']:.1f}", "cpu_ms_per_img": f"{row['cpu_ms_per_img']:.2f}",
                    "img_per_s_per_core": f"{per_core:.1f}",
                    "per_core_vs_official": f"{per_core / baseline:.2f}x" if baseline else "",
                })  # fmt: skip
                print(_common.format_table(rows[-1:], COLUMNS).splitlines()[-1], file=sys.stderr, flush=True)
    return rows


COLUMNS = (
    "task", "pipeline", "workers", "decode", "images", "batch", "img_per_s", "cpu_ms_per_img", "img_per_s_per_core",
    "per_core_vs_official",
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="beitv2-data-bench-") as scratch:
        root = args.data_dir or write_test_images(scratch, args.num_images, args.image_size)
        rows = run(args, root)
        check = fast_decode_check(root, args.num_images) if args.psnr else None
    device = _common.device_name(torch.device("cpu"))
    lines = [f"data pipeline on {device}, torch {torch.__version__}, Pillow {PIL.__version__}", ""]
    lines.append(_common.markdown_table(rows, COLUMNS))
    if check is not None:
        lines += [
            "",
            f"fast decode against the full decode, {check['images']} files of {args.image_size[0]}x"
            f"{args.image_size[1]}: crop geometry differs for {check['geometry_differs']:.0%} of them, "
            f"{check['reduced_share']:.0%} decoded at a reduced DCT scale, PSNR of the views "
            f"{check['psnr_db']:.1f} dB (worst view {check['worst_view_psnr_db']:.1f} dB)",
        ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as out:
            out.write(text + "\n\n")
    _common.append_csv(rows, os.path.join(_common.RESULTS_DIR, "data_pipeline.csv"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
