"""The classification fine-tuning train transform (timm's ``create_transform(is_training=True)``).

Random resized crop, flip, RandAugment ``rand-m9-mstd0.5-inc1`` (``randaugment.py``),
normalisation and random erasing, as timm builds it for the reference (spec section 6.1);
batches are then mixed by ``mixup.MixupCutmix``. Evaluation uses ``transforms.EvalTransform``.
"""

from __future__ import annotations

from collections.abc import Sequence

import PIL.Image
import torch
from torchvision.transforms import v2

from .randaugment import RandAugment
from .transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    Normalize,
    interpolation_mode,
    size_pair,
    to_uint8_tensor,
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
                size_pair(input_size, "input_size"),
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
        out = to_uint8_tensor(self.geometry(image))
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
