"""Batch mixup and cutmix with label smoothing (timm's ``Mixup``, "batch" mode) for fine-tuning."""

from __future__ import annotations

import torch
from torchvision.transforms import v2


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
