"""The BEiT Vision Transformer, with the module and parameter names of microsoft/unilm ``beit2/``.

One backbone serves every model of BEiT v2: the MIM student (shared relative position bias, layer
scale, mask token), the fine-tuning classifier (per-block relative position bias, mean pooling),
and the VQ-KD encoder and decoder (absolute position embedding, no layer scale). State dicts use
the official names, so official checkpoints load with ``strict=True``:

``cls_token``, ``mask_token``, ``pos_embed``, ``patch_embed.proj``,
``rel_pos_bias.relative_position_bias_table`` / ``relative_position_index`` (shared table), and per
block ``blocks.N.{gamma_1, gamma_2, norm1, attn.q_bias, attn.v_bias,
attn.relative_position_bias_table, attn.relative_position_index, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}``, then ``norm`` / ``fc_norm`` / ``head``.

Attention runs through ``kernels.relpos_attention_packed`` (on the fused qkv projection) and the
bias is gathered by ``kernels.relpos_bias``: the shared bias once per forward pass, a per-block table once per block.
"""

# Annotations stay evaluated (no ``from __future__ import annotations``): fx copies the forward's
# annotations into the code it generates, and TorchScript, scripting that code, needs types there.
import functools
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import kernels

# Widths of the standard sizes; names give the patch size (16, or 14 for huge).
SIZES = {
    "tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "huge": {"embed_dim": 1280, "depth": 32, "num_heads": 16},
}
NUM_CLS_TABLE_ENTRIES = 3  # cls-to-token, token-to-cls, cls-to-cls at the end of every table


def to_2tuple(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    height, width = value
    return (int(height), int(width))


@torch.no_grad()
def trunc_normal_(tensor: torch.Tensor, std: float, bound: float) -> torch.Tensor:
    """Normal(0, std) truncated to ``[-bound, bound]`` (absolute bounds, as timm's function).

    Inverse-CDF sampling in one pass (timm's method; recent ``nn.init.trunc_normal_`` rejection-
    samples, which takes half a minute for a ViT-B at +-1 std).
    """
    cdf_bound = 0.5 * (1.0 + math.erf(bound / std / math.sqrt(2.0)))
    tensor.uniform_(1.0 - 2.0 * cdf_bound, 2.0 * cdf_bound - 1.0)
    tensor.erfinv_().mul_(std * math.sqrt(2.0))
    return tensor.clamp_(-bound, bound)


def num_relative_distances(grid: tuple[int, int]) -> int:
    """Rows of a relative position table for a patch grid: all offsets plus the 3 CLS entries."""
    return (2 * grid[0] - 1) * (2 * grid[1] - 1) + NUM_CLS_TABLE_ENTRIES


# ------------------------------------------------------------------------------------------------
# Position tables at other resolutions
# ------------------------------------------------------------------------------------------------
def _geometric_offsets(src: int, dst: int) -> list[float]:
    """Source sample positions of the reference's table resizing: offsets that grow by a ratio q
    chosen (by bisection) so that the outermost source offset lands on the outermost target one."""

    def geometric_sum(ratio: float, n: int) -> float:
        return (1.0 - ratio**n) / (1.0 - ratio)

    left, right = 1.01, 1.5
    while right - left > 1e-6:
        ratio = (left + right) / 2.0
        if geometric_sum(ratio, src // 2) > dst // 2:
            right = ratio
        else:
            left = ratio
    offsets, current = [], 1.0
    for i in range(src // 2):
        offsets.append(current)
        current += ratio ** (i + 1)
    return [-d for d in reversed(offsets)] + [0.0] + offsets


def resize_rel_pos_bias_table(
    table: torch.Tensor, src_grid: Sequence[int] | int, dst_grid: Sequence[int] | int
) -> torch.Tensor:
    """Resize a relative position bias table ``[(2h-1)(2w-1)+3, H]`` to another patch grid.

    The algorithm of the reference's fine-tuning loader (microsoft/unilm ``run_class_finetuning.py``):
    per head, the ``(2h-1) x (2w-1)`` offset grid is placed at geometrically spaced positions and
    resampled at the integer offsets of the target grid by an interpolating bicubic spline
    (``scipy``'s FITPACK, the routine behind the reference's ``interp2d(kind='cubic')``); the three
    CLS entries are kept. Not differentiable (a load-time conversion).
    """
    from scipy.interpolate import RectBivariateSpline

    src_grid, dst_grid = to_2tuple(src_grid), to_2tuple(dst_grid)
    expected = num_relative_distances(src_grid)
    if table.dim() != 2 or table.shape[0] != expected:
        raise ValueError(
            f"resize_rel_pos_bias_table: argument 'table' must have shape [{expected}, num_heads] for a "
            f"{src_grid[0]}x{src_grid[1]} grid; got {tuple(table.shape)}"
        )
    if src_grid == dst_grid:
        return table
    if table.is_meta:  # a model built on the meta device (shapes only) resizes to the target shape
        return table.new_empty(num_relative_distances(dst_grid), table.shape[1])
    src_size = (2 * src_grid[0] - 1, 2 * src_grid[1] - 1)
    dst_size = (2 * dst_grid[0] - 1, 2 * dst_grid[1] - 1)
    src_y, src_x = _geometric_offsets(src_size[0], dst_size[0]), _geometric_offsets(src_size[1], dst_size[1])
    dst_y = torch.arange(-(dst_size[0] // 2), dst_size[0] // 2 + 0.1, 1.0, dtype=torch.float64).numpy()
    dst_x = torch.arange(-(dst_size[1] // 2), dst_size[1] // 2 + 0.1, 1.0, dtype=torch.float64).numpy()
    offsets = table[:-NUM_CLS_TABLE_ENTRIES].detach().float().cpu()
    heads = []
    for head in range(table.shape[1]):
        values = offsets[:, head].reshape(src_size).numpy()
        spline = RectBivariateSpline(src_y, src_x, values, kx=3, ky=3, s=0)
        heads.append(torch.from_numpy(spline(dst_y, dst_x)).float().reshape(-1))
    resized = torch.stack(heads, dim=1).to(device=table.device, dtype=table.dtype)
    return torch.cat([resized, table[-NUM_CLS_TABLE_ENTRIES:].detach()], dim=0)


def resample_abs_pos_embed(
    pos_embed: torch.Tensor, dst_grid: Sequence[int] | int, src_grid: Sequence[int] | int | None = None
) -> torch.Tensor:
    """Resize an absolute position embedding ``[1, 1 + h*w, D]`` to another grid (load time).

    As the reference's checkpoint loader: bicubic ``F.interpolate`` to the target size
    (``align_corners=False``), the CLS entry kept. ``src_grid`` defaults to a square grid.
    """
    num_patches = pos_embed.shape[1] - 1
    if src_grid is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"resample_abs_pos_embed: {num_patches} positions are not a square grid; pass src_grid")
        src_grid = (side, side)
    src_grid, dst_grid = to_2tuple(src_grid), to_2tuple(dst_grid)
    if src_grid[0] * src_grid[1] != num_patches:
        raise ValueError(f"resample_abs_pos_embed: src_grid {src_grid} does not match {num_patches} positions")
    if src_grid == dst_grid:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = patch_pos.reshape(1, *src_grid, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=dst_grid, mode="bicubic", align_corners=False)
    return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def interpolate_pos_encoding(pos_embed: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]):
    """The position embedding for an input of another size, computed in the forward pass.

    The reference's ``interpolate_pos_encoding`` (DINO's): bicubic with scale factors
    ``(dst + 0.1) / src``, the 0.1 guarding against a rounding to one position too few.
    """
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = patch_pos.reshape(1, *src_grid, -1).permute(0, 3, 1, 2)
    scale = ((dst_grid[0] + 0.1) / src_grid[0], (dst_grid[1] + 0.1) / src_grid[1])
    patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic")
    return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def layer_norm_eps(norm_layer) -> float:
    """The epsilon of the reference's ``norm_layer`` argument (``nn.LayerNorm`` or a partial of it)."""
    base = norm_layer.func if isinstance(norm_layer, functools.partial) else norm_layer
    if base is not nn.LayerNorm or (
        isinstance(norm_layer, functools.partial) and (norm_layer.args or set(norm_layer.keywords) - {"eps"})
    ):
        raise ValueError(
            f"norm_layer must be nn.LayerNorm or functools.partial(nn.LayerNorm, eps=...); got {norm_layer!r}"
        )
    return norm_layer.keywords.get("eps", 1e-5) if isinstance(norm_layer, functools.partial) else 1e-5


# ------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------
class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch of whole samples, scaling the kept ones."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = x.new_empty([x.shape[0]] + [1] * (x.dim() - 1)).bernoulli_(keep_prob)
        return x.div(keep_prob) * keep

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class PatchEmbed(nn.Module):
    """Image to patch tokens: ``Conv2d(in_chans, embed_dim, patch, stride=patch)``."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``x [B, C, H, W]`` to ``(tokens [B, (H/p)*(W/p), D], (H/p, W/p))`` in raster order."""
        if x.dim() != 4 or x.shape[1] != self.proj.in_channels:
            raise ValueError(
                f"PatchEmbed: input must have shape [B, {self.proj.in_channels}, H, W]; got {list(x.shape)}"
            )
        height, width = x.shape[-2], x.shape[-1]
        if height % self.patch_size[0] != 0 or width % self.patch_size[1] != 0:
            raise ValueError(
                f"PatchEmbed: image size {height}x{width} is not a multiple of the patch size {self.patch_size}"
            )
        tokens = self.proj(x)
        grid = (tokens.shape[-2], tokens.shape[-1])
        return tokens.flatten(2).transpose(1, 2), grid


def _resize_table_of(module: nn.Module, window_size: Sequence[int] | int) -> None:
    """Give ``module``'s ``relative_position_bias_table``/``relative_position_index`` another grid."""
    window_size = to_2tuple(window_size)
    old = module.relative_position_bias_table
    table = resize_rel_pos_bias_table(old, module.window_size, window_size)
    module.relative_position_bias_table = nn.Parameter(table, requires_grad=old.requires_grad)
    module.relative_position_index = kernels.relative_position_index(*window_size).to(table.device)
    module.window_size = window_size


class RelativePositionBias(nn.Module):
    """The relative position bias shared by all blocks: ``table [(2h-1)(2w-1)+3, H]`` and its
    persistent ``relative_position_index [h*w+1, h*w+1]`` (both in the official state dicts)."""

    def __init__(self, window_size: tuple[int, int], num_heads: int):
        super().__init__()
        self.window_size = to_2tuple(window_size)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros(num_relative_distances(self.window_size), num_heads)
        )
        self.register_buffer("relative_position_index", kernels.relative_position_index(*self.window_size))

    def forward(self) -> torch.Tensor:
        """The bias ``[H, N, N]`` (N = h*w + 1) added to every block's attention logits."""
        return kernels.relpos_bias(self.relative_position_bias_table, self.relative_position_index)

    def set_window_size(self, window_size: Sequence[int] | int) -> None:
        """Resize the table (reference algorithm) and rebuild the index for another patch grid."""
        _resize_table_of(self, window_size)


class Attention(nn.Module):
    """Multi-head self-attention with BEiT's ``q_bias``/``v_bias`` (no key bias: it would cancel in
    the softmax) and an optional per-block relative position table."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        window_size: tuple[int, int] | None = None,
        attn_head_dim: int | None = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        head_dim = attn_head_dim or dim // num_heads
        all_head_dim = head_dim * num_heads
        self.scale = qk_scale or head_dim**-0.5
        self.qkv = nn.Linear(dim, all_head_dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(all_head_dim))
            self.v_bias = nn.Parameter(torch.zeros(all_head_dim))
        else:
            self.q_bias = self.v_bias = None
        if window_size:
            self.window_size = to_2tuple(window_size)
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros(num_relative_distances(self.window_size), num_heads)
            )
            self.register_buffer("relative_position_index", kernels.relative_position_index(*self.window_size))
        else:
            self.window_size = self.relative_position_bias_table = self.relative_position_index = None
        self.proj = nn.Linear(all_head_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, shared_bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, N, C]`` to ``[B, N, C]``; ``shared_bias [H, N, N]`` is added to the logits."""
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias)
        bias = shared_bias
        if self.relative_position_bias_table is not None:
            own = kernels.relpos_bias(self.relative_position_bias_table, self.relative_position_index)
            bias = own if bias is None else own + bias
        if torch.jit.is_scripting():  # TorchScript cannot compile the kernels' dispatcher: the same math
            batch, tokens, _ = x.shape
            q, k, v = qkv.reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
            return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, -1)))
        # The packed op's backward writes dq, dk, dv straight into the gradient of qkv.
        out = kernels.relpos_attention_packed(qkv, bias, num_heads=self.num_heads, scale=self.scale)
        return self.proj_drop(self.proj(out))

    def set_window_size(self, window_size: Sequence[int] | int) -> None:
        """Resize this block's table (if any) and rebuild its index for another patch grid."""
        if self.relative_position_bias_table is not None:
            _resize_table_of(self, window_size)


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))`` with dropout after fc2 only (as the reference)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block with optional layer scale:
    ``x + DropPath(gamma_1 * Attn(LN(x)))`` then ``x + DropPath(gamma_2 * MLP(LN(x)))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float | None = None,
        norm_eps: float = 1e-6,
        window_size: tuple[int, int] | None = None,
        attn_head_dim: int | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, drop, window_size, attn_head_dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        if init_values:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor, shared_bias: torch.Tensor | None = None) -> torch.Tensor:
        attn = self.attn(self.norm1(x), shared_bias)
        if self.gamma_1 is None:
            x = x + self.drop_path(attn)
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.gamma_1 * attn)
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


def rescale_residual_projections(blocks: Sequence[Block], first_layer_id: int = 1) -> None:
    """The reference's ``fix_init_weight``: divide ``attn.proj`` and ``mlp.fc2`` weights of the
    block with 1-based layer id ``l`` by ``sqrt(2 l)``."""
    with torch.no_grad():
        for offset, block in enumerate(blocks):
            scale = math.sqrt(2.0 * (first_layer_id + offset))
            block.attn.proj.weight.div_(scale)
            block.mlp.fc2.weight.div_(scale)


def get_num_layer_for_vit(name: str, num_max_layer: int) -> int:
    """Layer id of a parameter for layer-wise learning-rate decay (the reference's rule).

    Embeddings (``cls_token``, ``mask_token``, ``pos_embed``, ``patch_embed.*``) get 0, block ``k``
    gets ``k + 1``, everything else (``rel_pos_bias``, norms, heads) ``num_max_layer - 1``, where
    ``num_max_layer = depth + 2``; the scale of id ``i`` is ``decay ** (num_max_layer - 1 - i)``.
    """
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_max_layer - 1


def check_patch_grid(grid: tuple[int, int], window: tuple[int, int] | None) -> None:
    """Raise if the input's patch grid differs from the relative position tables' (a function of
    its own so that fx tracing can keep it as one call: timm registers it as not traced)."""
    if window is not None and (grid[0] != window[0] or grid[1] != window[1]):
        raise ValueError(
            f"input patch grid {grid[0]}x{grid[1]} differs from the relative position tables' {window[0]}x"
            f"{window[1]}; call model.set_input_size(img_size) first to resize them"
        )


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
class BEiTBackbone(nn.Module):
    """Patch embedding, class (and mask) token, position information and the blocks of a BEiT ViT.

    Subclasses add the final norm and heads: :class:`BEiT` (classifier, the VQ-KD encoder and
    decoder) and ``BEiTForMaskedImageModeling`` (pretraining).

    Args:
        img_size, patch_size, in_chans: the input; other sizes work at run time (see
            :meth:`set_input_size` for models with relative position tables).
        embed_dim, depth, num_heads, mlp_ratio, attn_head_dim: the transformer's size.
        qkv_bias: learnable ``q_bias`` and ``v_bias`` (no key bias).
        qk_scale: override of ``head_dim ** -0.5``.
        drop_rate: dropout after the position embedding, ``attn.proj`` and ``mlp.fc2``.
        attn_drop_rate: must be 0: the fused attention has no dropout on the probabilities (no
            BEiT v2 recipe uses it).
        drop_path_rate: stochastic depth, ``linspace(0, rate, depth)`` over the blocks.
        norm_eps: LayerNorm epsilon (1e-6 in every BEiT v2 model).
        init_values: layer-scale initial value; ``None`` or 0 disables layer scale.
        use_abs_pos_emb: learnable absolute position embedding ``pos_embed``.
        use_rel_pos_bias: a relative position table in every block.
        use_shared_rel_pos_bias: one relative position table ``rel_pos_bias`` for all blocks.
        use_mask_token: a learnable ``mask_token`` that replaces masked patch embeddings.
        norm_layer: the reference's way to give ``norm_eps``: ``nn.LayerNorm`` or
            ``functools.partial(nn.LayerNorm, eps=...)`` (nothing else: every BEiT v2 norm is one).
    """

    def __init__(
        self,
        *,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        init_values: float | None = None,
        use_abs_pos_emb: bool = False,
        use_rel_pos_bias: bool = False,
        use_shared_rel_pos_bias: bool = False,
        use_mask_token: bool = False,
        attn_head_dim: int | None = None,
        norm_layer: type[nn.LayerNorm] | functools.partial | None = None,
    ):
        super().__init__()
        if norm_layer is not None:
            norm_eps = layer_norm_eps(norm_layer)
        if attn_drop_rate:
            raise ValueError(
                f"attn_drop_rate must be 0: the fused relpos_attention has no attention dropout; got {attn_drop_rate}"
            )
        if embed_dim % num_heads and attn_head_dim is None:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_features = self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.norm_eps = norm_eps
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if use_mask_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1] + 1, embed_dim)) if use_abs_pos_emb else None
        self.pos_drop = nn.Dropout(drop_rate)
        self.rel_pos_bias = RelativePositionBias(grid, num_heads) if use_shared_rel_pos_bias else None
        self.block_kwargs = {
            "dim": embed_dim,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
            "qkv_bias": qkv_bias,
            "qk_scale": qk_scale,
            "drop": drop_rate,
            "init_values": init_values,
            "norm_eps": norm_eps,
            "window_size": grid if use_rel_pos_bias else None,
            "attn_head_dim": attn_head_dim,
        }
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([Block(drop_path=rates[i], **self.block_kwargs) for i in range(depth)])
        self.grad_checkpointing = False

    # -- information for the training loop ------------------------------------------------------
    def get_num_layers(self) -> int:
        return len(self.blocks)

    def get_layer_id(self, name: str) -> int:
        """Layer id of parameter ``name`` for layer-wise lr decay, in ``0 .. depth + 1``."""
        return get_num_layer_for_vit(name, self.get_num_layers() + 2)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names the reference exempts from weight decay (besides every parameter with ndim <= 1)."""
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    def init_transformer_weights(self, std: float = 0.02) -> None:
        """The reference's fine-tuning (and segmentation) initialisation: tokens, ``pos_embed`` and
        Linear weights from a normal(0, ``std``) truncated at +-2 (timm's function, practically
        untruncated), zero biases, unit LayerNorms, ``fix_init_weight``'s rescaled residual
        projections; convolutions keep PyTorch's initialisation."""
        for tensor in (self.pos_embed, self.cls_token, self.mask_token):
            if tensor is not None:
                trunc_normal_(tensor.data, std, 2.0)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight.data, std, 2.0)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        rescale_residual_projections(self.blocks)

    # -- forward pieces -------------------------------------------------------------------------
    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        source = self.patch_embed.grid_size
        if grid == source:
            return self.pos_embed
        return interpolate_pos_encoding(self.pos_embed, source, grid)

    def embed(self, x: torch.Tensor, mask_index: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tokens ``[B, 1 + N, D]`` entering the first block, and the patch grid.

        ``mask_index [B, M]`` (int64 patch positions) replaces those patch embeddings by
        ``mask_token`` before the class token is prepended.
        """
        tokens, grid = self.patch_embed(x)
        if mask_index is not None:
            if self.mask_token is None:
                raise ValueError("this model has no mask_token (build it with use_mask_token=True)")
            masked = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            masked = masked.scatter(1, mask_index, True)
            tokens = torch.where(masked.unsqueeze(-1), self.mask_token, tokens)
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        if self.pos_embed is not None:
            tokens = tokens + self.position_embedding(grid)
        return self.pos_drop(tokens), grid

    def shared_bias(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """The shared relative position bias ``[H, N, N]`` (gathered once per forward), or None.

        Relative position tables are tied to one patch grid: another input size needs
        :meth:`set_input_size` first, which resizes them with the reference's algorithm.
        """
        if self.rel_pos_bias is not None:
            window = self.rel_pos_bias.window_size
        elif torch.jit.is_scripting():  # TorchScript cannot type block_kwargs (mixed values); same grid
            window = self.blocks[0].attn.window_size
        else:
            window = self.block_kwargs["window_size"]
        check_patch_grid(grid, window)
        return self.rel_pos_bias() if self.rel_pos_bias is not None else None

    def run_block(self, block: Block, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, bias, use_reentrant=False)
        return block(x, bias)

    def intermediate_tokens(self, x: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """Tokens ``[B, 1 + N, D]`` (before any final norm) after the blocks in ``indices``
        (0-based; negative counts from the end), in the order given; stops after the last one."""
        depth = len(self.blocks)
        wanted = [i % depth if -depth <= i < depth else None for i in indices]
        if None in wanted:
            raise ValueError(f"block indices {list(indices)} out of range for depth {depth}")
        tokens, grid = self.embed(x)
        bias = self.shared_bias(grid)
        outputs = {}
        for i, block in enumerate(self.blocks[: max(wanted) + 1]):
            tokens = self.run_block(block, tokens, bias)
            if i in wanted:
                outputs[i] = tokens
        return [outputs[i] for i in wanted]

    def set_input_size(self, img_size: int | Sequence[int]) -> None:
        """Adapt the model to another input size for good: resize ``pos_embed`` (bicubic) and
        every relative position table (the reference's fine-tuning algorithm), rebuild indices."""
        old_grid = self.patch_embed.grid_size
        self.patch_embed.img_size = to_2tuple(img_size)
        grid = self.patch_embed.grid_size
        if grid == old_grid:
            return
        with torch.no_grad():
            if self.pos_embed is not None:
                resized = resample_abs_pos_embed(self.pos_embed, grid, old_grid)
                self.pos_embed = nn.Parameter(resized, requires_grad=self.pos_embed.requires_grad)
            if self.rel_pos_bias is not None:
                self.rel_pos_bias.set_window_size(grid)
            for block in self.blocks_with_tables():
                block.attn.set_window_size(grid)
        if self.block_kwargs["window_size"] is not None:
            self.block_kwargs["window_size"] = grid

    def blocks_with_tables(self) -> list[Block]:
        """Blocks that carry their own relative position table (subclasses add extra blocks)."""
        return [b for b in self.blocks if b.attn.relative_position_bias_table is not None]


class BEiT(BEiTBackbone):
    """BEiT ViT with the fine-tuning head: the reference's ``modeling_finetune.VisionTransformer``,
    with timm's model interface (that of timm's ``Beit``).

    Also the VQ-KD encoder and decoder (``num_classes=0``, absolute position embedding, no layer
    scale). Initialised as the reference's fine-tuning model: Linear weights, ``cls_token`` and
    ``pos_embed`` from a normal(0, 0.02) truncated at +-2 (timm's function, practically untruncated),
    the patch convolution keeps PyTorch's default initialisation, ``fix_init_weight`` rescales the
    residual projections, and the head is multiplied by ``init_scale``.

    The forward pass is split as timm's: :meth:`forward_features` gives the tokens
    ``[B, 1 + N, D]`` (after ``norm``, an Identity with mean pooling), :meth:`forward_head` pools
    them (``global_pool``), applies ``fc_norm`` and the head; ``forward_features(x,
    return_patch_tokens, return_all_tokens)`` keeps the reference's options.

    Args:
        num_classes: classes of the linear head (0: no head, the pooled features are returned).
        use_mean_pooling: ``fc_norm`` after pooling (``norm`` is then Identity), otherwise ``norm``
            on all tokens; default: ``global_pool == "avg"`` (timm's ``use_fc_norm``).
        global_pool: ``"avg"`` (mean of the patch tokens), ``"token"`` (class token) or ``""`` (no
            pooling: the head sees every token); default: ``"avg"`` with mean pooling, else ``"token"``.
        init_scale: factor on the initial head weight and bias (0.001).
        **kwargs: the backbone's arguments (:class:`BEiTBackbone`).
    """

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        use_mean_pooling: bool | None = None,
        global_pool: str | None = None,
        init_scale: float = 0.001,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if global_pool not in (None, "", "avg", "token"):
            raise ValueError(f"global_pool must be 'avg', 'token' or ''; got {global_pool!r}")
        if use_mean_pooling is None:
            use_mean_pooling = global_pool in (None, "avg")
        dim = self.embed_dim
        self.num_classes = num_classes
        self.global_pool = ("avg" if use_mean_pooling else "token") if global_pool is None else global_pool
        self.in_chans = self.patch_embed.proj.in_channels
        self.head_hidden_size = dim
        self.num_prefix_tokens = 1
        self.init_scale = init_scale
        reduction = self.patch_embed.patch_size[0]
        self.feature_info = [
            {"module": f"blocks.{i}", "num_chs": dim, "reduction": reduction} for i in range(len(self.blocks))
        ]
        self.norm = nn.Identity() if use_mean_pooling else nn.LayerNorm(dim, eps=self.norm_eps)
        self.fc_norm = nn.LayerNorm(dim, eps=self.norm_eps) if use_mean_pooling else None
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights(init_scale)

    def init_weights(self, init_scale: float = 0.001, std: float = 0.02) -> None:
        self.init_transformer_weights(std)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(init_scale)
                self.head.bias.mul_(init_scale)

    # -- the classifier -------------------------------------------------------------------------
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head for ``num_classes`` (0: none), initialised as at construction, on the model's
        device and dtype; ``global_pool`` (``"avg"``, ``"token"``, ``""``) changes the pooling."""
        if global_pool is not None:
            if global_pool not in ("", "avg", "token"):
                raise ValueError(f"global_pool must be 'avg', 'token' or ''; got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        like = self.cls_token
        if num_classes > 0:
            self.head = nn.Linear(self.embed_dim, num_classes, device=like.device, dtype=like.dtype)
            trunc_normal_(self.head.weight.data, 0.02, 2.0)
            nn.init.zeros_(self.head.bias)
            with torch.no_grad():
                self.head.weight.mul_(self.init_scale)
        else:
            self.head = nn.Identity()
        self.head.train(self.training)

    @torch.jit.ignore
    def load_pretrained(self, path: str) -> None:
        """Weights from a local file for timm's ``pretrained=True, pretrained_cfg_overlay=dict(file=...)``:
        as for fine-tuning, so a head of another class count starts anew (timm's rule)."""
        from .classifier import load_for_finetuning

        load_for_finetuning(self, path)

    # -- forward --------------------------------------------------------------------------------
    def forward_features(
        self, x: torch.Tensor, return_patch_tokens: bool = False, return_all_tokens: bool = False
    ) -> torch.Tensor:
        """timm's ``forward_features``: the tokens ``[B, 1 + N, D]`` after the blocks and ``norm``.

        The reference's options give its outputs instead: the patch tokens
        (``return_patch_tokens``) or all tokens (``return_all_tokens``) through ``fc_norm`` with mean
        pooling (through ``norm`` otherwise).
        """
        tokens, grid = self.embed(x)
        bias = self.shared_bias(grid)
        for block in self.blocks:  # TorchScript passes no module as an argument (nor checkpoints)
            tokens = block(tokens, bias) if torch.jit.is_scripting() else self.run_block(block, tokens, bias)
        tokens = self.norm(tokens)
        if not (return_patch_tokens or return_all_tokens):
            return tokens
        if not return_all_tokens:
            tokens = tokens[:, self.num_prefix_tokens :]
        return self.fc_norm(tokens) if self.fc_norm is not None else tokens

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the tokens of :meth:`forward_features` (``global_pool``), ``fc_norm``, then the head
        (skipped with ``pre_logits``)."""
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        if self.fc_norm is not None:
            x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` (pooled features ``[B, D]`` when ``num_classes == 0``).

        Only the image, as timm's (fx tracing makes every argument a graph input): the reference's
        ``forward(x, return_patch_tokens=True)`` is ``head(forward_features(x, return_patch_tokens=True))``.
        """
        return self.forward_head(self.forward_features(x))

    # -- intermediate features (timm's and the reference's methods) ----------------------------
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's ``forward_intermediates``: the patch tokens after the blocks in ``indices`` (an int
        n: the last n blocks; None: all), as ``[B, D, h, w]`` maps (``"NCHW"``) or ``[B, N, D]``
        (``"NLC"``), through ``norm`` if asked, with the class tokens as ``(map, prefix)`` pairs with
        ``return_prefix_tokens``. Returns ``(forward_features(x), intermediates)``, or only the
        intermediates; ``stop_early`` ends the pass at the last index (then the first output is
        the tokens there, normed, as in timm)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC'; got {output_fmt!r}")
        take = feature_take_indices(len(self.blocks), indices)
        end = max(take) if stop_early or intermediates_only else len(self.blocks) - 1
        tokens = self.intermediate_tokens(x, [*take, end])
        grid = (x.shape[-2] // self.patch_embed.patch_size[0], x.shape[-1] // self.patch_embed.patch_size[1])
        intermediates = []
        for y in tokens[:-1]:
            y = self.norm(y) if norm else y
            prefix, y = y[:, : self.num_prefix_tokens], y[:, self.num_prefix_tokens :]
            if output_fmt == "NCHW":
                y = y.reshape(y.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
            intermediates.append((y, prefix) if return_prefix_tokens else y)
        if intermediates_only:
            return intermediates
        return self.norm(tokens[-1]), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """timm's: drop the blocks after the last of ``indices`` (and the norm, the head); returns the
        indices kept."""
        take = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max(take) + 1]
        self.feature_info = self.feature_info[: len(self.blocks)]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = None
            self.reset_classifier(0, "")
        return take

    def get_intermediate_layers(self, x: torch.Tensor, use_last_norm: bool = False) -> list[torch.Tensor]:
        """The reference's: the tokens ``[B, 1 + N, D]`` after every block (through ``norm``)."""
        tokens = self.intermediate_tokens(x, list(range(len(self.blocks))))
        return [self.norm(t) for t in tokens] if use_last_norm else tokens

    def forward_intermediate(self, x: torch.Tensor, layer_id: int | list[int] = 12, norm_output: bool = False):
        """The reference's: for a list, the patch tokens after those blocks (0-based; through the
        final norms with ``norm_output``); for an int, the patch tokens entering block ``layer_id``
        through its ``norm1`` (after the last block, unnormed, when ``layer_id`` is the depth)."""
        depth = len(self.blocks)
        if isinstance(layer_id, list):
            wanted = [i for i in layer_id if 0 <= i < depth]
            outputs = self.intermediate_tokens(x, wanted) if wanted else []
            if norm_output:
                fc_norm = self.fc_norm if self.fc_norm is not None else nn.Identity()
                return [fc_norm(self.norm(t[:, 1:])) for t in outputs]
            return [t[:, 1:] for t in outputs]
        if not 0 <= layer_id:
            raise ValueError(f"layer_id must be a block index or a list of them; got {layer_id!r}")
        if layer_id == 0:
            tokens = self.embed(x)[0]
        else:
            tokens = self.intermediate_tokens(x, [min(layer_id, depth) - 1])[0]
        if layer_id < depth:
            tokens = self.blocks[layer_id].norm1(tokens)
        return tokens[:, 1:]

    def interpolate_pos_encoding(self, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
        """The reference's: the position embedding for tokens ``x [B, 1 + N, D]`` of an image of
        ``w x h`` pixels (its last two sizes, in that order), resampled bicubically if needed."""
        if self.pos_embed is None:
            raise ValueError("interpolate_pos_encoding: this model has no absolute position embedding")
        patch = self.patch_embed.patch_size[0]
        return self.position_embedding((w // patch, h // patch))


def feature_take_indices(depth: int, indices: int | Sequence[int] | None) -> list[int]:
    """timm's rule for intermediate indices: None: every block; an int n: the last n; a list:
    those blocks (negative counts from the end)."""
    if indices is None:
        indices = depth
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ValueError(f"indices: {indices} blocks requested of {depth}")
        return list(range(depth - indices, depth))
    taken = [i % depth if -depth <= i < depth else None for i in indices]
    if None in taken or not taken:
        raise ValueError(f"indices {list(indices)} out of range for depth {depth}")
    return taken
