"""The CPU pipeline's speed-ups that must not change the data: colour jitter by lookup tables
(byte for byte torchvision's), and decoding at a reduced DCT scale (``fast_decode``: the same
draws, crops and masks, pixels within resampling noise; bad files replaced as without it); and
the loader's worker count from the cores per local rank."""

import math

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from beitv2_fast.data import DemoImages, ImageFolderDataset, MaskingGenerator, PretrainTransform, build_loader
from beitv2_fast.data.color import color_jitter
from beitv2_fast.data.datasets import demo_photo
from beitv2_fast.data.decode import CropDecoded, decode_for_crop, reduction_for
from beitv2_fast.data.transforms import _PIL_RESAMPLING
from beitv2_fast.train.config import ConfigError, TrainConfig


def _write_jpegs(folder, sizes, quality=90):
    photo = PIL.Image.fromarray(demo_photo("coffee"))
    (folder / "a").mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        photo.resize(size, PIL.Image.Resampling.BICUBIC).save(folder / "a" / f"{i:03d}.JPEG", quality=quality)
    return folder


def test_color_jitter_is_torchvisions_byte_for_byte():
    image = PIL.Image.fromarray(demo_photo("astronaut")).resize((96, 80))
    jitter = v2.ColorJitter(0.4, 0.4, 0.4, 0.1)
    torch.manual_seed(0)
    for _ in range(16):  # most orders of the four ops come up
        params = jitter.make_params([])
        assert np.array_equal(np.asarray(color_jitter(image, params)), np.asarray(jitter.transform(image, params)))


def test_color_jitter_of_a_region_is_the_whole_images_jitter_cropped():
    image = PIL.Image.fromarray(demo_photo("astronaut")).resize((61, 47))
    generator = np.random.default_rng(0)
    torch.manual_seed(0)
    for jitter in (v2.ColorJitter(0.4, 0.4, 0.4, 0.1), v2.ColorJitter(0.4, 0, 0.4)):  # with and without contrast
        for _ in range(12):
            params = jitter.make_params([])
            left, right = sorted(generator.integers(0, 62, 2) + [0, 1])
            upper, lower = sorted(generator.integers(0, 48, 2) + [0, 1])
            region = (int(left), int(upper), int(right), int(lower))
            whole = color_jitter(image, params)
            assert np.array_equal(np.asarray(color_jitter(image, params, region)), np.asarray(whole.crop(region)))


def _views_of_the_jittered_whole_image(transform, image, params, reduction, full_width):
    """The views as the reference orders the work: jitter and flip the whole image, then crop."""
    image = color_jitter(image, params["jitter"])
    box, views = params["box"], []
    for size, mode in zip(
        transform.output_sizes, (transform.interpolation, transform.second_interpolation), strict=True
    ):
        if reduction == 1:
            flipped = F.horizontal_flip(image) if params["flip"] else image
            view = F.resized_crop(flipped, **box, size=list(size), interpolation=mode)
        else:
            left = full_width - box["left"] - box["width"] if params["flip"] else box["left"]
            region = [v / reduction for v in (left, box["top"], left + box["width"], box["top"] + box["height"])]
            view = image.resize(size[::-1], _PIL_RESAMPLING[mode], box=region)
            view = F.horizontal_flip(view) if params["flip"] else view
        views.append(F.pil_to_tensor(view))
    return views


@pytest.mark.parametrize(
    ("sizes", "modes"),
    [
        ((24, 24), ("bicubic", "bicubic")),
        ((20, (12, 16)), ("bilinear", "lanczos")),
        ((20, (9, 31)), ("nearest", "box")),
    ],
)
def test_pretrain_views_jitter_only_the_pixels_they_read(sizes, modes):
    """Byte for byte the views of the whole-image jitter, the flip and the crop, for full-size and
    reduced (fast decode) images, crops large and small, touching the borders or not."""
    photo = PIL.Image.fromarray(demo_photo("chelsea"))
    transform = PretrainTransform(*sizes, min_crop_scale=0.05, interpolation=modes[0], second_interpolation=modes[1])
    transform.uint8_output = True
    for seed in range(40):
        full_size = [(500, 375), (90, 61), (37, 130), (24, 24)][seed % 4]
        reduction = [1, 2, 4][seed % 3]
        torch.manual_seed(seed)
        if seed % 5 == 0:
            transform.crop.scale = (1.0, 1.0)  # boxes the size of the image: touching every border
        params = transform.sample_params(*full_size)
        transform.crop.scale = (0.05, 1.0)
        image = photo.resize(tuple(-(-s // reduction) for s in full_size), PIL.Image.Resampling.BILINEAR)
        got = transform(CropDecoded(image, params, tuple(full_size), reduction))
        expected = _views_of_the_jittered_whole_image(transform, image, params, reduction, full_size[0])
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), (seed, params)


def test_reduction_keeps_the_box_at_least_as_large_as_each_view():
    views = [(224, 224), (112, 160)]
    assert reduction_for({"height": 447, "width": 900}, views) == 1
    assert reduction_for({"height": 448, "width": 448}, views) == 2
    assert reduction_for({"height": 1800, "width": 1000}, views) == 4
    assert reduction_for({"height": 1792, "width": 1792}, views) == 8


def test_fast_decode_draws_the_same_crops_and_keeps_the_pixels(tmp_path):
    root = _write_jpegs(tmp_path, [(600, 450)])
    path = str(next((root / "a").iterdir()))
    full = PretrainTransform(160, 144, min_crop_scale=0.2, uint8_output=True)
    fast = PretrainTransform(160, 144, min_crop_scale=0.2, uint8_output=True, fast_decode=True)
    reductions = set()
    for seed in range(8):
        torch.manual_seed(seed)
        decoded = decode_for_crop(path, fast)
        torch.manual_seed(seed)
        expected_params = full.sample_params(600, 450)
        assert decoded.params["box"] == expected_params["box"] and decoded.params["flip"] == expected_params["flip"]
        assert decoded.image.size == tuple(-(-s // decoded.reduction) for s in (600, 450))
        reductions.add(decoded.reduction)
        torch.manual_seed(seed)
        expected = full(ImageFolderDataset(root)._decode(0))
        for want, got in zip(expected, fast(decoded), strict=True):
            mse = float(((want.double() - got.double()) ** 2).mean())
            if decoded.reduction == 1:
                assert mse == 0  # a crop too small to reduce decodes exactly as without the option
            else:
                assert 10 * math.log10(255**2 / mse) > 30, f"seed {seed}: PSNR below 30 dB"
    assert reductions == {1, 2}  # both paths were exercised


def test_fast_decode_loader_gives_the_same_batches_and_replaces_bad_files(tmp_path):
    root = _write_jpegs(tmp_path, [(60, 45), (45, 60)] * 4)
    bad = root / "a" / "003.JPEG"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # the header reads, the pixels do not
    batches, skipped = [], []
    for fast_decode in (False, True):
        transform = PretrainTransform(32, 32, min_crop_scale=0.2, uint8_output=True, fast_decode=fast_decode)
        loader = build_loader(
            "pretrain", ImageFolderDataset(root), batch_size=4, transform=transform,
            masking=MaskingGenerator(2, 2, min_num_patches=1), seed=3, num_workers=0,
        )  # fmt: skip
        with pytest.warns(UserWarning, match="skipped unreadable image"):
            batches.append(list(loader))
        skipped.append(loader.num_skipped)
    assert skipped == [1, 1]
    for plain, fast in zip(*batches, strict=True):
        for a, b in zip(plain, fast, strict=True):
            assert torch.equal(a, b)  # 32 px views of < 64 px files: never reduced, so exactly equal


def test_fast_decode_needs_files():
    transform = PretrainTransform(32, 32, fast_decode=True)
    with pytest.raises(TypeError, match="fast_decode"):
        build_loader("pretrain", DemoImages(crops_per_photo=1, photos=("coffee",)), batch_size=2, transform=transform,
                     masking=MaskingGenerator(2, 2, min_num_patches=1), num_workers=0)  # fmt: skip


def test_fast_decode_option_needs_a_folder_and_the_cpu_backend(tmp_path):
    options = {"task": "tokenizer", "teacher": "hog", "fast_decode": True}
    with pytest.raises(ConfigError, match="--fast-decode reads JPEG files on the CPU"):
        TrainConfig(**options).validate()
    with pytest.raises(ConfigError, match="--fast-decode reads JPEG files on the CPU"):
        TrainConfig(**options, data_dir=str(tmp_path), data_backend="gpu").validate()
    TrainConfig(**options, data_dir=str(tmp_path)).validate()
