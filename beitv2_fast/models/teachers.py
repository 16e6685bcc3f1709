"""Frozen teachers whose features the VQ-KD tokenizer learns to reconstruct.

Every teacher takes the tokenizer's input (images in ``[-1, 1]``, ``[B, 3, H, W]``) and returns one
target vector per patch, ``[B, N, out_dim]``, in raster order:

- :class:`CLIPTeacher`: OpenAI CLIP ViT-B/16's visual tower; the target is ``ln_post`` of the patch
  tokens projected by ``visual.proj`` (512-d), as microsoft/unilm ``beit2/modeling_vqkd.py``. Loads
  OpenAI's file (a TorchScript archive or its state dict) or an open_clip checkpoint.
- :class:`DINOTeacher`: DINO ViT-B/16; the target is the final-norm patch tokens (768-d). Loads the
  official ``dino_vitbase16_pretrain.pth`` (or a DINO training checkpoint's ``teacher``).
- :class:`HOGTeacher`: weight-free histograms of oriented gradients (MaskFeat's target), so that a
  tokenizer can be trained fully offline.

Weights always come from a local file (safetensors, or ``torch.load(weights_only=True)``); nothing is
downloaded. The reference's input scaling is part of each teacher: ``[-1, 1]`` back to ``[0, 1]``
(``((x + 1) * 127.5).clamp(0, 255) / 255``), then the teacher's own mean and std.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .convert import check_state_dict, load_state_dict_file, strip_prefix
from .vit import BEiT, interpolate_pos_encoding

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ScalingLayer(nn.Module):
    """The reference's ``ScalingLayerForClip``/``ScalingLayerForIM``: ``[-1, 1]`` to ``[0, 1]`` (clamped
    to whole 8-bit range), then ``(x - shift) / scale``."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("shift", torch.tensor(mean)[None, :, None, None])
        self.register_buffer("scale", torch.tensor(std)[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (((x + 1.0) * 127.5).clamp(0, 255.0) / 255.0 - self.shift) / self.scale


class Teacher(nn.Module):
    """Base class: a frozen module mapping ``[-1, 1]`` images to patch targets ``[B, N, out_dim]``.

    It stays in eval mode and without gradients whatever ``train()`` asks.
    """

    out_dim: int

    def freeze(self) -> Teacher:
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)


# ------------------------------------------------------------------------------------------------
# CLIP
# ------------------------------------------------------------------------------------------------
class _CLIPLayerNorm(nn.LayerNorm):
    """CLIP's LayerNorm: computed in fp32 whatever the input dtype (eps 1e-5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _CLIPAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameters (``in_proj_weight``, ``in_proj_bias``, ``out_proj``) on
    batch-first tokens, through ``F.scaled_dot_product_attention``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.num_heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))


class _CLIPBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = _CLIPAttention(width, heads)
        self.ln_1 = _CLIPLayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", nn.Linear(width, width * 4)), ("gelu", _QuickGELU()), ("c_proj", nn.Linear(width * 4, width))]
            )
        )
        self.ln_2 = _CLIPLayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _CLIPTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[_CLIPBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class CLIPVisionTower(nn.Module):
    """OpenAI CLIP's ``VisionTransformer`` (``model.visual``) with its parameter names."""

    def __init__(self, input_resolution=224, patch_size=16, width=768, layers=12, heads=12, output_dim=512):
        super().__init__()
        self.patch_size = patch_size
        self.grid = input_resolution // patch_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid**2 + 1, width))
        self.ln_pre = _CLIPLayerNorm(width)
        self.transformer = _CLIPTransformer(width, layers, heads)
        self.ln_post = _CLIPLayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, 3, H, W]`` (CLIP-normalised) to projected patch tokens ``[B, N, output_dim]``."""
        x = self.conv1(x.to(self.conv1.weight.dtype))
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        pos = self.positional_embedding.unsqueeze(0)
        if grid != (self.grid, self.grid):
            pos = interpolate_pos_encoding(pos, (self.grid, self.grid), grid)
        x = self.ln_pre(x + pos.to(x.dtype))
        x = self.ln_post(self.transformer(x))
        return x[:, 1:] @ self.proj


def clip_visual_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``visual.*`` entries of an OpenAI CLIP or open_clip state dict, without the prefix."""
    state_dict = strip_prefix(state_dict, "module.")
    visual = {k[len("visual.") :]: v for k, v in state_dict.items() if k.startswith("visual.")}
    if not visual:
        raise ValueError(
            "no 'visual.*' keys in this CLIP checkpoint; expected OpenAI CLIP's or open_clip's layout "
            f"(first keys: {list(state_dict)[:5]})"
        )
    return visual


class CLIPTeacher(Teacher):
    """CLIP ViT-B/16 target of the reference: ``ln_post(patch tokens) @ visual.proj`` (512-d)."""

    def __init__(self, visual: CLIPVisionTower | None = None):
        super().__init__()
        self.scaling_layer = ScalingLayer(CLIP_MEAN, CLIP_STD)
        self.visual = visual or CLIPVisionTower()
        self.out_dim = self.visual.proj.shape[1]
        self.freeze()

    @classmethod
    def from_checkpoint(cls, path: str) -> CLIPTeacher:
        """Load OpenAI's ``ViT-B-16.pt`` (TorchScript or state dict) or an open_clip checkpoint
        (``open_clip_pytorch_model.bin``, ``*.safetensors``, or a training checkpoint's
        ``state_dict``); the architecture is read from the weights' shapes."""
        visual = clip_visual_state_dict(load_state_dict_file(path))
        width, _, patch_size, _ = visual["conv1.weight"].shape
        grid = math.isqrt(visual["positional_embedding"].shape[0] - 1)
        layers = len({m.group(1) for k in visual if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
        tower = CLIPVisionTower(grid * patch_size, patch_size, width, layers, width // 64, visual["proj"].shape[1])
        check_state_dict(tower, visual, what="CLIP visual tower")
        tower.load_state_dict(visual)
        return cls(tower)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(self.scaling_layer(x))


# ------------------------------------------------------------------------------------------------
# DINO
# ------------------------------------------------------------------------------------------------
def dino_to_beit_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a DINO ViT state dict onto :class:`BEiT` names.

    DINO's ``attn.qkv.bias`` becomes ``q_bias`` and ``v_bias``; its key third is dropped, which
    changes no attention output: a key bias adds ``q . b_k`` to every logit of a query row, a
    constant that the softmax cancels. The projection head (``head.*``) of a training checkpoint is
    dropped.
    """
    if "teacher" in state_dict and isinstance(state_dict["teacher"], dict):
        state_dict = state_dict["teacher"]
    state_dict = strip_prefix(strip_prefix(state_dict, "module."), "backbone.")
    out = {}
    for key, value in state_dict.items():
        if key.startswith("head."):
            continue
        if key.endswith("attn.qkv.bias"):
            q_bias, _, v_bias = value.chunk(3)
            out[key.replace("qkv.bias", "q_bias")] = q_bias
            out[key.replace("qkv.bias", "v_bias")] = v_bias
        else:
            out[key] = value
    return out


def dino_vit(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12) -> BEiT:
    """DINO's ViT (qkv bias, absolute positions, no layer scale, final norm on all tokens)."""
    return BEiT(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        qkv_bias=True,
        use_abs_pos_emb=True,
        use_mean_pooling=False,
        num_classes=0,
    )


class DINOTeacher(Teacher):
    """DINO ViT-B/16 target of the reference: the final-norm patch tokens (768-d)."""

    def __init__(self, vit: BEiT | None = None):
        super().__init__()
        self.scaling_layer = ScalingLayer(IMAGENET_MEAN, IMAGENET_STD)
        self.vit = vit or dino_vit()
        self.out_dim = self.vit.embed_dim
        self.freeze()

    @classmethod
    def from_checkpoint(cls, path: str) -> DINOTeacher:
        """Load ``dino_vitbase16_pretrain.pth`` (or a DINO training checkpoint); sizes from shapes."""
        state_dict = dino_to_beit_state_dict(load_state_dict_file(path))
        embed_dim, _, patch_size, _ = state_dict["patch_embed.proj.weight"].shape
        grid = math.isqrt(state_dict["pos_embed"].shape[1] - 1)
        depth = len({m.group(1) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
        vit = dino_vit(grid * patch_size, patch_size, embed_dim, depth, embed_dim // 64)
        check_state_dict(vit, state_dict, what="DINO ViT")
        vit.load_state_dict(state_dict)
        return cls(vit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(self.scaling_layer(x), return_patch_tokens=True)


# ------------------------------------------------------------------------------------------------
# HOG (no weights)
# ------------------------------------------------------------------------------------------------
class HOGTeacher(Teacher):
    """Histograms of oriented gradients per patch, MaskFeat's target: a teacher without weights.

    Per colour channel of the ``[0, 1]`` image: Sobel gradients (reflect padding), the unsigned
    orientation in ``[0, pi)`` split into ``num_bins`` bins, each pixel voting its gradient
    magnitude; votes summed over square cells of ``patch_size / cells_per_side`` pixels, each cell's
    histogram l2-normalised. A patch's target concatenates its cells: ``out_dim = 3 * num_bins *
    cells_per_side**2`` (108 for the defaults).

    With ``center`` (the default) each patch's target has its mean over the ``out_dim`` entries
    subtracted. VQ-KD regresses its teacher with a cosine loss, and raw histograms are
    non-negative: any two of them have a high cosine, so predicting the average histogram
    already scores well and a tokenizer learns to collapse onto a few codes. Centred targets
    only agree where the orientation patterns do. (MaskFeat regresses raw HOG with an l2 loss,
    where this does not arise.)
    """

    def __init__(self, patch_size: int = 16, cells_per_side: int = 2, num_bins: int = 9, center: bool = True):
        super().__init__()
        if patch_size % cells_per_side:
            raise ValueError(f"patch_size {patch_size} must be a multiple of cells_per_side {cells_per_side}")
        self.patch_size = patch_size
        self.cells_per_side = cells_per_side
        self.num_bins = num_bins
        self.center = center
        self.out_dim = 3 * num_bins * cells_per_side**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"HOGTeacher: image size {height}x{width} is not a multiple of {self.patch_size}")
        images = ((x.float() + 1.0) * 127.5).clamp(0, 255.0) / 255.0
        padded = F.pad(images.reshape(-1, 1, height, width), (1, 1, 1, 1), mode="reflect")[:, 0]
        # Separable Sobel: a difference of two identically computed sums, so mirrored borders give
        # exactly 0 (a 3x3 convolution leaves rounding residue that flips orientations near pi).
        smooth_rows = padded[:, :-2] + 2.0 * padded[:, 1:-1] + padded[:, 2:]
        smooth_cols = padded[:, :, :-2] + 2.0 * padded[:, :, 1:-1] + padded[:, :, 2:]
        grad_x = smooth_rows[:, :, :-2] - smooth_rows[:, :, 2:]
        grad_y = smooth_cols[:, :-2] - smooth_cols[:, 2:]
        magnitude = torch.sqrt(grad_x**2 + grad_y**2)
        # Unsigned orientation in [0, pi]; pi and -pi (the sign of a zero gy decides) are angle 0.
        angle = torch.atan2(grad_y, grad_x)
        angle = torch.where(angle < 0, angle + math.pi, angle)
        bins = torch.remainder((angle / math.pi * self.num_bins).long(), self.num_bins)
        votes = torch.zeros(bins.shape[0], self.num_bins, height, width, device=x.device)
        votes = votes.scatter(1, bins.unsqueeze(1), magnitude.unsqueeze(1))
        cell = self.patch_size // self.cells_per_side
        hist = F.avg_pool2d(votes, cell) * cell**2  # [B*C, bins, H/cell, W/cell]
        hist = F.normalize(hist, dim=1)
        gh, gw = height // self.patch_size, width // self.patch_size
        cps = self.cells_per_side
        hist = hist.reshape(batch, channels, self.num_bins, gh, cps, gw, cps)
        target = hist.permute(0, 3, 5, 1, 2, 4, 6).reshape(batch, gh * gw, self.out_dim)
        return target - target.mean(-1, keepdim=True) if self.center else target


def build_teacher(kind: str | Teacher | None, checkpoint: str | None = None, **kwargs) -> Teacher | None:
    """A teacher by name: ``"clip"`` and ``"dino"`` need a local ``checkpoint``; ``"hog"`` takes
    :class:`HOGTeacher`'s keyword arguments; a :class:`Teacher` instance or None pass through."""
    if kind is None or isinstance(kind, Teacher):
        return kind
    kind = kind.lower()
    if kind in ("clip", "dino"):
        if checkpoint is None:
            raise ValueError(
                f"the {kind} teacher needs its weights from a local file: pass teacher_checkpoint=<path> "
                "(beitv2-fast never downloads weights)"
            )
        return (CLIPTeacher if kind == "clip" else DINOTeacher).from_checkpoint(checkpoint)
    if kind == "hog":
        return HOGTeacher(**kwargs)
    raise ValueError(f"unknown teacher {kind!r}; expected 'clip', 'dino', 'hog', a Teacher or None")
