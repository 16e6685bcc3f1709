"""Segmentation data: the ADE20K and folder-pair layouts, label checks, the synthetic set, and the
official training/test pipelines (image and mask aligned, resize and crop rules, padding,
photometric distortion), through the resumable loader."""

import numpy as np
import PIL.Image
import pytest
import torch

from beitv2_fast.data import (
    ADE20K,
    ADE20K_CLASSES,
    PhotoMetricDistortion,
    SegmentationTestTransform,
    SegmentationTrainTransform,
    SyntheticSegmentation,
    build_loader,
    build_segmentation_dataset,
)
from beitv2_fast.data.segmentation import LabelMapError, _hsv_to_rgb, _rgb_to_hsv, reduce_zero_label, rescale_size
from beitv2_fast.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1) * 255
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1) * 255


def _write_pair(images, masks, name, mask, rng, *, mode="L"):
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(rng.integers(0, 255, (*mask.shape, 3), dtype=np.uint8)).save(images / f"{name}.jpg")
    label_map = PIL.Image.fromarray(mask, mode=mode)
    if mode == "P":  # a VOC-style palette PNG: the file stores the indices
        label_map.putpalette([v for i in range(256) for v in (i, 7 * i % 256, 13 * i % 256)])
    label_map.save(masks / f"{name}.png")


def test_ade20k_layout_reduces_the_zero_label(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "ADEChallengeData2016"
    mask = np.array([[0, 1, 150], [2, 0, 3]], dtype=np.uint8)
    for split in ("training", "validation"):
        _write_pair(root / "images" / split, root / "annotations" / split, "ADE_0001", mask, rng)
    dataset = build_segmentation_dataset(tmp_path, "val")  # the folder holding ADEChallengeData2016
    assert isinstance(dataset, ADE20K) and dataset.num_classes == 150 and dataset.classes[0] == "wall"
    image, labels = dataset.load(0)
    assert image.size == (3, 2) and labels.dtype == np.uint8
    assert labels.tolist() == [[255, 0, 149], [1, 255, 2]]
    assert reduce_zero_label(np.array([0, 1, 255], dtype=np.uint8)).tolist() == [255, 0, 255]
    assert len(ADE20K_CLASSES) == 150 and ADE20K_CLASSES[-1] == "flag"


def test_folder_pairs_check_pairs_and_labels(tmp_path):
    rng = np.random.default_rng(1)
    _write_pair(
        tmp_path / "images" / "train", tmp_path / "annotations" / "train", "a", np.full((4, 5), 2, np.uint8), rng
    )
    _write_pair(tmp_path / "images" / "train", tmp_path / "annotations" / "train", "b",
                np.array([[0, 255], [1, 1]], np.uint8), rng, mode="P")  # fmt: skip
    dataset = build_segmentation_dataset(tmp_path, "train", num_classes=3)
    assert len(dataset) == 2 and dataset.load(1)[1].tolist() == [[0, 255], [1, 1]]
    with pytest.raises(LabelMapError, match="label 2 is not a class of 0..1"):  # raised, not skipped
        build_segmentation_dataset(tmp_path, "train", num_classes=2).load(0)
    with pytest.raises(ValueError, match="num_classes"):
        build_segmentation_dataset(tmp_path, "train")
    (tmp_path / "annotations" / "train" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 2 images .* have no mask"):
        build_segmentation_dataset(tmp_path, "train", num_classes=3)
    with pytest.raises(FileNotFoundError, match="synthetic"):
        build_segmentation_dataset(tmp_path / "nothing", "train")


def test_synthetic_scenes_are_deterministic_and_labelled():
    dataset = build_segmentation_dataset("synthetic", "train", num_images=4, size=(40, 56))
    again = SyntheticSegmentation("train", num_images=4, size=(40, 56))
    image, mask = dataset.load(3)
    assert image.size == (56, 40) and mask.shape == (40, 56)
    assert np.array_equal(np.asarray(image), np.asarray(again.load(3)[0])) and np.array_equal(mask, again.load(3)[1])
    values = set(np.unique(mask).tolist())
    assert 0 in values and 255 in values and values <= {0, 1, 2, 3, 255}
    assert not np.array_equal(SyntheticSegmentation("val", size=(40, 56)).load(3)[1], mask)


# ------------------------------------------------------------------------------------------------
# The training pipeline
# ------------------------------------------------------------------------------------------------
def _colour_coded(mask: np.ndarray) -> PIL.Image.Image:
    """An image whose red channel is 40 x the label (so the label can be read back from the image)."""
    pixels = np.zeros((*mask.shape, 3), np.uint8)
    pixels[..., 0] = np.where(mask == 255, 250, mask * 40)
    return PIL.Image.fromarray(pixels)


def test_crop_flip_and_pad_keep_image_and_mask_aligned():
    rng = np.random.default_rng(2)
    mask = rng.integers(0, 5, (30, 50)).astype(np.uint8)
    mask[:, :3] = 255
    # Ratio 1 of a scale equal to the image: no resampling, so every pixel must line up exactly.
    transform = SegmentationTrainTransform(24, scale=(50, 30), ratio_range=(1.0, 1.0), cat_max_ratio=1.0,
                                           flip_prob=0.5, photometric=False)  # fmt: skip
    flips = set()
    for seed in range(6):
        image, labels = transform(_colour_coded(mask), mask, np.random.default_rng(seed))
        assert image.shape == (3, 24, 24) and labels.shape == (24, 24) and labels.dtype == torch.int64
        red = torch.round(image[0] * STD[0] + MEAN[0])
        decoded = torch.where(red == 250, 255, red // 40).long()
        assert torch.equal(decoded, labels)
        # The crop is a window of the (possibly flipped) mask.
        source = torch.from_numpy(mask).long()
        windows = [src.unfold(0, 24, 1).unfold(1, 24, 1) for src in (source, source.flip(1))]
        hits = [(w == labels).all(-1).all(-1).any().item() for w in windows]
        assert any(hits)
        flips.add(hits.index(True))
    assert flips == {0, 1}


def test_resize_follows_mmcv_and_small_images_are_padded():
    assert rescale_size(683, 512, (2048, 512)) == (683, 512)  # already within (2048, 512)
    assert rescale_size(400, 600, (2048, 512)) == (512, 768)  # the short side reaches 512
    assert rescale_size(300, 3000, (2048, 512)) == (205, 2048)  # the long side caps the factor
    mask = np.ones((20, 30), np.uint8)
    mask[5:15, 10:20] = 2
    # Ratio 0.25 of (120, 40) is (30, 10): factor min(30 / 30, 10 / 20) -> 10 x 15, padded to 32 x 32.
    transform = SegmentationTrainTransform(
        32, scale=(120, 40), ratio_range=(0.25, 0.25), photometric=False, flip_prob=0
    )
    image, labels = transform(_colour_coded(mask), mask, np.random.default_rng(0))
    assert image.shape == (3, 32, 32)
    assert (labels[10:] == 255).all() and (labels[:, 15:] == 255).all()
    assert (image[:, 10:] == 0).all() and (image[:, :, 15:] == 0).all()
    assert set(labels[:10, :15].unique().tolist()) == {1, 2}


def test_crop_is_redrawn_while_one_class_dominates():
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 48:] = 1  # a 16-px crop qualifies only for 7 of its 49 horizontal offsets
    mask[:4] = 255

    def qualifies(transform, seed):
        top, left = transform.crop_box(torch.from_numpy(mask)[None], np.random.default_rng(seed))
        labelled = mask[top : top + 16, left : left + 16]
        labelled = labelled[labelled != 255]
        return len(np.unique(labelled)) > 1 and np.bincount(labelled).max() / labelled.size < 0.75

    with_rule = sum(qualifies(SegmentationTrainTransform(16, cat_max_ratio=0.75), seed) for seed in range(40))
    without = sum(qualifies(SegmentationTrainTransform(16, cat_max_ratio=1.0), seed) for seed in range(40))
    # One draw qualifies with probability 1/7; up to 11 draws with 1 - (6/7)^11 = 0.82.
    assert with_rule >= 25 and without <= 15


def test_photometric_distortion_follows_mmseg():
    distortion = PhotoMetricDistortion()
    convert = distortion._convert
    values = torch.tensor([0, 10, 200, 250], dtype=torch.uint8)
    assert convert(values, beta=10.7).tolist() == [10, 20, 210, 255]  # add, clip, truncate
    assert convert(values, alpha=1.5).tolist() == [0, 15, 255, 255]  # mmseg's contrast: a plain scaling
    # OpenCV's 8-bit HSV: H in [0, 180), pure colours on the 60-degree marks.
    rgb = torch.tensor([[255, 0, 0], [255, 255, 0], [0, 0, 255], [128, 128, 128]], dtype=torch.uint8).T[:, :, None]
    hsv = _rgb_to_hsv(rgb)
    assert hsv[0, :, 0].tolist() == [0, 30, 120, 0] and hsv[1, :, 0].tolist() == [255, 255, 255, 0]
    hsv[0] = (hsv[0] + 30) % 180  # red -> yellow, yellow -> green, blue -> magenta
    assert _hsv_to_rgb(hsv)[:, :, 0].T.tolist() == [[255, 255, 0], [0, 255, 0], [255, 0, 255], [128, 128, 128]]
    image = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (3, 16, 16), dtype=np.uint8))
    assert (_hsv_to_rgb(_rgb_to_hsv(image)).int() - image.int()).abs().max() <= 3  # rounding of the 8-bit HSV
    distorted = [distortion(image, np.random.default_rng(seed)) for seed in range(8)]
    assert all(d.dtype == torch.uint8 and d.shape == image.shape for d in distorted)
    assert sum(not torch.equal(d, image) for d in distorted) >= 6


def test_test_transform_sizes_follow_the_reference():
    single = SegmentationTestTransform()
    assert single.sizes(400, 600) == [(512, 768)]
    multi = SegmentationTestTransform(ratios=(0.5, 1.0, 1.75))
    # SETR_Resize: the short side never below the 512 window, no cap on the long side.
    assert multi.sizes(400, 600) == [(512, 768), (512, 768), (896, 1344)]
    views = SegmentationTestTransform(scale=(128, 32), ratios=(1.0, 2.0), min_short=32)(PIL.Image.new("RGB", (60, 40)))
    assert [tuple(v.shape) for v in views] == [(3, 32, 48), (3, 64, 96)]
    with pytest.raises(ValueError, match="ratios"):
        SegmentationTestTransform(ratios=())


def test_loader_gives_aligned_seeded_batches():
    dataset = SyntheticSegmentation("train", num_images=6, size=(40, 56))
    transform = SegmentationTrainTransform(32, scale=(128, 32))

    def first_batches(seed):
        loader = build_loader("segmentation", dataset, batch_size=3, transform=transform, seed=seed, num_workers=0)
        return [batch for batch in loader]

    batches = first_batches(7)
    assert len(batches) == 2
    images, labels = batches[0]
    assert images.shape == (3, 3, 32, 32) and labels.shape == (3, 32, 32) and labels.dtype == torch.int64
    for left, right in zip(batches, first_batches(7), strict=True):
        assert torch.equal(left.images, right.images) and torch.equal(left.labels, right.labels)
    assert not torch.equal(batches[0].images, first_batches(8)[0].images)
