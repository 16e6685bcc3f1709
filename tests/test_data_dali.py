"""The optional DALI backend: a clear error without DALI, its Python side on the CPU, the pipeline on a GPU."""

import io

import numpy as np
import PIL.Image
import pytest
import torch

from beitv2_fast.data import DemoImages, ImageFolderDataset, MaskingGenerator, PretrainTransform, build_loader
from beitv2_fast.data import dali as dali_backend
from beitv2_fast.data.sampling import ResumableBatchSampler


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    demo = DemoImages("val", crops_per_photo=3, photos=("astronaut", "coffee", "rocket", "camera"), crop_size=64)
    return ImageFolderDataset(demo.save_image_folder(tmp_path_factory.mktemp("jpegs")))


def _loader_args():
    return {
        "transform": PretrainTransform(48, 24, color_jitter=0.0),
        "masking": MaskingGenerator(3, 4, min_num_patches=2),
        "batch_size": 4,
        "seed": 5,
    }


@pytest.mark.skipif(dali_backend.DALI_AVAILABLE, reason="DALI is installed")
def test_asking_for_dali_without_it_is_a_clear_error(jpeg_folder):
    with pytest.raises(ImportError, match="pip install nvidia-dali"):
        build_loader("pretrain", jpeg_folder, backend="dali", device="cuda", **_loader_args())


def test_dali_inputs_reproduce_the_cpu_crops_and_masks(jpeg_folder):
    # The Python side of the DALI pipeline draws the same boxes, flips and masks as the CPU
    # loader; cropping and resizing by its ROIs with PIL gives the CPU loader's pixels exactly.
    args = _loader_args()
    transform = PretrainTransform(48, 24, color_jitter=0.0, uint8_output=True)
    sampler = ResumableBatchSampler(len(jpeg_folder), 4, seed=5)
    inputs = dali_backend.DaliInputs(jpeg_folder, transform, args["masking"], sampler, epoch=0, start_batch=0)
    flips = 0
    for cpu in build_loader("pretrain", jpeg_folder, num_workers=0, **args):
        encoded, roi_start, roi_end, brightness, contrast, saturation = next(inputs)
        key, masks, skipped = inputs.pending.popleft()
        assert torch.equal(masks, cpu.mask_index) and skipped == []
        assert all(f.item() == 1.0 for f in brightness + contrast + saturation)
        for i in range(4):
            image = PIL.Image.open(io.BytesIO(encoded[i].tobytes())).convert("RGB")
            (top, x0), (bottom, x1) = roi_start[i], roi_end[i]
            region = image.crop((int(min(x0, x1)), int(top), int(max(x0, x1)), int(bottom)))
            if x0 > x1:
                region = region.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
                flips += 1
            for size, normalize, view in (
                (48, transform.student_normalize, cpu.images[i]),
                (24, transform.tokenizer_normalize, cpu.tokenizer_images[i]),
            ):
                resized = torch.from_numpy(np.array(region.resize((size, size), PIL.Image.Resampling.BICUBIC)))
                torch.testing.assert_close(normalize(resized.permute(2, 0, 1)), view, atol=1e-6, rtol=0)
    assert key.batch == len(sampler) - 1 and 0 < flips < 12


def test_dali_inputs_resume_where_the_cpu_loader_resumes(jpeg_folder):
    # A DALI stream started at a saved position reads the batches (order and masks) the CPU loader
    # reads from the same state, across the epoch boundary: one sampler, one resume contract.
    args = _loader_args()
    cpu = build_loader("pretrain", jpeg_folder, num_workers=0, **args)
    cpu.seek(0, 2)
    state = cpu.state_dict()
    expected = [next(iter(cpu)).mask_index]  # batch 2, the last of epoch 0
    next_epoch = iter(cpu)  # rolls over to epoch 1
    expected += [next(next_epoch).mask_index, next(next_epoch).mask_index]
    sampler = ResumableBatchSampler(len(jpeg_folder), 4, seed=5)
    sampler.load_state_dict(state)
    inputs = dali_backend.DaliInputs(jpeg_folder, args["transform"], args["masking"], sampler, *sampler.start())
    keys = []
    for _ in expected:
        next(inputs)
        key, masks, _ = inputs.pending.popleft()
        keys.append((key.epoch, key.batch))
        assert torch.equal(masks, expected[len(keys) - 1])
    assert len(sampler) == 3 and keys == [(0, 2), (1, 0), (1, 1)]


def test_dali_inputs_replace_bad_files_and_reencode_odd_modes(tmp_path):
    root = tmp_path / "class"
    root.mkdir()
    PIL.Image.new("RGB", (40, 30), (10, 20, 30)).save(root / "0.jpg")
    (root / "1.jpg").write_bytes(b"")
    PIL.Image.new("CMYK", (40, 30), (0, 50, 100, 0)).save(root / "2.jpg")
    dataset = ImageFolderDataset(tmp_path)
    data, size = dali_backend.read_encoded(dataset.path(2))
    assert size == (40, 30) and data[:4].tobytes() == b"\x89PNG"  # CMYK re-encoded for the GPU decoder
    assert dali_backend.read_encoded(dataset.path(0))[0][:2].tobytes() == b"\xff\xd8"  # JPEG passed as is
    with pytest.warns(UserWarning, match="skipped unreadable image"):
        encoded, *_ = dali_backend.DaliInputs(
            dataset,
            PretrainTransform(16, 16),
            MaskingGenerator(2, 1, min_num_patches=1),
            ResumableBatchSampler(3, 3, shuffle=False),
            epoch=0,
            start_batch=0,
        ).__next__()
    assert np.array_equal(encoded[1], encoded[2])  # the empty file's slot holds the next image


@pytest.mark.cuda
@pytest.mark.skipif(not dali_backend.DALI_AVAILABLE, reason="needs nvidia-dali")
def test_dali_pipeline_matches_the_cpu_loader(jpeg_folder):
    args = _loader_args()
    cpu = [b for b, _ in zip(build_loader("pretrain", jpeg_folder, num_workers=0, **args), range(2), strict=False)]
    gpu_loader = build_loader("pretrain", jpeg_folder, backend="dali", device="cuda", **args)
    gpu = [b for b, _ in zip(gpu_loader, range(2), strict=False)]
    assert gpu_loader.state_dict()["batches_consumed"] == 2
    for a, b in zip(cpu, gpu, strict=True):
        assert torch.equal(a.mask_index, b.mask_index.cpu())
        assert b.images.shape == a.images.shape and b.tokenizer_images.shape == a.tokenizer_images.shape
        # nvJPEG + DALI cubic vs libjpeg + PIL bicubic: a few grey levels at most on average.
        assert (a.tokenizer_images - b.tokenizer_images.cpu()).abs().mean() < 0.03
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        assert ((a.images - b.images.cpu()) * std).abs().mean() < 0.03
