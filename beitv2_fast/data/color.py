"""``ColorJitter`` on PIL images with fewer passes over the pixels, pixel for pixel the same.

PIL's brightness and contrast enhancers blend the image with a constant image (black, or the
mean grey level): per 8-bit level that is a function of the level alone, so one lookup table
(``Image.point``) gives the same bytes without building the constant image and blending. Two
tables in a row compose into one. Contrast needs the mean grey of the image as it is at that
point, so a pending table is applied before contrast reads it; saturation and hue go through
torchvision (PIL) unchanged.

Every op but contrast's mean is pointwise, so the part of the jittered image a crop reads can be
jittered alone (``region``): the ops up to contrast run on the whole image (its mean needs them),
the rest on the region only (the recipe's crop covers 20% to 100% of the image).
"""

from __future__ import annotations

import numpy as np
import PIL.Image
from torchvision.transforms.v2 import functional as F

_LEVELS = np.arange(256, dtype=np.float32)
_FACTOR_NAMES = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")  # by ``fn_idx``


def blend_table(degenerate: int, factor: float) -> np.ndarray:
    """What ``Image.blend`` makes of each level blended from the constant ``degenerate`` by
    ``factor``: Pillow computes ``degenerate + factor * (level - degenerate)`` in float32 and
    clips to 0..255, truncating (``libImaging/Blend.c``)."""
    values = np.float32(degenerate) + np.float32(factor) * (_LEVELS - np.float32(degenerate))
    return np.clip(values, 0, 255).astype(np.uint8)


def grey_mean(image: PIL.Image.Image) -> int:
    """The contrast enhancer's mean: of ``convert("L")``, rounded half up (``ImageEnhance.Contrast``)."""
    histogram = image.convert("L").histogram()
    return int(np.dot(_LEVELS, histogram) / (image.width * image.height) + 0.5)


def _apply(image: PIL.Image.Image, table: np.ndarray | None) -> PIL.Image.Image:
    return image if table is None else image.point(table.tolist() * len(image.getbands()))


def color_jitter(
    image: PIL.Image.Image, params: dict, region: tuple[int, int, int, int] | None = None
) -> PIL.Image.Image:
    """``v2.ColorJitter(...).transform(image, params)`` for an RGB PIL image, with the draws of
    ``make_params`` (``fn_idx``, ``brightness_factor``, ...). With ``region`` (left, upper, right,
    lower, inside the image) only that part of it: ``color_jitter(image, params).crop(region)``
    byte for byte."""
    if image.mode != "RGB":
        raise ValueError(f"color_jitter: argument 'image' must be an RGB PIL image; got mode {image.mode!r}")
    order = [fn_id for fn_id in params["fn_idx"].tolist() if params[_FACTOR_NAMES[fn_id]] is not None]
    if region is not None and 1 not in order:
        image = image.crop(region)  # no whole-image mean to take: every op is pointwise
    pending: np.ndarray | None = None  # a table not yet applied to the pixels
    for fn_id in order:
        factor = params[_FACTOR_NAMES[fn_id]]
        if fn_id == 0:
            table = blend_table(0, factor)
            pending = table if pending is None else table[pending]
        elif fn_id == 1:
            image = _apply(image, pending)
            pending = blend_table(grey_mean(image), factor)
            if region is not None:
                image = image.crop(region)  # the mean is taken; the rest is pointwise
        elif fn_id == 2:
            image, pending = _apply(image, pending), None
            image = F.adjust_saturation(image, factor)
        else:
            image, pending = _apply(image, pending), None
            image = F.adjust_hue(image, factor)
    return _apply(image, pending)
