"""JPEG decoding at a reduced DCT scale for the pretraining crop (``PretrainTransform(fast_decode=True)``).

libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 of its size for a fraction of the work (the inverse
DCT and colour conversion of fewer pixels; Pillow's ``Image.draft``). The pretraining transform
only needs the pixels of its random crop, resized to the views' sizes. So the crop is drawn
first, from the file's header (the full size), with the transform's own draws, and the image is
decoded at the smallest scale that leaves the crop box at least as large as each view in both
directions; the box is then mapped into the reduced image (a pixel of the reduced image covers
``reduction`` x ``reduction`` pixels of the full one, so coordinates divide by ``reduction``).

The crop geometry, flip, jitter draws and masks are the full decode's, draw for draw; the pixels
differ by the DCT's downscaling in place of part of the bicubic one (see the README for the
PSNR). A crop smaller than twice the views decodes at full size, exactly as without the option.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import PIL.Image
import torch

from .datasets import FlatImageDataset, ImageDataset, ImageFolderDataset, to_rgb

REDUCTIONS = (8, 4, 2, 1)  # the DCT scales Pillow's draft offers, largest first


class CropDecoded(NamedTuple):
    """An image decoded for one crop: the (possibly reduced) RGB image, the transform's draws in
    full-size coordinates, the full ``(width, height)`` and the reduction (1, 2, 4 or 8)."""

    image: PIL.Image.Image
    params: dict
    full_size: tuple[int, int]
    reduction: int


class _CropSampler(Protocol):
    output_sizes: Sequence[tuple[int, int]]

    def sample_params(self, width: int, height: int) -> dict: ...


def reduction_for(box: dict, output_sizes: Sequence[tuple[int, int]]) -> int:
    """The largest DCT reduction that keeps ``box`` (``height``, ``width`` in full-size pixels) at
    least as large as every ``(height, width)`` in ``output_sizes``."""
    need_height = max(size[0] for size in output_sizes)
    need_width = max(size[1] for size in output_sizes)
    for reduction in REDUCTIONS:
        if box["height"] >= need_height * reduction and box["width"] >= need_width * reduction:
            return reduction
    return 1


def decode_for_crop(path: str | os.PathLike, transform: _CropSampler) -> CropDecoded:
    """Read ``path``'s size, draw ``transform``'s parameters, decode at the reduction they allow.

    Raises Pillow's errors on bad data, as ``datasets.decode_image`` does; the draws of a file
    that fails are undone (torch's generator is restored), so the replacement sample draws
    exactly what it draws on the full-decode path.
    """
    saved = torch.get_rng_state()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as image:
                full_size = image.size
                params = transform.sample_params(*full_size)
                reduction = reduction_for(params["box"], transform.output_sizes)
                drafted = None
                if reduction > 1 and image.format == "JPEG":
                    drafted = image.draft(None, (full_size[0] // reduction, full_size[1] // reduction))
                # What the decoder will do: draft returns the full image's box in reduced pixels.
                reduction = 1 if drafted is None else round(full_size[0] / drafted[1][2])
                image.load()
                return CropDecoded(to_rgb(image), params, full_size, reduction)
    except BaseException:
        torch.set_rng_state(saved)
        raise


class CropDecodingDataset(ImageDataset):
    """A file dataset whose samples are :class:`CropDecoded` for ``transform``, bad files replaced
    as in the wrapped dataset."""

    def __init__(self, files: ImageFolderDataset | FlatImageDataset, transform: _CropSampler) -> None:
        if not isinstance(files, ImageFolderDataset | FlatImageDataset):
            raise TypeError(
                "fast_decode reads JPEG files: the dataset must be an ImageFolderDataset or FlatImageDataset; "
                f"got {type(files).__name__} (use fast_decode=False)"
            )
        super().__init__(max_consecutive_failures=files.max_consecutive_failures)
        self.files, self.crop_transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, index: int) -> CropDecoded:
        return decode_for_crop(self.files.path(index), self.crop_transform)

    def label(self, index: int) -> int:
        return self.files.label(index)

    def path(self, index: int) -> str:
        return self.files.path(index)
