"""Transforms: shapes, ranges, the two views' shared crop, seeding, RandAugment against timm, mixup."""

import math

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from beitv2_fast.data.datasets import demo_photo
from beitv2_fast.data.finetune_transforms import FinetuneTransform
from beitv2_fast.data.mixup import MixupCutmix
from beitv2_fast.data.randaugment import RandAugment, apply_rand_augment_op, rand_augment_argument
from beitv2_fast.data.transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    EvalTransform,
    Normalize,
    PretrainTransform,
    TokenizerTransform,
)

MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def photo():
    return PIL.Image.fromarray(demo_photo("chelsea"))  # 451 x 300, not square


def _seeded(fn, seed, *args):
    torch.manual_seed(seed)
    return fn(*args)


@pytest.mark.parametrize("sizes", [(224, 224), (64, 32), (96, 96)])
def test_pretrain_views_shapes_dtypes_ranges(photo, sizes):
    transform = PretrainTransform(*sizes)
    student, tokenizer = transform(photo)
    assert student.shape == (3, sizes[0], sizes[0]) and student.dtype == torch.float32
    assert tokenizer.shape == (3, sizes[1], sizes[1]) and tokenizer.dtype == torch.float32
    assert 0 <= tokenizer.min() and tokenizer.max() <= 1
    pixels = student * STD + MEAN  # back to [0, 1]
    assert pixels.min() > -1e-6 and pixels.max() < 1 + 1e-6
    assert student.mean().abs() < 1.5  # normalised, not raw


def test_pretrain_views_come_from_one_crop(photo):
    # Same size and interpolation: the de-normalised student view IS the tokenizer view.
    for seed in range(5):
        student, tokenizer = _seeded(PretrainTransform(96, 96), seed, photo)
        torch.testing.assert_close(student * STD + MEAN, tokenizer, atol=1e-6, rtol=0)
    # Different sizes: the student view downsampled matches the tokenizer view far better than
    # a view of another crop does.
    transform = PretrainTransform(128, 64)
    for seed in range(5):
        student, tokenizer = _seeded(transform, seed, photo)
        _, other = _seeded(transform, seed + 100, photo)
        small = F.resize(student * STD + MEAN, [64, 64], interpolation=InterpolationMode.BICUBIC, antialias=True)
        same = (small - tokenizer).abs().mean()
        assert same < 0.02, same
        assert same < 0.3 * (other - tokenizer).abs().mean()


def test_pretrain_crop_flip_and_jitter_parameters():
    transform = PretrainTransform(224, 224)
    torch.manual_seed(0)
    draws = [transform.sample_params(451, 300) for _ in range(600)]
    areas = np.array([d["box"]["height"] * d["box"]["width"] / (451 * 300) for d in draws])
    ratios = np.array([d["box"]["width"] / d["box"]["height"] for d in draws])
    assert areas.min() >= 0.2 - 0.01 and areas.max() <= 1.0  # --min_crop_scale 0.2
    assert ratios.min() >= 3 / 4 - 0.02 and ratios.max() <= 4 / 3 + 0.02
    flips = np.mean([d["flip"] for d in draws])
    assert abs(flips - 0.5) < 4 * math.sqrt(0.25 / len(draws))
    factors = np.array([[d["jitter"][f"{k}_factor"] for k in ("brightness", "contrast", "saturation")] for d in draws])
    assert factors.min() >= 0.6 and factors.max() <= 1.4 and factors.std() > 0.15  # ColorJitter(0.4) = U(0.6, 1.4)
    assert all(d["jitter"]["hue_factor"] is None for d in draws)


def test_pretrain_is_seeded(photo):
    transform = PretrainTransform(64, 64)
    a = _seeded(transform, 3, photo)
    b = _seeded(transform, 3, photo)
    c = _seeded(transform, 4, photo)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_uint8_output_then_finish_equals_the_float_path(photo):
    float_views = _seeded(PretrainTransform(64, 32), 1, photo)
    transform = PretrainTransform(64, 32, uint8_output=True)
    raw = _seeded(transform, 1, photo)
    assert all(v.dtype == torch.uint8 for v in raw)
    for finished, expected in zip(transform.finish(*raw), float_views, strict=True):
        assert torch.equal(finished, expected)
    batch = transform.finish(*(v.unsqueeze(0).repeat(2, 1, 1, 1) for v in raw))  # batched, as on the GPU
    assert torch.equal(batch[0][1], float_views[0])


def test_normalize_checks_dtype():
    with pytest.raises(TypeError, match="uint8"):
        Normalize()(torch.zeros(3, 2, 2))


def test_tokenizer_transform(photo):
    out = _seeded(TokenizerTransform(64), 0, photo)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, _seeded(TokenizerTransform(64), 0, photo))


def test_eval_transform_resizes_then_centre_crops(photo):
    out = EvalTransform(224)(photo)
    resized = photo.resize((int(451 * 256 / 300), 256), PIL.Image.Resampling.BICUBIC)
    left, top = (resized.width - 224) / 2, (resized.height - 224) / 2
    expected = resized.crop((round(left), round(top), round(left) + 224, round(top) + 224))
    expected = (F.pil_to_tensor(expected).float() / 255 - MEAN) / STD
    assert out.shape == (3, 224, 224)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert EvalTransform(224).crop_pct == 224 / 256 and EvalTransform(384).crop_pct == 1.0
    unnormalised = EvalTransform(64, mean=None, std=None)(photo)
    assert 0 <= unnormalised.min() and unnormalised.max() <= 1


def test_finetune_transform_and_batched_erasing(photo):
    out = _seeded(FinetuneTransform(64), 0, photo)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    transform = FinetuneTransform(64, reprob=1.0, uint8_output=True)
    raw = _seeded(transform, 0, photo)
    assert raw.dtype == torch.uint8
    torch.manual_seed(0)
    batch = transform.finish(raw.unsqueeze(0).repeat(4, 1, 1, 1))
    clean = transform.normalize(raw)
    erased = [(b != clean).any(0) for b in batch]  # erasing writes N(0, 1) noise into one box per image
    assert all(e.any() for e in erased)
    assert not all(torch.equal(erased[0], e) for e in erased[1:]), "every image needs its own box"


def test_rand_augment_config_parsing():
    ra = RandAugment.from_config("rand-m9-mstd0.5-inc1")
    assert (ra.magnitude, ra.num_ops, ra.magnitude_std, ra.prob) == (9, 2, 0.5, 0.5)
    assert "SolarizeIncreasing" in ra.ops and len(ra.ops) == 15
    assert RandAugment.from_config("rand-m7-n3-inc0").ops[4] == "Posterize"
    with pytest.raises(ValueError, match="unknown section"):
        RandAugment.from_config("rand-m9-zz1")


def test_rand_augment_ops_match_timm(photo):
    aa = pytest.importorskip("timm.data.auto_augment")
    import random

    image = photo.resize((120, 80))
    fill = (124, 116, 104)
    hparams = {"translate_const": 100, "img_mean": fill, "interpolation": PIL.Image.Resampling.BICUBIC}
    names = set(RandAugment(increasing=True).ops) | set(RandAugment(increasing=False).ops)
    for name in sorted(names):
        for magnitude in (3.0, 9.0):
            for negate in (False, True):
                argument = rand_augment_argument(name, magnitude, negate)
                if aa.LEVEL_TO_ARG[name] is not None:
                    # timm negates when random.random() > 0.5: find a seed that agrees with `negate`.
                    seed = next(s for s in range(100) if (random.seed(s) or random.random() > 0.5) == negate)
                    random.seed(seed)
                    (timm_argument,) = aa.LEVEL_TO_ARG[name](magnitude, hparams)
                    assert timm_argument == pytest.approx(argument), name
                    args = (timm_argument,)
                else:
                    args = ()
                expected = aa.NAME_TO_OP[name](image, *args, fillcolor=fill, resample=PIL.Image.Resampling.BICUBIC)
                ours = apply_rand_augment_op(image, name, argument, fill=fill, interpolation=InterpolationMode.BICUBIC)
                difference = np.abs(np.asarray(ours, dtype=int) - np.asarray(expected, dtype=int))
                assert difference.max() <= 1, (name, magnitude, negate, difference.max())


def test_rand_augment_edge_magnitudes(photo):
    # Magnitude 10 keeps 0 bits in PosterizeIncreasing (Pillow >= 11 refuses bits=0): black.
    black = apply_rand_augment_op(
        photo,
        "PosterizeIncreasing",
        rand_augment_argument("PosterizeIncreasing", 10, False),
        fill=(0, 0, 0),
        interpolation=InterpolationMode.BICUBIC,
    )
    assert np.asarray(black).max() == 0
    tensor = F.pil_to_tensor(photo)
    added = apply_rand_augment_op(tensor, "SolarizeAdd", 100, fill=(0, 0, 0), interpolation=InterpolationMode.BICUBIC)
    expected = F.pil_to_tensor(
        apply_rand_augment_op(photo, "SolarizeAdd", 100, fill=(0, 0, 0), interpolation=InterpolationMode.BICUBIC)
    )
    assert torch.equal(added, expected)


def test_rand_augment_applies_ops_at_the_expected_rate(photo):
    # Two ops, each applied with probability 1/2: about one op per image.
    image = photo.resize((48, 32))
    ra = RandAugment()
    torch.manual_seed(0)
    changed = np.mean([not np.array_equal(np.asarray(ra(image)), np.asarray(image)) for _ in range(300)])
    assert 0.6 < changed < 0.85, changed  # 1 - 1/4 = 0.75 minus ops that leave this image unchanged


def _lam_from_mixup(images, mixed):
    rolled = images.roll(1, 0)
    a, b = (images - rolled).flatten(), (mixed - rolled).flatten()
    return float((a @ b) / (a @ a))


def test_mixup_targets_are_smoothed_mixes():
    torch.manual_seed(0)
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    mix = MixupCutmix(5, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1)
    mixed, targets = mix(images.clone(), labels)
    lam = _lam_from_mixup(images, mixed)
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.roll(1, 0))

    def smooth(y):
        return torch.nn.functional.one_hot(y, 5).float() * 0.9 + 0.1 / 5

    torch.testing.assert_close(targets, lam * smooth(labels) + (1 - lam) * smooth(labels.roll(1)))


def test_cutmix_targets_follow_the_pasted_area():
    torch.manual_seed(1)
    images, labels = torch.rand(4, 3, 16, 16) + torch.arange(4).view(4, 1, 1, 1), torch.tensor([0, 1, 2, 3])
    mixed, targets = MixupCutmix(4, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0)(images.clone(), labels)
    pasted = (mixed != images).any(1).float().mean((1, 2))  # share of pixels from the rolled image
    torch.testing.assert_close(targets[torch.arange(4), labels.roll(1)], pasted)
    assert torch.allclose(targets.sum(1), torch.ones(4))


def test_mixup_switch_and_no_mix():
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    _, targets = MixupCutmix(4, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1)(images, labels)
    expected = torch.full((4, 4), 0.1 / 4) + 0.9 * torch.eye(4)
    torch.testing.assert_close(targets, expected)  # timm: on = 1 - s + s/K, off = s/K
    with pytest.raises(ValueError, match="num_classes"):
        MixupCutmix(0)
