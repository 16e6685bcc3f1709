"""Image transforms of the three tasks, built on torchvision.transforms.v2.

* :class:`PretrainTransform`: BEiT v2 pretraining. One colour jitter, one flip and one random
  resized crop give two views of the same region: the student view (ImageNet mean/std) and the
  tokenizer view (in [0, 1]). U ``beit2/datasets.py`` ``DataAugmentationForBEiT`` (spec section 4).
* :class:`TokenizerTransform`: VQ-KD training, images in [0, 1] (spec section 1.4).
* :class:`FinetuneTransform`: classification fine-tuning as timm's ``create_transform`` builds
  it for the reference (spec section 6.1): random resized crop, flip, RandAugment
  ``rand-m9-mstd0.5-inc1`` (:class:`RandAugment`, timm's semantics on v2 functional ops),
  normalisation and random erasing. :class:`MixupCutmix` mixes batches.
* :class:`EvalTransform`: resize to ``size / crop_pct`` and centre crop.

Every transform works on PIL images (as the reference does) and draws its randomness from
torch's global generator, which the loader seeds per sample. Each takes ``uint8_output``:
when True it stops at a uint8 tensor and its :meth:`finish` does the float conversion and
normalisation later on a whole batch, on the GPU if the batch is there (timm's
``PrefetchLoader`` idea: four times less to copy, no float work in the workers).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import PIL.Image
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .color import color_jitter
from .decode import CropDecoded

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

_INTERPOLATIONS = {
    "bicubic": v2.InterpolationMode.BICUBIC,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "lanczos": v2.InterpolationMode.LANCZOS,
    "nearest": v2.InterpolationMode.NEAREST,
    "hamming": v2.InterpolationMode.HAMMING,
    "box": v2.InterpolationMode.BOX,
}


def interpolation_mode(name: str) -> v2.InterpolationMode:
    """The torchvision mode for a reference ``--*_interpolation`` name ("bicubic", "bilinear", ...)."""
    try:
        return _INTERPOLATIONS[name]
    except KeyError:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}; got {name!r}") from None


_PIL_RESAMPLING = {
    v2.InterpolationMode.BICUBIC: PIL.Image.Resampling.BICUBIC,
    v2.InterpolationMode.BILINEAR: PIL.Image.Resampling.BILINEAR,
    v2.InterpolationMode.LANCZOS: PIL.Image.Resampling.LANCZOS,
    v2.InterpolationMode.NEAREST: PIL.Image.Resampling.NEAREST,
    v2.InterpolationMode.HAMMING: PIL.Image.Resampling.HAMMING,
    v2.InterpolationMode.BOX: PIL.Image.Resampling.BOX,
}


# Half-width of each filter's kernel in input pixels at scale 1 (Pillow's ``libImaging/Resample.c``);
# nearest reads inside the box.
_FILTER_SUPPORT = {
    v2.InterpolationMode.NEAREST: 0.0,
    v2.InterpolationMode.BOX: 0.5,
    v2.InterpolationMode.BILINEAR: 1.0,
    v2.InterpolationMode.HAMMING: 1.0,
    v2.InterpolationMode.BICUBIC: 2.0,
    v2.InterpolationMode.LANCZOS: 3.0,
}


def _resize_reads(
    image_size: tuple[int, int],
    box: tuple[float, float, float, float],
    output_sizes: Sequence[tuple[int, int]],
    modes: Sequence[v2.InterpolationMode],
) -> tuple[int, int, int, int]:
    """(left, upper, right, lower) around every pixel that ``image.resize(size, mode, box=box)``
    reads for each (height, width) size and mode: Pillow's kernel spans ``support * max(scale, 1)``
    either side of each output pixel's centre, its ends rounded (one pixel more here), clamped to
    the image."""
    bounds = [math.inf, math.inf, -math.inf, -math.inf]
    for (height, width), mode in zip(output_sizes, modes, strict=True):
        for axis, count in ((0, width), (1, height)):
            start, end = box[axis], box[axis + 2]
            reach = _FILTER_SUPPORT[mode] * max((end - start) / count, 1.0) + 1
            bounds[axis] = min(bounds[axis], start - reach)
            bounds[axis + 2] = max(bounds[axis + 2], end + reach)
    limits = image_size * 2
    return tuple(min(max(math.floor(v) if i < 2 else math.ceil(v), 0), limits[i]) for i, v in enumerate(bounds))


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height < 1 or width < 1:
        raise ValueError(f"argument '{name}' must be a positive size; got {size}")
    return height, width


class Normalize:
    """uint8 images ``[..., 3, H, W]`` to float32: ``x / 255``, then ``(x - mean) / std`` if given.

    The same arithmetic runs per sample in a worker and per batch on the GPU, so both paths
    give the same numbers.
    """

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        if (mean is None) != (std is None):
            raise ValueError("Normalize: give both 'mean' and 'std' or neither")
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _statistics(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on_device:  # copy once per device, not once per batch
            self._on_device[device] = (self.mean.to(device), self.std.to(device))
        return self._on_device[device]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"Normalize: argument 'images' must be uint8; got {images.dtype}")
        out = images.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)  # HWC views in, CHW out
        if self.mean is not None:
            mean, std = self._statistics(out.device)
            out.sub_(mean).div_(std)
        return out

    def __repr__(self) -> str:
        if self.mean is None:
            return "Normalize(to [0, 1])"
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def _to_uint8_tensor(image: PIL.Image.Image | torch.Tensor) -> torch.Tensor:
    if isinstance(image, PIL.Image.Image):
        return F.pil_to_tensor(image)
    return image.as_subclass(torch.Tensor)


class PretrainTransform:
    """The BEiT v2 two-view pretraining transform.

    Order and parameters as the reference: ``ColorJitter(cj, cj, cj)`` on the whole image, then
    ``RandomHorizontalFlip(hflip)``, then one random resized crop box (area ``min_crop_scale``
    to 1, ratio 3/4 to 4/3, up to 10 attempts and a centre-crop fallback) resized twice: to
    ``input_size`` with ``interpolation`` for the student and to ``second_input_size`` with
    ``second_interpolation`` for the tokenizer. The recipe passes bicubic for both. The jitter
    and the flip run on the pixels the resizes read, with contrast's mean taken on the whole image:
    the reference's bytes for less work (``color.py``).

    Args:
        input_size: student view size (224).
        second_input_size: tokenizer view size (224).
        min_crop_scale: smallest crop area fraction (``--min_crop_scale`` 0.2 in the recipe).
        ratio: aspect ratio range of the crop box.
        interpolation: student resize (``--train_interpolation``).
        second_interpolation: tokenizer resize (``--second_interpolation``).
        color_jitter: brightness, contrast and saturation strength; 0 disables it.
        hflip: flip probability.
        mean, std: student normalisation (``--imagenet_default_mean_and_std``).
        uint8_output: return uint8 views and leave the float conversion to :meth:`finish`.
        fast_decode: the loader decodes each JPEG at the smallest DCT scale that leaves the crop
            at least as large as both views (``decode.py``); the draws are the same, the pixels
            differ by resampling noise. Needs a dataset of files.
    """

    def __init__(
        self,
        input_size: int | Sequence[int] = 224,
        second_input_size: int | Sequence[int] = 224,
        *,
        min_crop_scale: float = 0.2,
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str = "bicubic",
        second_interpolation: str = "bicubic",
        color_jitter: float = 0.4,
        hflip: float = 0.5,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        uint8_output: bool = False,
        fast_decode: bool = False,
    ) -> None:
        if not 0 < min_crop_scale <= 1:
            raise ValueError(f"PretrainTransform: argument 'min_crop_scale' must be in (0, 1]; got {min_crop_scale}")
        self.input_size = _pair(input_size, "input_size")
        self.second_input_size = _pair(second_input_size, "second_input_size")
        self.interpolation = interpolation_mode(interpolation)
        self.second_interpolation = interpolation_mode(second_interpolation)
        self.jitter = v2.ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter > 0 else None
        self.hflip = hflip
        self.crop = v2.RandomResizedCrop(
            self.input_size, scale=(min_crop_scale, 1.0), ratio=ratio, interpolation=self.interpolation
        )
        self.student_normalize = Normalize(mean, std)
        self.tokenizer_normalize = Normalize()
        self.uint8_output = uint8_output
        self.fast_decode = fast_decode

    @property
    def output_sizes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(height, width) of the student and tokenizer views."""
        return self.input_size, self.second_input_size

    def sample_params(self, width: int, height: int) -> dict:
        """Draw the jitter, flip and crop box of one image of size ``width`` x ``height``.

        The DALI pipeline calls this too, so both paths make the same draws in the same order.
        The box is in the coordinates of the flipped image, as in the reference (flip, then crop).
        """
        jitter = self.jitter.make_params([]) if self.jitter is not None else None
        flip = bool(torch.rand(1).item() < self.hflip)
        # The crop draw reads only the size; an empty tensor of that size stands in for the image.
        box = self.crop.make_params([torch.empty((0, height, width), dtype=torch.uint8)])
        return {"jitter": jitter, "flip": flip, "box": box}

    def __call__(self, image: PIL.Image.Image | CropDecoded) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views of an RGB image, or of a :class:`CropDecoded` (``fast_decode``: drawn at decode time)."""
        if isinstance(image, CropDecoded):
            params, reduction, full_width = image.params, image.reduction, image.full_size[0]
            image = image.image
        else:
            height, width = F.get_size(image)
            params, reduction = self.sample_params(width, height), 1
        if reduction > 1:
            student, tokenizer = self._reduced_views(image, params, reduction, full_width)
        else:
            student, tokenizer = self._views(image, params)
        if self.uint8_output:
            return student, tokenizer
        return self.student_normalize(student), self.tokenizer_normalize(tokenizer)

    @staticmethod
    def _jittered(image: PIL.Image.Image, params: dict, region: tuple[int, int, int, int]) -> PIL.Image.Image:
        """``region`` of the jittered image, jittered alone (``color.py``: the same bytes)."""
        if params["jitter"] is None:
            return image.crop(region)
        return color_jitter(image, params["jitter"], region)

    def _views(self, image: PIL.Image.Image, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's jitter, flip and crop-then-resize, with the jitter and the flip on the
        crop alone: the box (drawn on the flipped image) mirrored onto the unflipped one."""
        box = params["box"]
        left = image.width - box["left"] - box["width"] if params["flip"] else box["left"]
        crop = self._jittered(image, params, (left, box["top"], left + box["width"], box["top"] + box["height"]))
        if params["flip"]:
            crop = F.horizontal_flip(crop)
        student = _to_uint8_tensor(F.resize(crop, list(self.input_size), interpolation=self.interpolation))
        if (self.second_input_size, self.second_interpolation) == (self.input_size, self.interpolation):
            tokenizer = student  # the recipe's case (224/224, bicubic/bicubic): the same pixels, resized once
        else:
            tokenizer = _to_uint8_tensor(
                F.resize(crop, list(self.second_input_size), interpolation=self.second_interpolation)
            )
        return student, tokenizer

    def _reduced_views(
        self, image: PIL.Image.Image, params: dict, reduction: int, full_width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The views from an image decoded at 1/``reduction``: the box (drawn on the flipped
        full-size image) mirrored onto the unflipped image, divided by ``reduction``, resized
        with a fractional box, and the small views flipped instead of the whole image. The
        jitter runs on the pixels the resizes read, pasted back into a copy of the image so
        that each resize sees the same coordinates."""
        box = params["box"]
        left = full_width - box["left"] - box["width"] if params["flip"] else box["left"]
        region = tuple(v / reduction for v in (left, box["top"], left + box["width"], box["top"] + box["height"]))
        modes = (self.interpolation, self.second_interpolation)
        if params["jitter"] is not None:
            read = _resize_reads(image.size, region, self.output_sizes, modes)
            jittered = image.copy()
            jittered.paste(self._jittered(image, params, read), read[:2])
            image = jittered
        views = []
        for (height, width), mode in zip(self.output_sizes, modes, strict=True):
            if views and ((height, width), mode) == (self.input_size, self.interpolation):
                views.append(views[0])  # the recipe's case: both views the same pixels
                continue
            view = image.resize((width, height), _PIL_RESAMPLING[mode], box=region)
            views.append(_to_uint8_tensor(F.horizontal_flip(view) if params["flip"] else view))
        return views[0], views[1]

    def finish(self, student: torch.Tensor, tokenizer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 views (one sample or a batch) to what ``uint8_output=False`` returns."""
        return self.student_normalize(student), self.tokenizer_normalize(tokenizer)

    def __repr__(self) -> str:
        return (
            f"PretrainTransform(jitter={self.jitter}, hflip={self.hflip}, crop={self.crop}, "
            f"second_size={self.second_input_size}, second_interpolation={self.second_interpolation.value}, "
            f"student={self.student_normalize}, tokenizer={self.tokenizer_normalize}, uint8_output={self.uint8_output})"
        )


class _GeometryThenNormalize:
    """One view: ``geometry`` (PIL in, PIL out), then uint8 and ``normalize``; with
    ``uint8_output`` the normalisation is left to :meth:`finish` (on the batch, on the device)."""

    geometry: v2.Compose
    normalize: Normalize
    uint8_output: bool

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        out = _to_uint8_tensor(self.geometry(image))
        return out if self.uint8_output else self.normalize(out)

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalize(images)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.geometry}, {self.normalize}, uint8_output={self.uint8_output})"


class TokenizerTransform(_GeometryThenNormalize):
    """VQ-KD training: [ColorJitter if > 0] -> random resized crop (bicubic) -> flip -> [0, 1].

    Args:
        input_size: output size (224).
        min_crop_scale: smallest crop area fraction (0.08, the tokenizer script's default).
        color_jitter: jitter strength; the reference default is 0 (off).
        interpolation: crop resize mode.
        hflip: flip probability.
        uint8_output: return uint8 and leave the scaling to :meth:`finish`.
    """

    def __init__(
        self,
        input_size: int | Sequence[int] = 224,
        *,
        min_crop_scale: float = 0.08,
        color_jitter: float = 0.0,
        interpolation: str = "bicubic",
        hflip: float = 0.5,
        uint8_output: bool = False,
    ) -> None:
        steps = [v2.ColorJitter(color_jitter, color_jitter, color_jitter)] if color_jitter > 0 else []
        steps += [
            v2.RandomResizedCrop(
                _pair(input_size, "input_size"),
                scale=(min_crop_scale, 1.0),
                interpolation=interpolation_mode(interpolation),
            ),
            v2.RandomHorizontalFlip(hflip),
        ]
        self.geometry = v2.Compose(steps)
        self.normalize = Normalize()
        self.uint8_output = uint8_output


class EvalTransform(_GeometryThenNormalize):
    """Resize the short side to ``int(size / crop_pct)`` and centre-crop ``size``.

    ``crop_pct`` defaults to the reference's rule: 224/256 below 384 px, else 1. With
    ``mean``/``std`` None the output is in [0, 1] (tokenizer evaluation).
    """

    def __init__(
        self,
        input_size: int = 224,
        *,
        crop_pct: float | None = None,
        interpolation: str = "bicubic",
        mean: Sequence[float] | None = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] | None = IMAGENET_DEFAULT_STD,
        uint8_output: bool = False,
    ) -> None:
        if crop_pct is None:
            crop_pct = 224 / 256 if input_size < 384 else 1.0
        if not 0 < crop_pct <= 1:
            raise ValueError(f"EvalTransform: argument 'crop_pct' must be in (0, 1]; got {crop_pct}")
        self.crop_pct = crop_pct
        self.geometry = v2.Compose(
            [
                v2.Resize(int(input_size / crop_pct), interpolation=interpolation_mode(interpolation)),
                v2.CenterCrop(input_size),
            ]
        )
        self.normalize = Normalize(mean, std)
        self.uint8_output = uint8_output


# RandAugment, as timm implements it (timm/data/auto_augment.py), on torchvision v2 functional
# ops. Magnitudes are on timm's 0..10 scale; each op runs with probability `prob`.
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


class FinetuneTransform:
    """Fine-tuning train transform: timm ``create_transform(is_training=True)`` as the reference calls it.

    Random resized crop (area ``min_crop_scale`` to 1, bicubic) -> flip -> RandAugment ->
    to float and normalise -> random erasing (probability ``reprob``, per-pixel normal values,
    timm's "pixel" mode, one region). timm turns colour jitter off when RandAugment is on.

    Args:
        input_size: output size.
        auto_augment: timm RandAugment config string, or None for no RandAugment.
        reprob: random erasing probability (0.25).
        min_crop_scale: smallest crop area fraction (0.08).
        interpolation: crop and RandAugment resampling (bicubic).
        hflip: flip probability.
        mean, std: normalisation.
        uint8_output: stop at uint8; :meth:`finish` then normalises and erases a batch.
    """

    def __init__(
        self,
        input_size: int | Sequence[int] = 224,
        *,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        reprob: float = 0.25,
        min_crop_scale: float = 0.08,
        interpolation: str = "bicubic",
        hflip: float = 0.5,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        uint8_output: bool = False,
    ) -> None:
        steps = [
            v2.RandomResizedCrop(
                _pair(input_size, "input_size"),
                scale=(min_crop_scale, 1.0),
                interpolation=interpolation_mode(interpolation),
            ),
            v2.RandomHorizontalFlip(hflip),
        ]
        if auto_augment:
            fill = tuple(min(255, round(255 * m)) for m in mean)
            steps.append(RandAugment.from_config(auto_augment, fill=fill, interpolation=interpolation))
        self.geometry = v2.Compose(steps)
        self.normalize = Normalize(mean, std)
        # timm's defaults: area 0.02..1/3, log-uniform ratio 0.3..3.3, per-pixel N(0, 1) values.
        self.erase = v2.RandomErasing(p=reprob, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), value="random")
        self.reprob = reprob
        self.uint8_output = uint8_output

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        out = _to_uint8_tensor(self.geometry(image))
        return out if self.uint8_output else self._normalize_and_erase(out)

    def _normalize_and_erase(self, image: torch.Tensor) -> torch.Tensor:
        out = self.normalize(image)
        return self.erase(out) if self.reprob > 0 else out

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[3, H, W]`` or ``[B, 3, H, W]`` to normalised, erased float (each image its own region)."""
        if images.dim() == 3:
            return self._normalize_and_erase(images)
        out = self.normalize(images)
        if self.reprob > 0:
            for i in range(out.shape[0]):
                out[i] = self.erase(out[i])
        return out

    def __repr__(self) -> str:
        return f"FinetuneTransform({self.geometry}, {self.normalize}, {self.erase}, uint8_output={self.uint8_output})"


class MixupCutmix:
    """Batch mixup or cutmix with label smoothing, as timm's ``Mixup`` in "batch" mode.

    With probability ``prob`` a batch is mixed: cutmix with probability ``switch_prob`` (when
    both alphas are positive), else mixup, by torchvision's ``v2.MixUp``/``v2.CutMix`` (cutmix's
    lambda corrected to the clipped box area, as timm's ``correct_lam``). The mixed one-hot
    targets are then smoothed: ``t * (1 - s) + s / K``, which equals timm's mix of smoothed targets.

    Args:
        num_classes: K.
        mixup_alpha: Beta parameter of mixup (0.8); 0 disables mixup.
        cutmix_alpha: Beta parameter of cutmix (1.0); 0 disables cutmix.
        prob: probability of mixing a batch.
        switch_prob: probability of cutmix when both are enabled.
        label_smoothing: s (0.1).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"MixupCutmix: argument 'num_classes' must be positive; got {num_classes}")
        choices, weights = [], []
        if mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
            weights.append(1.0 - switch_prob if cutmix_alpha > 0 else 1.0)
        if cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
            weights.append(switch_prob if mixup_alpha > 0 else 1.0)
        self.mix = v2.RandomChoice(choices, p=weights) if choices else None
        self.num_classes = num_classes
        self.prob = prob
        self.label_smoothing = label_smoothing

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images [B, 3, H, W]`` float, ``labels [B]`` int64 -> mixed images, soft targets ``[B, K]`` float32."""
        if self.mix is not None and (self.prob >= 1.0 or torch.rand(1).item() < self.prob):
            images, targets = self.mix(images, labels)
        else:
            targets = torch.nn.functional.one_hot(labels, self.num_classes).to(torch.float32)
        targets = targets.to(torch.float32) * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_classes
        return images, targets

    def __repr__(self) -> str:
        return f"MixupCutmix({self.mix}, prob={self.prob}, label_smoothing={self.label_smoothing})"
