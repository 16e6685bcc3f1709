"""``ColorJitter`` on PIL images with fewer passes over the pixels, pixel for pixel the same.

PIL's brightness and contrast enhancers blend the image with a constant image (black, or the
mean grey level): per 8-bit level that is a function of the level alone, so one lookup table
(``Image.point``) gives the same bytes without building the constant image and blending. Two
tables in a row compose into one. Contrast needs the mean grey of the image as it is at that
point, so a pending table is applied before contrast reads it; saturation and hue go through
torchvision (PIL) unchanged.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
from torchvision.transforms.v2 import functional as F

_LEVELS = np.arange(256, dtype=np.float32)


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


def color_jitter(image: PIL.Image.Image, params: dict) -> PIL.Image.Image:
    """``v2.ColorJitter(...).transform(image, params)`` for an RGB PIL image, with the draws of
    ``make_params`` (``fn_idx``, ``brightness_factor``, ...)."""
    if image.mode != "RGB":
        raise ValueError(f"color_jitter: argument 'image' must be an RGB PIL image; got mode {image.mode!r}")
    pending: np.ndarray | None = None  # a table not yet applied to the pixels
    for fn_id in params["fn_idx"].tolist():
        if fn_id == 0 and params["brightness_factor"] is not None:
            table = blend_table(0, params["brightness_factor"])
            pending = table if pending is None else table[pending]
        elif fn_id == 1 and params["contrast_factor"] is not None:
            image, pending = _apply(image, pending), None
            pending = blend_table(grey_mean(image), params["contrast_factor"])
        elif fn_id == 2 and params["saturation_factor"] is not None:
            image, pending = _apply(image, pending), None
            image = F.adjust_saturation(image, params["saturation_factor"])
        elif fn_id == 3 and params["hue_factor"] is not None:
            image, pending = _apply(image, pending), None
            image = F.adjust_hue(image, params["hue_factor"])
    return _apply(image, pending)
