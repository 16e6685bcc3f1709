"""The GPU-decode backend (``backend="gpu"``): its CPU-side logic on the CPU (batched decode by
torchvision's CPU decoder, the same tensor ops), against the torch backend with the same seed:
the same order, crop geometry, masks, replaced files and resume; pixels within resampling noise.
The ``cuda`` test checks the same on the GPU."""

import math

import PIL.Image
import pytest
import torch

from beitv2_fast.data import (
    IMAGENET_DEFAULT_STD,
    ImageFolderDataset,
    MaskingGenerator,
    PretrainTransform,
    build_loader,
    gpu_decode,
)
from beitv2_fast.data.datasets import demo_photo
from beitv2_fast.train.config import ConfigError, TrainConfig


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    (root / "a").mkdir()
    for i, (name, size) in enumerate([("coffee", (120, 90)), ("chelsea", (90, 120)), ("astronaut", (100, 100))] * 3):
        PIL.Image.fromarray(demo_photo(name)).resize(size).save(root / "a" / f"{i:02d}.JPEG", quality=80 + i)
    return root


def _batches(root, backend, device="cpu", color_jitter=0.4, **kwargs):
    transform = PretrainTransform(48, 48, min_crop_scale=0.2, uint8_output=True, color_jitter=color_jitter)
    loader = build_loader(
        "pretrain", ImageFolderDataset(root), batch_size=4, transform=transform,
        masking=MaskingGenerator(3, 4, min_num_patches=2), seed=5, num_workers=0, device=device, backend=backend,
        **kwargs,
    )  # fmt: skip
    return loader, list(loader)


def _psnr(a, b):
    mse = float(((a.double().cpu() - b.double().cpu()) * 255).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def _assert_matches(cpu_batches, gpu_batches, min_psnr):
    assert len(cpu_batches) == len(gpu_batches)
    for a, b in zip(cpu_batches, gpu_batches, strict=True):
        assert torch.equal(a.mask_index, b.mask_index.cpu())
        assert _psnr(a.tokenizer_images, b.tokenizer_images) > min_psnr


def test_gpu_backend_on_the_cpu_draws_the_cpu_backends_crops_and_masks(folder):
    _, cpu = _batches(folder, "torch", color_jitter=0)
    loader, gpu = _batches(folder, "gpu", color_jitter=0)
    _assert_matches(cpu, gpu, min_psnr=40)  # the same boxes and flips: only the resampling differs
    _, cpu_jittered = _batches(folder, "torch")
    _, gpu_jittered = _batches(folder, "gpu")
    _assert_matches(cpu_jittered, gpu_jittered, min_psnr=30)  # the jitter after the resize
    loader.seek(0, 1)  # resume at the second batch: the same batch as read through
    resumed = next(iter(loader))
    assert torch.equal(resumed.mask_index, gpu[1].mask_index) and torch.equal(resumed.images, gpu[1].images)


def test_gpu_backend_replaces_and_counts_bad_files_as_the_cpu_backend(folder, tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    for path in sorted((folder / "a").iterdir()):
        (root / "a" / path.name).write_bytes(path.read_bytes())
    bad = root / "a" / "02.JPEG"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # truncated: no end-of-image marker
    (root / "a" / "04.JPEG").unlink()
    PIL.Image.fromarray(demo_photo("coins")).resize((80, 70)).save(root / "a" / "04.png")  # grey PNG: the CPU path
    with pytest.warns(UserWarning, match="skipped unreadable image"):
        cpu_loader, cpu = _batches(root, "torch")
    with pytest.warns(UserWarning, match="skipped unreadable image"):
        gpu_loader, gpu = _batches(root, "gpu")
    assert cpu_loader.num_skipped == gpu_loader.num_skipped == 1
    _assert_matches(cpu, gpu, min_psnr=30)


def test_a_jpeg_the_decoder_rejects_is_rebuilt_on_the_cpu_path(folder, monkeypatch):
    _, cpu = _batches(folder, "torch")
    decode = gpu_decode.torchvision.io.decode_jpeg
    rejected = (folder / "a" / "01.JPEG").read_bytes()

    def picky_decoder(data, **kwargs):
        if isinstance(data, list) or bytes(data.numpy()) == rejected:
            raise RuntimeError("decoder says no")
        return decode(data, **kwargs)

    monkeypatch.setattr(gpu_decode.torchvision.io, "decode_jpeg", picky_decoder)
    loader, gpu = _batches(folder, "gpu")
    _assert_matches(cpu, gpu, min_psnr=30)
    exact = sum(
        torch.equal(a.tokenizer_images[k], b.tokenizer_images[k])
        for a, b in zip(cpu, gpu, strict=True)
        for k in range(4)
    )
    used = loader.sampler.indices(0)[: 4 * len(gpu)]
    assert exact == used.count(1)  # file 01 (index 1) is the CPU backend's sample exactly, the others are not


def test_gpu_backend_checks_its_arguments(folder):
    with pytest.raises(ValueError, match="lanczos"):
        build_loader(
            "pretrain", ImageFolderDataset(folder), batch_size=2, backend="gpu", device="cpu",
            transform=PretrainTransform(32, 32, interpolation="lanczos"), masking=MaskingGenerator(2, 2, 1),
        )  # fmt: skip
    with pytest.raises(ValueError, match="'pretrain' only"):
        build_loader("tokenizer", ImageFolderDataset(folder), batch_size=2, backend="gpu", transform=None)


@pytest.mark.cuda
def test_gpu_backend_on_cuda_matches_the_cpu_backend(folder):
    _, cpu = _batches(folder, "torch")
    _, gpu = _batches(folder, "gpu", device="cuda")
    assert gpu[0].images.device.type == "cuda"
    _assert_matches(cpu, gpu, min_psnr=30)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    for a, b in zip(cpu, gpu, strict=True):
        assert ((a.images - b.images.cpu()) * std).abs().mean() < 0.01  # in [0, 1] units: under 3 grey levels


def test_data_backend_gpu_needs_files(folder):
    with pytest.raises(ConfigError, match="--data-backend gpu decodes JPEG files: give --data-dir"):
        TrainConfig(task="tokenizer", teacher="hog", data_backend="gpu").validate()
    TrainConfig(task="tokenizer", teacher="hog", data_backend="gpu", data_dir=str(folder)).validate()
