"""timm's RandAugment (timm/data/auto_augment.py) on torchvision v2 functional ops, for fine-tuning.

:class:`RandAugment` is the transform (``rand-m9-mstd0.5-inc1`` and friends);
:func:`rand_augment_argument` and :func:`apply_rand_augment_op` are its per-op steps.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import PIL.Image
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .transforms import IMAGENET_DEFAULT_MEAN, interpolation_mode

# Magnitudes are on timm's 0..10 scale; each op runs with probability `prob`.
_RAND_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
# "inc1": the variants whose severity increases with the magnitude.
_RAND_INCREASING_OPS = tuple(
    name + "Increasing" if name in ("Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness") else name
    for name in _RAND_OPS
)
_MAGNITUDE_SCALE = 10.0
_SIGNED_OPS = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


def rand_augment_argument(name: str, magnitude: float, negate: bool, translate_pct: float = 0.45) -> float | None:
    """The argument timm's RandAugment passes to op ``name`` at ``magnitude`` (0..10)."""
    level = magnitude / _MAGNITUDE_SCALE
    sign = -1.0 if negate else 1.0
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name == "Rotate":
        return sign * level * 30.0
    if name in ("ShearX", "ShearY"):
        return sign * level * 0.3
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * level * translate_pct
    if name == "Posterize":
        return int(level * 4)
    if name == "PosterizeIncreasing":
        return 4 - int(level * 4)
    if name == "Solarize":
        return min(256, int(level * 256))
    if name == "SolarizeIncreasing":
        return 256 - min(256, int(level * 256))
    if name == "SolarizeAdd":
        return min(128, int(level * 110))
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return level * 1.8 + 0.1
    if name.endswith("Increasing"):  # Color/Contrast/Brightness/Sharpness: 1 +- 0.9 * level, at least 0.1
        return max(0.1, 1.0 + sign * level * 0.9)
    raise ValueError(f"unknown RandAugment op {name!r}")


def _solarize_add(image: PIL.Image.Image | torch.Tensor, add: int, threshold: int = 128):
    if isinstance(image, PIL.Image.Image):
        lut = [min(255, i + add) if i < threshold else i for i in range(256)]
        return image.point(lut * len(image.getbands()))
    return torch.where(image < threshold, (image.to(torch.int16) + add).clamp_(max=255).to(image.dtype), image)


def apply_rand_augment_op(
    image: PIL.Image.Image | torch.Tensor,
    name: str,
    argument: float | None,
    *,
    fill: Sequence[int],
    interpolation: v2.InterpolationMode,
):
    """Apply one RandAugment op with its argument from :func:`rand_augment_argument`."""
    base = name.removesuffix("Increasing")
    if base == "AutoContrast":
        return F.autocontrast(image)
    if base == "Equalize":
        return F.equalize(image)
    if base == "Invert":
        return F.invert(image)
    if base == "Posterize":
        if argument >= 8:
            return image
        if argument <= 0:  # keep no bits: black (Pillow >= 11 rejects bits=0)
            return image.point([0] * 256 * len(image.getbands())) if isinstance(image, PIL.Image.Image) else image * 0
        return F.posterize(image, int(argument))
    if base == "Solarize":
        return image if argument >= 256 else F.solarize(image, argument)
    if base == "SolarizeAdd":
        return _solarize_add(image, int(argument))
    if base == "Color":
        return F.adjust_saturation(image, argument)
    if base == "Contrast":
        return F.adjust_contrast(image, argument)
    if base == "Brightness":
        return F.adjust_brightness(image, argument)
    if base == "Sharpness":
        return F.adjust_sharpness(image, argument)
    # Geometric ops: tensors support only nearest/bilinear here.
    if not isinstance(image, PIL.Image.Image) and interpolation not in (
        v2.InterpolationMode.NEAREST,
        v2.InterpolationMode.BILINEAR,
    ):
        interpolation = v2.InterpolationMode.BILINEAR
    fill = list(fill)
    if base == "Rotate":
        return F.rotate(image, argument, interpolation=interpolation, fill=fill)
    if base in ("ShearX", "ShearY"):
        # PIL's affine (1, f, 0, 0, 1, 0) about the top-left corner, as timm: shear angle atan(f).
        angle = math.degrees(math.atan(argument))
        shear = [angle, 0.0] if base == "ShearX" else [0.0, angle]
        return F.affine(
            image,
            angle=0.0,
            translate=[0, 0],
            scale=1.0,
            shear=shear,
            interpolation=interpolation,
            fill=fill,
            center=[0, 0],
        )
    if base in ("TranslateXRel", "TranslateYRel"):
        width, height = F.get_size(image)[::-1]
        # timm's PIL offset moves the content by -offset.
        translate = [-argument * width, 0.0] if base == "TranslateXRel" else [0.0, -argument * height]
        return F.affine(
            image, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0], interpolation=interpolation, fill=fill
        )
    raise ValueError(f"unknown RandAugment op {name!r}")


class RandAugment(v2.Transform):
    """timm's RandAugment (``rand-m9-mstd0.5-inc1`` and friends) as a torchvision v2 transform.

    Per image: ``num_ops`` ops drawn uniformly with replacement from the 15 ops; each runs with
    probability ``prob`` at a magnitude drawn from N(``magnitude``, ``magnitude_std``) clipped
    to [0, ``magnitude_max``]; signed ops (rotate, shear, translate, and the "increasing" colour
    ops) flip sign with probability 1/2. torchvision's own ``v2.RandAugment`` differs (31 bins,
    no per-op probability, no magnitude noise, other op set), hence this class.

    Args:
        magnitude: mean magnitude on timm's 0..10 scale (m9).
        num_ops: ops per image (n2).
        magnitude_std: magnitude noise (mstd0.5).
        increasing: use the ops whose severity grows with magnitude (inc1).
        prob: probability of each chosen op (p0.5).
        magnitude_max: upper clip of the magnitude (mmax, 10).
        fill: geometric ops' fill colour; timm uses the ImageNet mean in 0..255.
        interpolation: geometric ops' resampling; the reference passes bicubic.
        translate_pct: translation at magnitude 10 as a fraction of the image side.
    """

    def __init__(
        self,
        magnitude: float = 9,
        num_ops: int = 2,
        magnitude_std: float = 0.5,
        *,
        increasing: bool = True,
        prob: float = 0.5,
        magnitude_max: float = _MAGNITUDE_SCALE,
        fill: Sequence[int] = tuple(round(255 * m) for m in IMAGENET_DEFAULT_MEAN),
        interpolation: str = "bicubic",
        translate_pct: float = 0.45,
    ) -> None:
        super().__init__()
        self.ops = _RAND_INCREASING_OPS if increasing else _RAND_OPS
        self.magnitude = magnitude
        self.num_ops = num_ops
        self.magnitude_std = magnitude_std
        self.prob = prob
        self.magnitude_max = magnitude_max
        self.fill = tuple(int(v) for v in fill)
        self.interpolation = interpolation_mode(interpolation)
        self.translate_pct = translate_pct

    @classmethod
    def from_config(cls, config: str, **kwargs) -> RandAugment:
        """Parse timm's config string, e.g. ``"rand-m9-mstd0.5-inc1"`` (keys m, n, mstd, inc, p, mmax)."""
        sections = config.split("-")
        if sections[0] != "rand":
            raise ValueError(f"RandAugment config must start with 'rand'; got {config!r}")
        keys = {"m": "magnitude", "n": "num_ops", "mstd": "magnitude_std", "inc": "increasing", "p": "prob"}
        keys["mmax"] = "magnitude_max"
        for section in sections[1:]:
            match = re.fullmatch(r"([a-z]+)([\d.]+)", section)
            if match is None or match.group(1) not in keys:
                raise ValueError(f"RandAugment config {config!r}: unknown section {section!r}")
            key, value = match.groups()
            kwargs[keys[key]] = bool(int(value)) if key == "inc" else int(value) if key == "n" else float(value)
        if kwargs.get("magnitude_std", 0) > 100:  # timm: mstd > 100 means uniform in [0, m]
            kwargs["magnitude_std"] = float("inf")
        return cls(**kwargs)

    def _draw_magnitude(self) -> float:
        magnitude = self.magnitude
        if self.magnitude_std == float("inf"):
            magnitude = torch.empty(1).uniform_(0, magnitude).item()
        elif self.magnitude_std > 0:
            magnitude = magnitude + self.magnitude_std * torch.randn(1).item()
        return max(0.0, min(magnitude, self.magnitude_max))

    def forward(self, image):
        for op_index in torch.randint(len(self.ops), (self.num_ops,)).tolist():
            if self.prob < 1.0 and torch.rand(1).item() > self.prob:
                continue
            name = self.ops[op_index]
            magnitude = self._draw_magnitude()
            negate = bool(torch.rand(1).item() > 0.5)
            argument = rand_augment_argument(name, magnitude, negate, self.translate_pct)
            image = apply_rand_augment_op(image, name, argument, fill=self.fill, interpolation=self.interpolation)
        return image

    def extra_repr(self) -> str:
        return (
            f"magnitude={self.magnitude}, num_ops={self.num_ops}, magnitude_std={self.magnitude_std}, "
            f"prob={self.prob}, ops={list(self.ops)}"
        )
