"""Image transforms of pretraining, tokenizer training and evaluation, built on torchvision.transforms.v2.

* :class:`PretrainTransform`: BEiT v2 pretraining. One colour jitter, one flip and one random
  resized crop give two views of the same region: the student view (ImageNet mean/std) and the
  tokenizer view (in [0, 1]). U ``beit2/datasets.py`` ``DataAugmentationForBEiT`` (spec section 4).
* :class:`TokenizerTransform`: VQ-KD training, images in [0, 1] (spec section 1.4).
* :class:`EvalTransform`: resize to ``size / crop_pct`` and centre crop.

Fine-tuning has its own modules: ``finetune_transforms.py`` (:class:`FinetuneTransform`),
``randaugment.py`` (timm's RandAugment) and ``mixup.py`` (batch mixup/cutmix).

Every transform works on PIL images (as the reference does) and draws its randomness from
torch's global generator, which the loader seeds per sample. Each takes ``uint8_output``:
when True it stops at a uint8 tensor and its :meth:`finish` does the float conversion and
normalisation later on a whole batch, on the GPU if the batch is there (timm's
``PrefetchLoader`` idea: four times less to copy, no float work in the workers).
"""

from __future__ import annotations

import math
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


def size_pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    """``(height, width)`` of an int or a pair; refuses a non-positive size naming the argument."""
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


def to_uint8_tensor(image: PIL.Image.Image | torch.Tensor) -> torch.Tensor:
    """A PIL image or a torchvision image tensor as a plain uint8 ``[3, H, W]`` tensor."""
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
        self.input_size = size_pair(input_size, "input_size")
        self.second_input_size = size_pair(second_input_size, "second_input_size")
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
        student = to_uint8_tensor(F.resize(crop, list(self.input_size), interpolation=self.interpolation))
        if (self.second_input_size, self.second_interpolation) == (self.input_size, self.interpolation):
            tokenizer = student  # the recipe's case (224/224, bicubic/bicubic): the same pixels, resized once
        else:
            tokenizer = to_uint8_tensor(
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
            views.append(to_uint8_tensor(F.horizontal_flip(view) if params["flip"] else view))
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
        out = to_uint8_tensor(self.geometry(image))
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
                size_pair(input_size, "input_size"),
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
