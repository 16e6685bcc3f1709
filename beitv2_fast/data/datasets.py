"""Image datasets: ImageNet-layout folders, flat folders, and the built-in demo photographs.

Every dataset returns ``(image, label)`` with ``image`` an RGB PIL image (or the transform's
output). Decoding is defensive (reliability checklist D1-D5): grayscale, palette, 16-bit and
CMYK images are converted to RGB; a file that cannot be decoded (unreadable, truncated,
empty, not an image, or a decompression bomb by ``PIL.Image.MAX_IMAGE_PIXELS``) is replaced by
the next valid sample, with a :class:`BadImageWarning`, and recorded. The replacement keeps
the number of samples, and so the number of batches on every rank, unchanged. More than
``max_consecutive_failures`` bad files in a row raise, so a broken mount does not train on
one image.
"""

from __future__ import annotations

import functools
import os
import struct
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
import PIL.Image
import torch

T = TypeVar("T")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# What Pillow raises on bad data. Decoding and conversion both happen inside the guard:
# Image.open is lazy, so a truncated JPEG only fails at load().
_DECODE_ERRORS = (
    OSError,  # includes UnidentifiedImageError, "image file is truncated", missing files
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    PIL.Image.DecompressionBombError,
    PIL.Image.DecompressionBombWarning,
)


class BadImageWarning(UserWarning):
    """An image file was skipped and replaced by another sample."""


class SkippedImage(NamedTuple):
    """A file that could not be decoded: its path, the error, and the index it was asked for under."""

    path: str
    error: str
    index: int


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Convert any Pillow mode to RGB: grayscale, palette (with transparency), CMYK, 16-bit."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # 16-bit (or wider) grayscale: keep the top 8 bits instead of clipping at 255.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        image = PIL.Image.fromarray(np.clip(values * (255.0 / top) + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def decode_image(path: str | os.PathLike) -> PIL.Image.Image:
    """Open, fully decode and convert an image file to RGB.

    Raises one of Pillow's errors (``OSError``, ``ValueError``, ``DecompressionBombError``, ...)
    on bad data; a ``DecompressionBombWarning`` (over ``PIL.Image.MAX_IMAGE_PIXELS``) is raised
    as an error too, so a huge image never reaches the decoder.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
        with PIL.Image.open(path) as image:
            image.load()
            return to_rgb(image)


class ImageDataset(torch.utils.data.Dataset):
    """Base class: robust loading with deterministic replacement of bad files.

    Subclasses implement ``__len__``, ``_decode(index) -> PIL RGB image`` and ``label(index)``.

    Args:
        transform: applied to the RGB PIL image by ``__getitem__``.
        max_consecutive_failures: bad files in a row before ``RuntimeError``.
    """

    def __init__(self, transform: Callable | None = None, max_consecutive_failures: int = 20) -> None:
        self.transform = transform
        self.max_consecutive_failures = max_consecutive_failures
        self._skipped: list[SkippedImage] = []

    def __len__(self) -> int:
        raise NotImplementedError

    def _decode(self, index: int) -> PIL.Image.Image:
        raise NotImplementedError

    def label(self, index: int) -> int:
        raise NotImplementedError

    def path(self, index: int) -> str:
        """A name for sample ``index`` in messages."""
        return f"{type(self).__name__}[{index}]"

    def first_valid(self, index: int, read: Callable[[int], T]) -> tuple[T, int]:
        """``read(index)``, or ``read`` of the next indices (wrapping) while it raises a decoding error.

        Returns the result and the index it came from. A replaced sample is warned about and
        recorded once (the bad files tried after it are recorded when their own index is read).
        """
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"{type(self).__name__}: index {index} out of range for {n} samples")
        error = None
        for offset in range(min(self.max_consecutive_failures + 1, n)):
            candidate = (index + offset) % n
            try:
                result = read(candidate)
            except _DECODE_ERRORS as failure:
                error = error or f"{type(failure).__name__}: {failure}"
                continue
            if offset:
                self._record_skip(index, error)
            return result, candidate
        self._record_skip(index, error)
        raise RuntimeError(
            f"{type(self).__name__}: {offset + 1} unreadable images in a row from {self.path(index)} ({error}); "
            "check the data"
        )

    def _record_skip(self, index: int, error: str) -> None:
        skipped = SkippedImage(self.path(index), error, index)
        warnings.warn(f"skipped unreadable image {skipped.path} ({skipped.error})", BadImageWarning, stacklevel=4)
        self._skipped.append(skipped)

    def load(self, index: int) -> tuple[PIL.Image.Image, int]:
        """The RGB image and label of ``index``, or of the next valid sample if its file is bad."""
        image, source = self.first_valid(index, self._decode)
        return image, self.label(source)

    def __getitem__(self, index: int):
        image, label = self.load(index)
        return (self.transform(image) if self.transform is not None else image), label

    def pop_skipped(self) -> list[SkippedImage]:
        """The files skipped since the last call (in this process)."""
        skipped, self._skipped = self._skipped, []
        return skipped


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _list_images(folder: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image_file(f))
    return found


def _class_folders(root: str) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


class ImageFolderDataset(ImageDataset):
    """Images in the ImageNet layout: ``root/<class>/**/<image>``; labels are the sorted class names' indices.

    Attributes:
        classes: class folder names, sorted; ``class_to_idx`` maps them to labels.
        samples: ``(path, label)`` pairs, sorted by class then path.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, **kwargs) -> None:
        super().__init__(transform, **kwargs)
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"ImageFolderDataset: no folder {self.root!r}")
        self.classes = _class_folders(self.root)
        if not self.classes:
            raise FileNotFoundError(
                f"ImageFolderDataset: no class folders in {self.root!r}; "
                "for a flat folder of unlabelled images use FlatImageDataset"
            )
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in _list_images(os.path.join(self.root, name))
        ]
        if not self.samples:
            raise FileNotFoundError(
                f"ImageFolderDataset: no images with extensions {IMAGE_EXTENSIONS} under {self.root!r}"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, index: int) -> PIL.Image.Image:
        return decode_image(self.samples[index][0])

    def label(self, index: int) -> int:
        return self.samples[index][1]

    def path(self, index: int) -> str:
        return self.samples[index][0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class FlatImageDataset(ImageDataset):
    """Every image under ``root`` (recursively, sorted), unlabelled: the label is -1."""

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, **kwargs) -> None:
        super().__init__(transform, **kwargs)
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"FlatImageDataset: no folder {self.root!r}")
        self.files = _list_images(self.root)
        if not self.files:
            raise FileNotFoundError(
                f"FlatImageDataset: no images with extensions {IMAGE_EXTENSIONS} under {self.root!r}"
            )

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, index: int) -> PIL.Image.Image:
        return decode_image(self.files[index])

    def label(self, index: int) -> int:
        return -1

    def path(self, index: int) -> str:
        return self.files[index]


# The photographs bundled in the scikit-image wheel (no download): colour ones and grayscale
# ones (converted to RGB). Each is one pseudo-class of the demo set.
DEMO_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "motorcycle",
    "camera",
    "brick",
    "grass",
    "gravel",
    "moon",
    "coins",
)


@functools.cache
def demo_photo(name: str) -> np.ndarray:
    """One bundled scikit-image photograph as an RGB uint8 array ``[H, W, 3]``."""
    import skimage.data

    if name not in DEMO_PHOTOS:
        raise ValueError(f"demo_photo: argument 'name' must be one of {DEMO_PHOTOS}; got {name!r}")
    pixels = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    pixels = np.ascontiguousarray(pixels[:, :, :3])
    pixels.setflags(write=False)
    return pixels


class DemoImages(ImageDataset):
    """The built-in offline data set: square crops of scikit-image's bundled photographs.

    Each photograph is a pseudo-class. Crops have a random area between ``min_area`` and
    ``max_area`` of the photograph (square, clipped to its short side) at a random place,
    resized to ``crop_size``; train and val use different draws of the same photographs.

    Args:
        split: "train" or "val".
        crops_per_photo: crops of each photograph (default 32 for train, 8 for val).
        crop_size: side of the stored crops in pixels.
        photos: which photographs (classes) to use; default :data:`DEMO_PHOTOS`.
        min_area, max_area: crop area range as fractions of the photograph.
        seed: the crops' seed.
        transform: applied to each RGB PIL image.
    """

    def __init__(
        self,
        split: str = "train",
        *,
        crops_per_photo: int | None = None,
        crop_size: int = 128,
        photos: Sequence[str] = DEMO_PHOTOS,
        min_area: float = 0.1,
        max_area: float = 0.6,
        seed: int = 0,
        transform: Callable | None = None,
    ) -> None:
        super().__init__(transform)
        if split not in ("train", "val"):
            raise ValueError(f"DemoImages: argument 'split' must be 'train' or 'val'; got {split!r}")
        if crops_per_photo is None:
            crops_per_photo = 32 if split == "train" else 8
        self.classes = list(photos)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        crops, labels = [], []
        for label, name in enumerate(self.classes):
            photo = PIL.Image.fromarray(demo_photo(name))
            rng = np.random.default_rng([seed, 0 if split == "train" else 1, label])
            for _ in range(crops_per_photo):
                side = min(
                    int(round(np.sqrt(rng.uniform(min_area, max_area) * photo.width * photo.height))), *photo.size
                )
                left = int(rng.integers(0, photo.width - side + 1))
                top = int(rng.integers(0, photo.height - side + 1))
                crop = photo.resize(
                    (crop_size, crop_size), PIL.Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)
                )
                crops.append(np.asarray(crop))
                labels.append(label)
        self.images = np.stack(crops)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.split = split

    def __len__(self) -> int:
        return len(self.labels)

    def _decode(self, index: int) -> PIL.Image.Image:
        return PIL.Image.fromarray(self.images[index])

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def path(self, index: int) -> str:
        return f"demo:{self.split}/{self.classes[self.labels[index]]}/{index}"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def save_image_folder(self, root: str | os.PathLike, quality: int = 95) -> Path:
        """Write the crops as JPEG files in the ImageNet layout ``root/<class>/<index>.JPEG``."""
        root = Path(root)
        for index in range(len(self)):
            folder = root / self.classes[self.labels[index]]
            folder.mkdir(parents=True, exist_ok=True)
            PIL.Image.fromarray(self.images[index]).save(folder / f"{index:05d}.JPEG", quality=quality)
        return root


def build_dataset(data_dir: str | os.PathLike, split: str = "train", **kwargs) -> ImageDataset:
    """The dataset for ``--data-dir``: "demo" for the built-in photographs, else a folder.

    A folder is ``data_dir/<split>`` if that exists, else ``data_dir`` itself; it is read as
    :class:`ImageFolderDataset` when it has class subfolders, else as :class:`FlatImageDataset`.
    ``kwargs`` go to the dataset's constructor.
    """
    if os.fspath(data_dir) == "demo":
        return DemoImages(split, **kwargs)
    root = Path(data_dir)
    if (root / split).is_dir():
        root = root / split
    if not root.is_dir():
        raise FileNotFoundError(f"build_dataset: no folder {os.fspath(root)!r} (give a folder or 'demo')")
    if _class_folders(os.fspath(root)):
        return ImageFolderDataset(root, **kwargs)
    return FlatImageDataset(root, **kwargs)
