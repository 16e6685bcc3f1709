"""The CPU data pipeline: block-wise masks, JPEG decoding and the training transforms.

With ``BEITV2_UNILM_DIR`` (a microsoft/unilm checkout) the reference's mask generator runs beside ours.
"""

from __future__ import annotations

import io
import os
import random

import numpy as np
import PIL.Image
import pytest

from beitv2_fast.data import MaskingGenerator, PretrainTransform, TokenizerTransform, decode_image

UNILM_DIR = os.environ.get("BEITV2_UNILM_DIR", "")


@pytest.fixture(scope="module")
def photo() -> PIL.Image.Image:
    """An ImageNet-sized picture (500 x 375) with smooth structure, so that JPEG sizes are typical."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:375, 0:500]
    base = np.stack([np.sin(rows / 23.0), np.cos(cols / 17.0), np.sin((rows + cols) / 31.0)], axis=-1)
    pixels = (127.5 * (1 + base) + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
    return PIL.Image.fromarray(pixels)


@pytest.fixture(scope="module")
def jpeg_bytes(photo) -> bytes:
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("num_masks", [75, 118])  # the BEiT v2 recipe, and a 60% ratio
def test_masking_ours(benchmark, num_masks):
    benchmark.group = f"mask generator 14x14, {num_masks} patches"
    generator = MaskingGenerator(14, num_masks, min_num_patches=16)
    rng = np.random.default_rng(0)
    mask = benchmark(generator, rng)
    assert mask.sum() == num_masks


@pytest.mark.skipif(not UNILM_DIR, reason="set BEITV2_UNILM_DIR to a microsoft/unilm checkout")
@pytest.mark.parametrize("num_masks", [75, 118])
def test_masking_reference(benchmark, num_masks):
    import importlib.util

    from reference import unilm

    path = os.path.join(unilm.find_beit2(UNILM_DIR), "masking_generator.py")
    spec = importlib.util.spec_from_file_location("unilm_masking_generator", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    benchmark.group = f"mask generator 14x14, {num_masks} patches"
    generator = module.MaskingGenerator((14, 14), num_masks, min_num_patches=16)
    random.seed(0)
    mask = benchmark(generator)
    assert mask.sum() == num_masks


def test_decode_jpeg(benchmark, jpeg_bytes):
    benchmark.group = "decode a 500x375 JPEG"
    image = benchmark(lambda: decode_image(io.BytesIO(jpeg_bytes)))
    assert image.size == (500, 375)


def test_pretrain_transform(benchmark, photo):
    benchmark.group = "transforms of one image"
    transform = PretrainTransform(224, 224)
    student, tokenizer = benchmark(transform, photo)
    assert student.shape[-2:] == tokenizer.shape[-2:] == (224, 224)


def test_tokenizer_transform(benchmark, photo):
    benchmark.group = "transforms of one image"
    image = benchmark(TokenizerTransform(224), photo)
    assert image.shape[-2:] == (224, 224)
