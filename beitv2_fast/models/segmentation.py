"""Semantic segmentation with BEiT v2: UperNet on a BEiT feature pyramid, its loss and inference.

The architecture of microsoft/unilm ``beit2/semantic_segmentation`` (its ``BEiT`` backbone and the
``upernet_beit_{base,large}_*_512_slide_160k_ade20k`` configs) on mmsegmentation 0.11's
``EncoderDecoder`` with ``UPerHead`` and an auxiliary ``FCNHead``, with their module names, so
that the released ``beitv2_*_ftade20k.pth`` state dicts (``backbone.*``, ``decode_head.*``,
``auxiliary_head.*``) load with ``strict=True``:

- backbone: the BEiT ViT with a relative position table per block, no final norm; the patch
  tokens after blocks ``out_indices`` become a 4-level pyramid at strides 4, 8, 16, 32
  (``fpn1``: two 2x2 transposed convolutions with BatchNorm and GELU between them, ``fpn2``: one,
  ``fpn3``: identity, ``fpn4``: 2x2 max-pool). Attention is ``kernels.relpos_attention``.
- ``decode_head``: UperNet: a pyramid pooling module (scales 1, 2, 3, 6) on the last level, 1x1
  lateral and 3x3 output convolutions of a top-down FPN, a 3x3 fusion of the four levels
  upsampled to stride 4, dropout and a 1x1 classifier.
- ``auxiliary_head``: one 3x3 convolution on the third level (stride 16), dropout, classifier;
  its loss counts 0.4.

Every convolution of the heads is mmcv's ``ConvModule``: convolution without bias, BatchNorm,
ReLU (names ``conv``, ``bn``). The official config uses SyncBN; the model is built with
``BatchNorm2d`` and :func:`convert_sync_batchnorm` turns it into SyncBN for multi-GPU training.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .classifier import prepare_finetune_state_dict
from .convert import CheckpointMismatchError, fill_derived_buffers, load_state_dict_file, unwrap_state_dict
from .registry import register_model
from .vit import SIZES, BEiTBackbone

IGNORE_INDEX = 255


# ------------------------------------------------------------------------------------------------
# Backbone
# ------------------------------------------------------------------------------------------------
class BEiTFeaturePyramid(BEiTBackbone):
    """The official segmentation backbone: BEiT blocks, then a 4-level feature pyramid.

    Args:
        out_indices: the 4 blocks (0-based) whose patch tokens feed the pyramid ([3, 5, 7, 11]
            for base, [7, 11, 15, 23] for large).
        **kwargs: :class:`~beitv2_fast.models.vit.BEiTBackbone`'s (the official configs:
            ``qkv_bias``, ``use_rel_pos_bias``, no absolute position embedding, layer scale).

    ``forward(images [B, 3, H, W])`` returns 4 maps ``[B, D, H/4, W/4]`` ... ``[B, D, H/32, W/32]``
    (patch size 16: two transposed convolutions, one, identity, max-pool; patch size 8, as the
    reference: one transposed convolution, identity, max-pools by 2 and by 4).
    """

    def __init__(self, *, out_indices: Sequence[int] = (3, 5, 7, 11), **kwargs):
        super().__init__(**kwargs)
        self.out_indices = [int(i) for i in out_indices]
        depth = len(self.blocks)
        if len(self.out_indices) != 4 or not all(0 <= i < depth for i in self.out_indices):
            raise ValueError(f"out_indices must be 4 block indices in 0..{depth - 1}; got {list(out_indices)}")
        dim = self.embed_dim
        patch = self.patch_embed.patch_size
        if patch == (16, 16):
            self.fpn1 = nn.Sequential(
                nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
                nn.BatchNorm2d(dim),
                nn.GELU(),
                nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
            )
            self.fpn2 = nn.Sequential(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
            self.fpn3 = nn.Identity()
            self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)
        elif patch == (8, 8):
            self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
            self.fpn2 = nn.Identity()
            self.fpn3 = nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=2))
            self.fpn4 = nn.Sequential(nn.MaxPool2d(kernel_size=4, stride=4))
        else:
            raise ValueError(f"the feature pyramid needs patch size 16 or 8 (as the reference); got {patch}")
        self.init_transformer_weights()  # the reference backbone's: Linear/LayerNorm/tokens, not the convolutions

    strides = (4, 8, 16, 32)  # output stride of each level, for both patch sizes

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        batch = x.shape[0]
        patch = self.patch_embed.patch_size
        grid = (x.shape[-2] // patch[0], x.shape[-1] // patch[1])
        levels = []
        tokens = self.intermediate_tokens(x, self.out_indices)
        for fpn, level in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), tokens, strict=True):
            patches = level[:, 1:].transpose(1, 2).reshape(batch, self.embed_dim, *grid)
            levels.append(fpn(patches))
        return levels


# ------------------------------------------------------------------------------------------------
# Heads (mmsegmentation 0.11: ConvModule, PPM, UPerHead, FCNHead, BaseDecodeHead.cls_seg)
# ------------------------------------------------------------------------------------------------
class ConvModule(nn.Module):
    """mmcv's ``ConvModule`` with BatchNorm and ReLU: ``relu(bn(conv(x)))``, the convolution
    without bias, initialised as mmcv (Kaiming normal, fan-out, for ReLU; BN weight 1, bias 0)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, a=0, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """mmseg's ``resize``: bilinear, ``align_corners=False`` (the configs' setting)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class _Classifier(nn.Module):
    """``BaseDecodeHead``'s end: ``Dropout2d`` then the 1x1 ``conv_seg`` (normal, std 0.01)."""

    def __init__(self, channels: int, num_classes: int, dropout_ratio: float):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def cls_seg(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))


class PyramidPoolingModule(nn.Sequential):
    """mmseg's ``PPM``: per scale, adaptive average pooling to ``scale x scale`` and a 1x1
    ``ConvModule``, each upsampled back to the input size. Members ``0, 1, ...`` are
    ``Sequential(pool, ConvModule)`` (state-dict names ``psp_modules.N.1.conv.weight``)."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int):
        super().__init__(
            *(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels, channels, 1)) for s in pool_scales)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [_resize(branch(x), x.shape[2:]) for branch in self]


class UPerHead(_Classifier):
    """UperNet (Xiao et al. 2018) as mmseg's ``UPerHead`` on 4 levels: PPM + 3x3 ``bottleneck`` on the
    last level, 1x1 ``lateral_convs`` on the others, top-down sums (bilinear), 3x3 ``fpn_convs``,
    everything upsampled to the first level, concatenated, 3x3 ``fpn_bottleneck``, classifier.
    Returns logits at the first level's resolution."""

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout_ratio: float = 0.1,
    ):
        super().__init__(channels, num_classes, dropout_ratio)
        self.psp_modules = PyramidPoolingModule(pool_scales, in_channels[-1], channels)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        # Sequential, not ModuleList: the training loop shards and compiles ModuleList members as blocks.
        self.lateral_convs = nn.Sequential(*(ConvModule(c, channels, 1) for c in in_channels[:-1]))
        self.fpn_convs = nn.Sequential(*(ConvModule(channels, channels, 3) for _ in in_channels[:-1]))
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3)

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        top = levels[-1]
        laterals = [conv(level) for conv, level in zip(self.lateral_convs, levels, strict=False)]
        laterals.append(self.bottleneck(torch.cat([top, *self.psp_modules(top)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals, strict=False)] + [laterals[-1]]
        size = outs[0].shape[2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], dim=1))
        return self.cls_seg(fused)


class FCNHead(_Classifier):
    """mmseg's ``FCNHead`` as the auxiliary head of the configs: ``num_convs`` 3x3 ``ConvModule`` on
    level ``in_index``, no concatenation with the input, classifier."""

    def __init__(
        self, in_channels: int, channels: int, num_classes: int, num_convs: int = 1, dropout_ratio: float = 0.1,
        in_index: int = 2,
    ):  # fmt: skip
        super().__init__(channels, num_classes, dropout_ratio)
        self.in_index = in_index
        self.convs = nn.Sequential(
            *(ConvModule(in_channels if i == 0 else channels, channels, 3) for i in range(num_convs))
        )

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.cls_seg(self.convs(levels[self.in_index]))


# ------------------------------------------------------------------------------------------------
# The segmentor
# ------------------------------------------------------------------------------------------------
class SegmentationLogits(NamedTuple):
    """Raw head outputs: ``decode [B, K, H/4, W/4]`` and, in training, ``auxiliary [B, K, H/16, W/16]``."""

    decode: torch.Tensor
    auxiliary: torch.Tensor | None


class BEiTUperNet(nn.Module):
    """BEiT backbone + UperNet decode head + auxiliary FCN head (mmseg's ``EncoderDecoder``).

    Args:
        num_classes: classes (150 for ADE20K).
        channels: UperNet width (768 base, 1024 large in the official configs).
        aux_channels: auxiliary head width (256).
        pool_scales: PPM scales.
        dropout_ratio: ``Dropout2d`` before both classifiers.
        aux_loss_weight: weight of the auxiliary loss (0.4); 0 builds no auxiliary head.
        out_indices: blocks feeding the pyramid.
        **backbone_kwargs: :class:`BEiTFeaturePyramid`'s.

    ``forward(images)`` gives :class:`SegmentationLogits` (the auxiliary logits in training mode
    only, as mmseg computes them); :meth:`encode_decode` the decode logits at the image size.
    """

    def __init__(
        self,
        *,
        num_classes: int = 150,
        channels: int = 768,
        aux_channels: int = 256,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout_ratio: float = 0.1,
        aux_loss_weight: float = 0.4,
        out_indices: Sequence[int] = (3, 5, 7, 11),
        **backbone_kwargs,
    ):
        super().__init__()
        if num_classes < 1 or num_classes > IGNORE_INDEX:
            raise ValueError(f"num_classes must lie in 1..{IGNORE_INDEX} (255 is the ignored label); got {num_classes}")
        self.num_classes = num_classes
        self.aux_loss_weight = aux_loss_weight
        self.backbone = BEiTFeaturePyramid(out_indices=out_indices, **backbone_kwargs)
        dim = self.backbone.embed_dim
        self.decode_head = UPerHead([dim] * 4, channels, num_classes, pool_scales, dropout_ratio)
        self.auxiliary_head = FCNHead(dim, aux_channels, num_classes, 1, dropout_ratio) if aux_loss_weight > 0 else None

    # -- information for the training loop ------------------------------------------------------
    @property
    def input_size(self) -> tuple[int, int]:
        """The image (window) size the relative position tables are built for."""
        return self.backbone.patch_embed.img_size

    def get_num_layers(self) -> int:
        return self.backbone.get_num_layers()

    def get_layer_id(self, name: str) -> int:
        """The reference's layer ids for layer-wise lr decay: backbone embeddings 0, block ``k``
        ``k + 1``, everything else (the heads, the pyramid) ``depth + 1``."""
        if name.startswith("backbone."):
            return self.backbone.get_layer_id(name[len("backbone.") :])
        return self.get_num_layers() + 1

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """None beyond the ndim <= 1 and ``.bias`` rule: the reference's
        ``LayerDecayOptimizerConstructor`` tests the names ``pos_embed``/``cls_token``, which never
        match the prefixed ``backbone.cls_token``, so the class token is decayed there too."""
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> SegmentationLogits:
        levels = self.backbone(images)
        decode = self.decode_head(levels)
        auxiliary = self.auxiliary_head(levels) if self.training and self.auxiliary_head is not None else None
        return SegmentationLogits(decode, auxiliary)

    def encode_decode(self, images: torch.Tensor) -> torch.Tensor:
        """Decode-head logits ``[B, K, H, W]`` upsampled (bilinear) to the image size."""
        return _resize(self(images).decode, images.shape[2:])


def segmentation_loss(
    outputs: SegmentationLogits, labels: torch.Tensor, *, aux_weight: float = 0.4, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The official training loss: cross-entropy of each head's logits upsampled (bilinear, in
    fp32, as mmseg's ``force_fp32``) to the label size, ``decode + aux_weight * auxiliary``.

    As mmseg 0.11's ``CrossEntropyLoss`` (``avg_non_ignore=False``), each term is the sum over
    non-ignored pixels divided by the number of all pixels, ignored ones included.

    Args:
        labels: ``[B, H, W]`` int64 class ids, ``ignore_index`` where unlabelled.

    Returns:
        ``(loss, metrics)``: ``loss_decode``, ``loss_aux`` and ``pixel_acc`` (decode head, over
        the labelled pixels).
    """
    if labels.dim() != 3:
        raise ValueError(f"segmentation_loss: argument 'labels' must have shape [B, H, W]; got {tuple(labels.shape)}")

    def cross_entropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        upsampled = _resize(logits.float(), labels.shape[-2:])
        loss = F.cross_entropy(upsampled, labels, ignore_index=ignore_index, reduction="sum") / labels.numel()
        return loss, upsampled

    loss_decode, upsampled = cross_entropy(outputs.decode)
    labelled = labels != ignore_index
    correct = ((upsampled.detach().argmax(1) == labels) & labelled).sum()
    metrics = {"loss_decode": loss_decode.detach(), "pixel_acc": correct / labelled.sum().clamp_min(1)}
    loss = loss_decode
    if outputs.auxiliary is not None and aux_weight > 0:
        loss_aux = cross_entropy(outputs.auxiliary)[0]
        metrics["loss_aux"] = loss_aux.detach()
        loss = loss + aux_weight * loss_aux
    return loss, metrics


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm as ``SyncBatchNorm`` (the official SyncBN; state-dict names are unchanged)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


# ------------------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------------------
UPERNET_DEFAULTS = {
    "img_size": 512,
    "patch_size": 16,
    "qkv_bias": True,
    "use_abs_pos_emb": False,
    "use_rel_pos_bias": True,
    "num_classes": 150,
}


@register_model
def upernet_beit_base_patch16_512(**kwargs) -> BEiTUperNet:
    """``upernet_beit_base_12_512_slide_160k_ade20k``: layer scale 0.1, drop path 0.15, blocks
    [3, 5, 7, 11], UperNet width 768."""
    arch = {**SIZES["base"], "init_values": 0.1, "drop_path_rate": 0.15, "out_indices": (3, 5, 7, 11), "channels": 768}
    return BEiTUperNet(**{**UPERNET_DEFAULTS, **arch, **kwargs})


@register_model
def upernet_beit_large_patch16_512(**kwargs) -> BEiTUperNet:
    """``upernet_beit_large_24_512_slide_160k_ade20k``: layer scale 1e-6, drop path 0.2, blocks
    [7, 11, 15, 23], UperNet width 1024."""
    arch = {**SIZES["large"], "init_values": 1e-6, "drop_path_rate": 0.2, "out_indices": (7, 11, 15, 23)}
    return BEiTUperNet(**{**UPERNET_DEFAULTS, **arch, "channels": 1024, **kwargs})


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
# Entries of pretraining and classification checkpoints that a segmentation backbone does not use.
_UNUSED_BY_BACKBONE = ("mask_token", "lm_head.", "cls_pt_layers.", "norm.", "fc_norm.", "head.", "cls_pt_norm.")


def is_segmentor_state_dict(state_dict) -> bool:
    return any(k.startswith(("backbone.", "decode_head.")) for k in state_dict)


def load_pretrained_backbone(model: BEiTUperNet, checkpoint, *, model_key: str = "model|module"):
    """Initialise the backbone from a pretraining or classification checkpoint, as the reference's
    ``mmcv_custom/checkpoint.py`` does for ``model.pretrained=...``.

    The shared ``rel_pos_bias`` table of a BEiT v2 pretraining file (``beitv2_*_pt1k.pth``) is
    copied into every block, each table is resized from the checkpoint's grid to the model's
    (14x14 -> 32x32 at 512 px: the geometric-progression bicubic resampling), index buffers are
    rebuilt; MIM heads, ``norm`` and classifier entries go unused. Loading is otherwise strict:
    every block parameter must come from the file.

    Returns:
        the unused checkpoint keys.

    Raises:
        CheckpointMismatchError: a backbone parameter missing from the file, or an entry that
            neither fits nor is a known unused one.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = load_state_dict_file(checkpoint, unwrap=False)
    state_dict = prepare_finetune_state_dict(model.backbone, checkpoint, model_key=model_key)
    own = model.backbone.state_dict()
    unused = [k for k in state_dict if k not in own]
    unknown = [k for k in unused if not k.startswith(_UNUSED_BY_BACKBONE)]
    missing = [k for k in own if k not in state_dict and not k.startswith(("fpn1.", "fpn2.", "fpn3.", "fpn4."))]
    mismatched = [k for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unknown or mismatched:
        raise CheckpointMismatchError("the segmentation backbone", missing, unknown, mismatched)
    model.backbone.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    return unused


def load_segmentation_checkpoint(model: BEiTUperNet, checkpoint) -> list[str]:
    """Load weights into ``model`` from a local file or state dict of any of three kinds:

    - a whole segmentor (ours: ``model.safetensors``; the official ``beitv2_*_ftade20k.pth``,
      whose ``state_dict`` holds ``backbone.*``/``decode_head.*``/``auxiliary_head.*``): strict,
      tables resized if the file was trained at another size;
    - a pretraining or classification file (``beitv2_*_pt1k.pth``, ``*_ft1k.pth``, ours): into
      the backbone (:func:`load_pretrained_backbone`), the heads keep their initialisation.

    Returns the checkpoint keys that went unused (always empty for a whole segmentor).
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = load_state_dict_file(checkpoint, unwrap=False)
    state_dict = dict(unwrap_state_dict(checkpoint))
    if not is_segmentor_state_dict(state_dict):
        return load_pretrained_backbone(model, checkpoint)
    if model.auxiliary_head is None:  # a model built without the auxiliary head evaluates only
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("auxiliary_head.")}
    backbone = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    backbone = prepare_finetune_state_dict(model.backbone, backbone)
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("backbone.")}
    state_dict.update({f"backbone.{k}": v for k, v in backbone.items()})
    state_dict = fill_derived_buffers(model, state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(type(model).__name__, missing, unexpected, mismatched)
    model.load_state_dict(state_dict, strict=True)
    return []


# ------------------------------------------------------------------------------------------------
# Inference (mmseg's EncoderDecoder.whole_inference / slide_inference / aug_test)
# ------------------------------------------------------------------------------------------------
def _pad_to(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Zero-pad at the bottom and right up to ``size`` (the model's fixed window)."""
    pad_h, pad_w = size[0] - images.shape[-2], size[1] - images.shape[-1]
    return F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images


class WindowSizeError(ValueError):
    """An input larger than the window the relative position tables were built for."""


def fixed_size_forward(model: BEiTUperNet) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model.encode_decode`` for inputs up to the model's input size: smaller ones are zero-padded
    at the bottom and right (after normalisation, as mmseg's ``Pad``) and the logits cropped back.
    Relative position tables are tied to one grid (the reference's backbone fails on other sizes;
    resize them for good with ``model.backbone.set_input_size``)."""
    window = model.input_size

    def forward(images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        if height > window[0] or width > window[1]:
            raise WindowSizeError(
                f"input {height}x{width} is larger than the model's {window[0]}x{window[1]} window; use slide "
                "inference (mode='slide') or model.backbone.set_input_size(...) first"
            )
        return model.encode_decode(_pad_to(images, window))[..., :height, :width]

    return forward


def slide_inference(
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    num_classes: int,
    crop_size: Sequence[int],
    stride: Sequence[int],
) -> torch.Tensor:
    """Logits ``[B, K, H, W]`` from overlapping ``crop_size`` windows ``stride`` apart, averaged where
    they overlap (mmseg's ``slide_inference``: windows start at multiples of the stride, the last
    one of a row or column is moved back to end at the image border; ``forward(crop)`` gives
    logits at the crop's size)."""
    crop_h, crop_w = crop_size
    stride_h, stride_w = stride
    if min(crop_h, crop_w, stride_h, stride_w) < 1:
        raise ValueError(f"slide_inference: crop_size {tuple(crop_size)} and stride {tuple(stride)} must be positive")
    batch, _, height, width = images.shape
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    logits = images.new_zeros((batch, num_classes, height, width), dtype=torch.float32)
    count = images.new_zeros((1, 1, height, width), dtype=torch.float32)
    for row in range(rows):
        for col in range(cols):
            y2, x2 = min(row * stride_h + crop_h, height), min(col * stride_w + crop_w, width)
            y1, x1 = max(y2 - crop_h, 0), max(x2 - crop_w, 0)
            logits[:, :, y1:y2, x1:x2] += forward(images[:, :, y1:y2, x1:x2]).float()
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def predict_probabilities(
    forward: Callable[[torch.Tensor], torch.Tensor],
    scaled_images: Sequence[torch.Tensor],
    out_size: Sequence[int],
    num_classes: int,
    *,
    mode: str = "slide",
    crop_size: Sequence[int] = (512, 512),
    stride: Sequence[int] = (341, 341),
    flip: bool = False,
) -> torch.Tensor:
    """Class probabilities ``[B, K, *out_size]`` for one image at one or several scales (mmseg's
    ``simple_test``/``aug_test``): per scale (and its horizontal flip), logits from whole or slide
    inference, bilinearly resized to ``out_size`` (the original image), softmax; the mean over
    scales and flips."""
    if mode not in ("slide", "whole"):
        raise ValueError(f"mode must be 'slide' or 'whole'; got {mode!r}")
    total = None
    views = 0
    for images in scaled_images:
        for flipped in (False, True) if flip else (False,):
            view = images.flip(-1) if flipped else images
            if mode == "slide":
                logits = slide_inference(forward, view, num_classes, crop_size, stride)
            else:
                logits = forward(view).float()
            probabilities = _resize(logits, out_size).softmax(1)
            probabilities = probabilities.flip(-1) if flipped else probabilities
            total = probabilities if total is None else total + probabilities
            views += 1
    if total is None:
        raise ValueError("predict_probabilities: argument 'scaled_images' is empty")
    return total / views
