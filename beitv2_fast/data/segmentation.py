"""Semantic segmentation data: ADE20K, image/mask folder pairs, a built-in synthetic set, and the
training and test pipelines of the official configs (mmsegmentation 0.11) on torchvision v2.

Datasets return ``(RGB PIL image, mask)`` with the mask a ``uint8`` array ``[H, W]`` of class ids,
255 where unlabelled (after ``reduce_zero_label`` for ADE20K, whose files use 0 for "other").
Bad image or mask files are replaced by the next valid pair, as the image datasets do.

Training pipeline (:class:`SegmentationTrainTransform`, the config's ``train_pipeline``):
resize by a random ratio in [0.5, 2] of the (2048, 512) scale keeping the aspect ratio, random
512x512 crop re-drawn up to 10 times while one class covers 75 % or more of the labelled pixels,
horizontal flip (p = 0.5), photometric distortion, normalisation, padding to 512x512 (0 in the
image, 255 in the mask). Test: :class:`SegmentationTestTransform` (resize to (2048, 512), or
several ratios of it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from .datasets import IMAGE_EXTENSIONS, ImageDataset, decode_image
from .transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Normalize

IGNORE_INDEX = 255
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
ADE20K_SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}


class LabelMapError(RuntimeError):
    """A label map that contradicts the data set's settings (an RGB mask, class ids beyond
    ``num_classes``): raised, never skipped like an unreadable file, since the settings are wrong."""


def decode_mask(path: str | os.PathLike) -> np.ndarray:
    """A label map file as ``uint8 [H, W]``: grayscale or palette PNG indices, read unchanged."""
    with PIL.Image.open(path) as mask:
        mask.load()
        if mask.mode not in ("L", "P", "I", "I;16", "1"):
            raise LabelMapError(
                f"{os.fspath(path)}: a label map must be a single-channel (L or P mode) image of class ids; got mode "
                f"{mask.mode}"
            )
        values = np.asarray(mask)
    if values.max(initial=0) > 255:
        raise LabelMapError(f"{os.fspath(path)}: class ids above 255 do not fit the uint8 label maps")
    return values.astype(np.uint8)


def reduce_zero_label(mask: np.ndarray) -> np.ndarray:
    """mmseg's ``reduce_zero_label``: 0 (unlabelled) becomes 255, ids ``1..254`` become ``k - 1``,
    255 stays 255."""
    return np.where((mask == 0) | (mask == IGNORE_INDEX), IGNORE_INDEX, mask.astype(np.int16) - 1).astype(np.uint8)


class SegmentationDataset(ImageDataset):
    """Image/mask pairs from two folders: ``image_dir/<path>.<ext>`` with ``mask_dir/<path><mask_suffix>``.

    Args:
        image_dir, mask_dir: the folders (searched recursively; pairs match by relative path
            without extension).
        num_classes: number of classes; any mask value at or above it other than 255 is a
            :class:`LabelMapError` naming the file.
        reduce_zero_label: the mask files use 0 for "unlabelled" and ``1..num_classes`` for the
            classes (ADE20K).
        mask_suffix: the masks' extension (".png").
        class_names: names for the per-class table (default: "class 0", ...).
        transform: ``transform(image, mask) -> sample``, applied by ``__getitem__``.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        mask_dir: str | os.PathLike,
        *,
        num_classes: int,
        reduce_zero_label: bool = False,
        mask_suffix: str = ".png",
        class_names: Sequence[str] | None = None,
        transform: Callable | None = None,
    ) -> None:
        super().__init__(transform)
        self.image_dir, self.mask_dir = Path(image_dir), Path(mask_dir)
        for option, folder in (("image_dir", self.image_dir), ("mask_dir", self.mask_dir)):
            if not folder.is_dir():
                raise FileNotFoundError(f"{type(self).__name__}: {option} {os.fspath(folder)!r} is not a folder")
        if not 1 <= num_classes <= IGNORE_INDEX:
            raise ValueError(f"{type(self).__name__}: num_classes must lie in 1..255; got {num_classes}")
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        self.classes = list(class_names) if class_names is not None else [f"class {i}" for i in range(num_classes)]
        if len(self.classes) != num_classes:
            raise ValueError(f"{type(self).__name__}: {len(self.classes)} class names for {num_classes} classes")
        images = sorted(
            p for p in self.image_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        self.samples = [(p, self.mask_dir / p.relative_to(self.image_dir).with_suffix(mask_suffix)) for p in images]
        unpaired = [m for _, m in self.samples if not m.is_file()]
        if unpaired:
            raise FileNotFoundError(
                f"{type(self).__name__}: {len(unpaired)} of {len(self.samples)} images under {os.fspath(self.image_dir)!r} "
                f"have no mask (first: {os.fspath(unpaired[0])!r})"
            )
        if not self.samples:
            raise FileNotFoundError(f"{type(self).__name__}: no images under {os.fspath(self.image_dir)!r}")

    def __len__(self) -> int:
        return len(self.samples)

    def path(self, index: int) -> str:
        return os.fspath(self.samples[index][0])

    def _decode_pair(self, index: int) -> tuple[PIL.Image.Image, np.ndarray]:
        image_path, mask_path = self.samples[index]
        image, mask = decode_image(image_path), decode_mask(mask_path)
        if mask.shape != (image.height, image.width):
            raise ValueError(
                f"{os.fspath(mask_path)}: mask {mask.shape} does not match the image {image.height}x{image.width}"
            )
        if self.reduce_zero_label:
            mask = reduce_zero_label(mask)
        return image, check_labels(mask, self.num_classes, os.fspath(mask_path))

    def load(self, index: int) -> tuple[PIL.Image.Image, np.ndarray]:
        """The image and its mask, or the next valid pair if a file is bad."""
        return self.first_valid(index, self._decode_pair)[0]

    def __getitem__(self, index: int):
        image, mask = self.load(index)
        return self.transform(image, mask) if self.transform is not None else (image, mask)


def check_labels(mask: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    """``mask`` unchanged, or a :class:`LabelMapError` naming ``where`` if it holds ids >= ``num_classes``
    besides 255."""
    bad = (mask >= num_classes) & (mask != IGNORE_INDEX)
    if bad.any():
        raise LabelMapError(
            f"{where}: label {int(mask[bad].max())} is not a class of 0..{num_classes - 1} nor 255 (ignored); "
            "check --nb-classes and whether the masks use 0 for 'unlabelled' (reduce_zero_label)"
        )
    return mask


class ADE20K(SegmentationDataset):
    """ADE20K (SceneParsing, ``ADEChallengeData2016``): ``images/{training,validation}/*.jpg`` and
    ``annotations/{training,validation}/*.png``; 150 classes, ``reduce_zero_label``.

    Args:
        root: the ``ADEChallengeData2016`` folder (or the folder holding it).
        split: "train"/"training" or "val"/"validation".
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None) -> None:
        if split not in ADE20K_SPLITS:
            raise ValueError(f"ADE20K: argument 'split' must be one of {sorted(ADE20K_SPLITS)}; got {split!r}")
        root = Path(root)
        if (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        folder = ADE20K_SPLITS[split]
        super().__init__(
            root / "images" / folder, root / "annotations" / folder, num_classes=len(ADE20K_CLASSES),
            reduce_zero_label=True, class_names=ADE20K_CLASSES, transform=transform,
        )  # fmt: skip


def is_ade20k(root: str | os.PathLike) -> bool:
    root = Path(root)
    return (root / "images" / "training").is_dir() or (root / "ADEChallengeData2016" / "images").is_dir()


# ------------------------------------------------------------------------------------------------
# The built-in synthetic set
# ------------------------------------------------------------------------------------------------
SYNTHETIC_CLASSES = ("background", "disc", "box", "bar")
# Mean RGB of each class (plus per-image jitter and noise): far apart in hue, so that a tiny model
# learns the task in a short CPU run, with the photometric distortion on.
_SYNTHETIC_COLOURS = np.array([[128, 128, 128], [200, 50, 50], [50, 190, 60], [60, 80, 210]], dtype=np.float32)


class SyntheticSegmentation(ImageDataset):
    """Generated scenes for offline tests and demos: a textured grey background with 1 to 3 shapes
    (disc, box, bar: one class each), each in its class colour with jitter and noise, and a one-pixel
    unlabelled (255) ring around every shape. Deterministic per (seed, split, index).

    Args:
        split: "train" or "val" (different scenes).
        num_images: scenes in the split (default 64 for train, 16 for val).
        size: ``(height, width)`` of the images.
        seed: the scenes' seed.
        transform: ``transform(image, mask)``, applied by ``__getitem__``.
    """

    classes = list(SYNTHETIC_CLASSES)
    num_classes = len(SYNTHETIC_CLASSES)

    def __init__(
        self,
        split: str = "train",
        *,
        num_images: int | None = None,
        size: Sequence[int] = (96, 128),
        seed: int = 0,
        transform: Callable | None = None,
    ) -> None:
        super().__init__(transform)
        if split not in ("train", "val"):
            raise ValueError(f"SyntheticSegmentation: argument 'split' must be 'train' or 'val'; got {split!r}")
        self.split = split
        self.num_images = num_images if num_images is not None else (64 if split == "train" else 16)
        self.size = (int(size[0]), int(size[1]))
        self.seed = seed

    def __len__(self) -> int:
        return self.num_images

    def path(self, index: int) -> str:
        return f"synthetic:{self.split}/{index}"

    def scene(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The RGB ``uint8 [H, W, 3]`` image and ``uint8 [H, W]`` mask of scene ``index``."""
        rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, index])
        height, width = self.size
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        mask = np.zeros((height, width), dtype=np.uint8)
        ring = np.zeros((height, width), dtype=bool)
        for _ in range(int(rng.integers(1, 4))):
            label = int(rng.integers(1, self.num_classes))
            cy, cx = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width
            radius = rng.uniform(0.12, 0.3) * min(height, width)
            if label == 1:  # disc
                distance = np.hypot(ys - cy, xs - cx) - radius
            elif label == 2:  # box
                distance = np.maximum(np.abs(ys - cy), np.abs(xs - cx)) - radius
            else:  # bar: long and thin, horizontal or vertical
                half = (radius * 0.35, radius * 1.6) if rng.random() < 0.5 else (radius * 1.6, radius * 0.35)
                distance = np.maximum(np.abs(ys - cy) - half[0], np.abs(xs - cx) - half[1])
            ring |= np.abs(distance) < 1.0
            mask[distance < 0] = label
        colours = _SYNTHETIC_COLOURS + rng.uniform(-25, 25, size=_SYNTHETIC_COLOURS.shape)
        shade = 1.0 + 0.15 * np.sin(xs / rng.uniform(4, 12) + rng.uniform(0, 6.3))[..., None]
        image = colours[mask] * shade + rng.normal(0, 12, size=(height, width, 3))
        mask[ring] = IGNORE_INDEX
        return np.clip(image, 0, 255).astype(np.uint8), mask

    def load(self, index: int) -> tuple[PIL.Image.Image, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"SyntheticSegmentation: index {index} out of range for {len(self)} scenes")
        image, mask = self.scene(index)
        return PIL.Image.fromarray(image), mask

    def __getitem__(self, index: int):
        image, mask = self.load(index)
        return self.transform(image, mask) if self.transform is not None else (image, mask)


def build_segmentation_dataset(
    data_dir: str | os.PathLike, split: str = "train", *, num_classes: int | None = None, **kwargs
) -> ImageDataset:
    """The dataset for ``--data-dir``: "synthetic" (built in), an ADE20K folder, or a folder pair
    ``data_dir/images/<split>`` + ``data_dir/annotations/<split>`` (``split`` "train"/"val"; ADE's
    "training"/"validation" also match) with masks of ids ``0..num_classes-1`` and 255."""
    if os.fspath(data_dir) == "synthetic":
        return SyntheticSegmentation(split, **kwargs)
    root = Path(data_dir)
    if is_ade20k(root):
        return ADE20K(root, split, **kwargs)
    for name in (split, ADE20K_SPLITS.get(split, split)):
        images, masks = root / "images" / name, root / "annotations" / name
        if images.is_dir() and masks.is_dir():
            if num_classes is None:
                raise ValueError(f"build_segmentation_dataset: {os.fspath(root)!r} is not ADE20K; give num_classes")
            return SegmentationDataset(images, masks, num_classes=num_classes, **kwargs)
    raise FileNotFoundError(
        f"build_segmentation_dataset: {os.fspath(root)!r} has neither ADEChallengeData2016's layout nor "
        f"images/{split} with annotations/{split}; or use 'synthetic'"
    )


# ------------------------------------------------------------------------------------------------
# Transforms
# ------------------------------------------------------------------------------------------------
def rescale_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmcv's ``imrescale`` size: the largest factor that keeps the long side within ``max(scale)`` and
    the short side within ``min(scale)``, sizes rounded half up."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def _resize_pair(image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]):
    # Bilinear without antialiasing for the image (cv2's INTER_LINEAR, mmcv's default), nearest
    # for the mask (v2 resizes a Mask with nearest whatever the mode).
    image = F.resize(image, list(size), interpolation=F.InterpolationMode.BILINEAR, antialias=False)
    return image, F.resize(mask, list(size))


def _rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 RGB ``[3, H, W]`` to OpenCV's 8-bit HSV as float: H in [0, 180) (degrees / 2), S and V
    in [0, 255], each rounded to an integer as the uint8 image holds it."""
    rgb = rgb.float()
    value, _ = rgb.max(0)
    chroma = value - rgb.min(0).values
    saturation = torch.where(value > 0, 255.0 * chroma / value.clamp_min(1), torch.zeros_like(value))
    r, g, b = rgb
    safe = chroma.clamp_min(1e-6)
    hue = torch.where(value == r, 60.0 * (g - b) / safe, torch.where(value == g, 120.0 + 60.0 * (b - r) / safe,
                                                                     240.0 + 60.0 * (r - g) / safe))  # fmt: skip
    hue = torch.where(chroma > 0, hue % 360.0, torch.zeros_like(hue))
    return torch.stack([torch.round(hue / 2.0) % 180.0, torch.round(saturation), value])


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """OpenCV 8-bit HSV (float, H in [0, 180)) back to uint8 RGB."""
    hue, saturation, value = hsv[0] * 2.0, hsv[1] / 255.0, hsv[2]
    sector = torch.floor(hue / 60.0) % 6
    fraction = hue / 60.0 - torch.floor(hue / 60.0)
    p = value * (1 - saturation)
    q = value * (1 - saturation * fraction)
    t = value * (1 - saturation * (1 - fraction))
    choices = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)]
    channels = []
    for channel in range(3):
        out = torch.zeros_like(value)
        for index, picked in enumerate(choices):
            out = torch.where(sector == index, picked[channel], out)
        channels.append(out)
    return torch.stack(channels).round().clamp(0, 255).to(torch.uint8)


class PhotoMetricDistortion:
    """mmseg's ``PhotoMetricDistortion`` on uint8 RGB ``[3, H, W]``, each step with probability 1/2:
    brightness (add a uniform delta in +-32), contrast before or after the HSV steps (multiply by
    [0.5, 1.5]; mmseg's contrast is a plain scaling), saturation (scale S by [0.5, 1.5]), hue (add an
    integer in +-18 to OpenCV's H, modulo 180). Every step clips to [0, 255] and truncates to uint8.

    Args:
        brightness_delta, contrast_range, saturation_range, hue_delta: mmseg's defaults.
    """

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: int = 18,
    ) -> None:
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta

    @staticmethod
    def _convert(values: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
        return (values.float() * alpha + beta).clamp(0, 255).to(torch.uint8)

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if rng.integers(2):
            image = self._convert(image, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = bool(rng.integers(2))
        if contrast_first and rng.integers(2):
            image = self._convert(image, alpha=rng.uniform(*self.contrast_range))
        if rng.integers(2):
            hsv = _rgb_to_hsv(image)
            hsv[1] = self._convert(hsv[1], alpha=rng.uniform(*self.saturation_range)).float()
            image = _hsv_to_rgb(hsv)
        if rng.integers(2):
            hsv = _rgb_to_hsv(image)
            hsv[0] = (hsv[0] + float(rng.integers(-self.hue_delta, self.hue_delta))) % 180.0
            image = _hsv_to_rgb(hsv)
        if not contrast_first and rng.integers(2):
            image = self._convert(image, alpha=rng.uniform(*self.contrast_range))
        return image

    def __repr__(self) -> str:
        return (
            f"PhotoMetricDistortion(brightness_delta={self.brightness_delta}, contrast_range={self.contrast_range}, "
            f"saturation_range={self.saturation_range}, hue_delta={self.hue_delta})"
        )


class SegmentationTrainTransform:
    """The official training pipeline on (image, mask) pairs, image and mask kept aligned.

    Args:
        crop_size: the crop (512).
        scale: the ``(long, short)`` base scale of the random resize ((2048, 512)).
        ratio_range: the resize ratio range ((0.5, 2.0)).
        cat_max_ratio: re-draw the crop (up to 10 times, mmseg's rule) while one class holds this
            share or more of the crop's labelled pixels, or only one class is present (0.75;
            1 disables).
        flip_prob: horizontal flip probability.
        photometric: apply :class:`PhotoMetricDistortion`.
        mean, std: normalisation (ImageNet's, the configs' 123.675/58.395... / 255).

    ``transform(image, mask, rng)`` with a PIL image, a ``uint8 [H, W]`` mask and a NumPy generator
    (the loader's per-sample one) gives ``(float32 [3, c, c], int64 [c, c])``.
    """

    def __init__(
        self,
        crop_size: int | Sequence[int] = 512,
        *,
        scale: Sequence[int] = (2048, 512),
        ratio_range: Sequence[float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        self.crop_size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        if min(self.crop_size) < 1:
            raise ValueError(f"SegmentationTrainTransform: argument 'crop_size' must be positive; got {crop_size}")
        if not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(
                f"SegmentationTrainTransform: argument 'ratio_range' must be 0 < low <= high; got {ratio_range}"
            )
        self.scale = tuple(scale)
        self.ratio_range = tuple(ratio_range)
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.photometric = PhotoMetricDistortion() if photometric else None
        self.normalize = Normalize(mean, std)

    def crop_box(self, mask: torch.Tensor, rng: np.random.Generator) -> tuple[int, int]:
        """Top-left corner of the crop; with ``cat_max_ratio < 1`` the mmseg rule: up to 10 re-draws
        while the crop holds a single class or one class covers ``cat_max_ratio`` of it."""
        height, width = mask.shape[-2:]

        def draw() -> tuple[int, int]:
            return (int(rng.integers(0, max(height - self.crop_size[0], 0) + 1)),
                    int(rng.integers(0, max(width - self.crop_size[1], 0) + 1)))  # fmt: skip

        top, left = draw()
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                crop = mask[..., top : top + self.crop_size[0], left : left + self.crop_size[1]]
                counts = torch.bincount(crop.flatten().long(), minlength=256)[:IGNORE_INDEX]
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                top, left = draw()
        return top, left

    def __call__(self, image: PIL.Image.Image, mask: np.ndarray, rng: np.random.Generator | None = None):
        rng = np.random.default_rng() if rng is None else rng
        pixels = tv_tensors.Image(F.pil_to_tensor(image))
        labels = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask))[None])
        ratio = rng.random() * (self.ratio_range[1] - self.ratio_range[0]) + self.ratio_range[0]
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        pixels, labels = _resize_pair(pixels, labels, rescale_size(*pixels.shape[-2:], target))
        top, left = self.crop_box(labels, rng)
        height, width = min(self.crop_size[0], pixels.shape[-2]), min(self.crop_size[1], pixels.shape[-1])
        pixels, labels = F.crop(pixels, top, left, height, width), F.crop(labels, top, left, height, width)
        if rng.random() < self.flip_prob:
            pixels, labels = F.horizontal_flip(pixels), F.horizontal_flip(labels)
        if self.photometric is not None:
            pixels = self.photometric(pixels.as_subclass(torch.Tensor), rng)
        pixels = self.normalize(pixels.as_subclass(torch.Tensor))
        padding = [0, 0, self.crop_size[1] - width, self.crop_size[0] - height]  # left, top, right, bottom
        pixels = F.pad(pixels, padding, fill=0.0)
        labels = F.pad(labels, padding, fill=IGNORE_INDEX)
        return pixels, labels.as_subclass(torch.Tensor)[0].long()

    def __repr__(self) -> str:
        return (
            f"SegmentationTrainTransform(crop_size={self.crop_size}, scale={self.scale}, ratio_range={self.ratio_range}, "
            f"cat_max_ratio={self.cat_max_ratio}, flip_prob={self.flip_prob}, photometric={self.photometric}, "
            f"{self.normalize})"
        )


class SegmentationTestTransform:
    """Test-time resizing and normalisation (the config's ``test_pipeline``).

    Args:
        scale: ``(long, short)`` base scale ((2048, 512)): ratio 1 resizes keeping the aspect ratio
            so that neither side exceeds it (mmcv's ``imrescale``).
        ratios: scales of multi-scale testing (the reference's ``_ms`` configs: 0.5 ... 1.75). With
            several ratios the reference's ``SETR_Resize`` rule applies: the short side becomes
            ``max(min_short, int(short * ratio))``, the long side follows the aspect ratio.
        min_short: the crop size of slide inference (512).
        mean, std: normalisation.

    ``transform(image)`` gives one float32 ``[3, h, w]`` image per ratio.
    """

    def __init__(
        self,
        *,
        scale: Sequence[int] = (2048, 512),
        ratios: Sequence[float] = (1.0,),
        min_short: int = 512,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        if not ratios or min(ratios) <= 0:
            raise ValueError(f"SegmentationTestTransform: argument 'ratios' must be positive numbers; got {ratios}")
        self.scale = tuple(scale)
        self.ratios = tuple(float(r) for r in ratios)
        self.min_short = min_short
        self.normalize = Normalize(mean, std)

    def sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """The resized ``(height, width)`` of each ratio."""
        if len(self.ratios) == 1:
            target = (int(self.scale[0] * self.ratios[0]), int(self.scale[1] * self.ratios[0]))
            return [rescale_size(height, width, target)]
        sizes = []
        for ratio in self.ratios:
            short = max(self.min_short, int(min(self.scale) * ratio))
            factor = short / min(height, width)
            sizes.append((int(height * factor + 0.5), int(width * factor + 0.5)))
        return sizes

    def __call__(self, image: PIL.Image.Image) -> list[torch.Tensor]:
        pixels = F.pil_to_tensor(image)
        return [
            self.normalize(F.resize(pixels, list(size), interpolation=F.InterpolationMode.BILINEAR, antialias=False))
            for size in self.sizes(*pixels.shape[-2:])
        ]

    def __repr__(self) -> str:
        return f"SegmentationTestTransform(scale={self.scale}, ratios={self.ratios}, min_short={self.min_short})"
