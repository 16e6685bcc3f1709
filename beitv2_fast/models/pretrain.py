"""The BEiT v2 masked-image-modeling model: student ViT, patch aggregation and the MIM loss.

Faithful to microsoft/unilm ``beit2/modeling_pretrain.py`` (``VisionTransformerForMaskedImageModelingCLS``,
and with ``head_layers=0`` ``VisionTransformerForMaskedImageModeling``): same state-dict keys, same
initialisation, same outputs. What differs is how the work is done: masked positions come as a
fixed-shape index ``[B, M]`` (no boolean indexing, no data-dependent shapes, no host sync), the final
norm and LM head run on the gathered masked rows only (LayerNorm is per token, so this changes no
number), and the loss of each branch goes through ``kernels.masked_linear_cross_entropy``, which
never holds the ``[B*M, vocab]`` logits.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import kernels

from .registry import register_model
from .vit import SIZES, BEiTBackbone, Block, rescale_residual_projections, trunc_normal_


def masked_positions(mask: torch.Tensor, num_patches: int) -> torch.Tensor:
    """The masked patch positions as a sorted int64 index ``[B, M]``.

    Args:
        mask: either an index ``[B, M]`` (int64/int32 patch positions, distinct within a row;
            returned sorted so that rows come out in the reference's row-major order), or a
            boolean/uint8 mask ``[B, num_patches]`` with the same number of masked patches in every
            row. Converting a boolean mask needs that number on the host (one synchronisation):
            the fast path, and the one ``torch.compile`` traces, is the index.
        num_patches: patches per image, for validating the mask.

    Raises:
        ValueError: wrong shape, or boolean rows with different counts (name them).
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be an index [B, M] or a boolean mask [B, {num_patches}]; got {tuple(mask.shape)}")
    if mask.dtype in (torch.bool, torch.uint8):
        if mask.shape[1] != num_patches:
            raise ValueError(f"boolean mask must have shape [B, {num_patches}]; got {tuple(mask.shape)}")
        counts = mask.bool().sum(1)
        low, high = int(counts.min()), int(counts.max())
        if low != high:
            raise ValueError(
                f"boolean mask rows mask different numbers of patches ({low} to {high}); the model needs the same "
                "count in every row (the reference's generator masks exactly num_masking_patches per image)"
            )
        return mask.bool().nonzero()[:, 1].reshape(mask.shape[0], high)
    if mask.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"mask must be an int64/int32 index or a bool/uint8 mask; got dtype {mask.dtype}")
    return mask.long().sort(dim=1).values


def gather_rows(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``tokens[b, index[b, m]]`` of ``tokens [B, N, D]`` as ``[B * M, D]`` (row-major)."""
    picked = torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return picked.reshape(-1, tokens.shape[-1])


class BEiTForMaskedImageModeling(BEiTBackbone):
    """BEiT v2 student: ViT with mask token, final ``norm``, ``lm_head`` and patch aggregation.

    The aggregation branch concatenates the last layer's class token with the patch tokens after
    block ``early_layers`` and runs them through ``head_layers`` extra blocks (``cls_pt_layers``),
    which share the relative position bias; both branches predict the visual tokens of the masked
    patches, through the shared ``norm`` and ``lm_head`` (or their own ``cls_pt_norm`` and
    ``cls_pt_lm_head`` when ``shared_lm_head=False``). ``head_layers=0`` gives BEiT v1's model.

    Initialisation as the reference: ``cls_token``, ``mask_token``, ``pos_embed``, ``lm_head`` and
    every Linear/Conv2d weight of the backbone from normal(0, init_std) truncated at +-1 std
    (realised std about 0.54 * init_std), biases 0, ``fix_init_weight``. The reference builds
    ``cls_pt_layers`` after that pass, so they keep PyTorch's default Linear initialisation
    (kaiming-uniform weights, uniform biases) and only get the depth rescaling with layer ids
    ``early_layers + 1 ..``.

    Args:
        vocab_size: size of the visual vocabulary (tokenizer codebook), 8192.
        early_layers: the block whose output patch tokens feed the aggregation branch (1-based).
        head_layers: number of aggregation blocks (0 disables the branch).
        shared_lm_head: one ``norm`` and ``lm_head`` for both branches.
        init_std: standard deviation before truncation (0.02).
        **kwargs: backbone arguments (:class:`~beitv2_fast.models.vit.BEiTBackbone`).
    """

    def __init__(
        self,
        *,
        vocab_size: int = 8192,
        early_layers: int = 9,
        head_layers: int = 2,
        shared_lm_head: bool = True,
        init_std: float = 0.02,
        drop_path_rate: float = 0.0,
        **kwargs,
    ):
        super().__init__(use_mask_token=True, drop_path_rate=drop_path_rate, **kwargs)
        depth = len(self.blocks)
        if head_layers and not 1 <= early_layers <= depth:
            raise ValueError(f"early_layers must be between 1 and depth={depth}; got {early_layers}")
        self.vocab_size = vocab_size
        self.early_layers = early_layers
        self.head_layers = head_layers
        self.shared_lm_head = shared_lm_head
        self.init_std = init_std
        self.norm = nn.LayerNorm(self.embed_dim, eps=self.norm_eps)
        self.lm_head = nn.Linear(self.embed_dim, vocab_size)
        self._init_reference_weights(self)
        rescale_residual_projections(self.blocks)

        rates = torch.linspace(0, drop_path_rate, max(depth, early_layers + head_layers), device="cpu").tolist()
        self.cls_pt_layers = nn.ModuleList(
            [Block(drop_path=rates[i], **self.block_kwargs) for i in range(early_layers, early_layers + head_layers)]
        )
        rescale_residual_projections(self.cls_pt_layers, first_layer_id=early_layers + 1)
        if head_layers and not shared_lm_head:
            self.cls_pt_norm = nn.LayerNorm(self.embed_dim, eps=self.norm_eps)
            self.cls_pt_lm_head = nn.Linear(self.embed_dim, vocab_size)
            self._init_reference_weights(self.cls_pt_norm)
            self._init_reference_weights(self.cls_pt_lm_head)

    def _init_reference_weights(self, root: nn.Module) -> None:
        std = self.init_std
        if root is self:
            for tensor in (self.pos_embed, self.cls_token, self.mask_token):
                if tensor is not None:
                    trunc_normal_(tensor.data, std, std)
        for module in root.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                trunc_normal_(module.weight.data, std, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def blocks_with_tables(self) -> list[Block]:
        blocks = list(self.blocks) + list(self.cls_pt_layers)
        return [b for b in blocks if b.attn.relative_position_bias_table is not None]

    def _heads(self):
        """(norm, lm_head) of each branch."""
        main = (self.norm, self.lm_head)
        if not self.head_layers:
            return [main]
        return [main, main if self.shared_lm_head else (self.cls_pt_norm, self.cls_pt_lm_head)]

    def forward_features(
        self, x: torch.Tensor, mask_index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens after the blocks, before any norm: ``(main [B, 1 + N, D], aggregation [B, 1 + N, D]
        or None)``; ``mask_index [B, M]`` replaces those patches by the mask token."""
        tokens, grid = self.embed(x, mask_index)
        bias = self.shared_bias(grid)
        early = None
        for i, block in enumerate(self.blocks):
            tokens = self.run_block(block, tokens, bias)
            if i + 1 == self.early_layers:
                early = tokens[:, 1:]
        if not self.head_layers:
            return tokens, None
        aggregated = torch.cat([tokens[:, :1], early], dim=1)
        for block in self.cls_pt_layers:
            aggregated = self.run_block(block, aggregated, bias)
        return tokens, aggregated

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        target_ids: torch.Tensor | None = None,
        *,
        return_logits: bool = False,
    ):
        """One MIM step.

        Args:
            x: images ``[B, 3, H, W]`` (ImageNet-normalised).
            mask: masked patches, an index ``[B, M]`` (the fast path) or a boolean mask
                ``[B, N]`` with M per row (see :func:`masked_positions`).
            target_ids: the tokenizer's ids of every patch ``[B, N]`` (int64); needed unless
                ``return_logits``.
            return_logits: return the logits instead of the loss.

        Returns:
            With ``return_logits``: a tuple of ``[B * M, vocab]`` logits of the masked patches, in
            the reference's order (batch-major, then raster order), one per branch (main,
            aggregation). Otherwise a dict of 0-dim fp32 tensors: ``loss`` (the sum of the branch
            losses), ``loss_1``, ``mlm_acc_1`` and, with patch aggregation, ``loss_2``,
            ``mlm_acc_2`` (mean cross-entropy and top-1 accuracy over the masked patches).
        """
        patch = self.patch_embed.patch_size
        index = masked_positions(mask, (x.shape[-2] // patch[0]) * (x.shape[-1] // patch[1]))
        branches = [t for t in self.forward_features(x, index) if t is not None]
        rows = [gather_rows(tokens[:, 1:], index) for tokens in branches]
        heads = self._heads()
        if return_logits:
            return tuple(lm_head(norm(r)) for r, (norm, lm_head) in zip(rows, heads, strict=True))
        if target_ids is None:
            raise ValueError("target_ids [B, N] (the tokenizer's ids) are needed to compute the loss")
        if target_ids.shape != branches[0].shape[:1] + (branches[0].shape[1] - 1,):
            raise ValueError(
                f"target_ids must have shape [B, N] = {(branches[0].shape[0], branches[0].shape[1] - 1)}; "
                f"got {tuple(target_ids.shape)}"
            )
        labels = torch.gather(target_ids.long(), 1, index).reshape(-1)
        out = {}
        total = 0.0
        for branch, (r, (norm, lm_head)) in enumerate(zip(rows, heads, strict=True), start=1):
            loss, correct = kernels.masked_linear_cross_entropy(norm(r), lm_head.weight, lm_head.bias, labels)
            out[f"loss_{branch}"] = loss
            out[f"mlm_acc_{branch}"] = correct.float() / labels.numel()
            total = total + loss
        out["loss"] = total
        return out


# ------------------------------------------------------------------------------------------------
# Names (microsoft/unilm modeling_pretrain.py; defaults are the pretraining recipe's:
# shared relative position bias, no absolute position embedding, layer scale, vocabulary 8192)
# ------------------------------------------------------------------------------------------------
PRETRAIN_DEFAULTS = {"use_shared_rel_pos_bias": True, "use_abs_pos_emb": False, "vocab_size": 8192}


def _pretrain_model(arch: dict, kwargs: dict, **defaults) -> BEiTForMaskedImageModeling:
    kwargs.pop("num_classes", None)  # the reference's factories accept and ignore it
    return BEiTForMaskedImageModeling(**{**PRETRAIN_DEFAULTS, **arch, **defaults, **kwargs})


_BASE = {**SIZES["base"], "patch_size": 16}
_LARGE = {**SIZES["large"], "patch_size": 16}
_HUGE = {**SIZES["huge"], "patch_size": 14}
_24X544 = {"embed_dim": 544, "depth": 24, "num_heads": 16, "patch_size": 16}


@register_model
def beit_tiny_patch16_224_8k_vocab_cls_pt(**kwargs):
    return _pretrain_model({**SIZES["tiny"], "patch_size": 16}, kwargs, init_values=0.1, early_layers=9)


@register_model
def beit_small_patch16_224_8k_vocab_cls_pt(**kwargs):
    return _pretrain_model({**SIZES["small"], "patch_size": 16}, kwargs, init_values=0.1, early_layers=9)


@register_model
def beit_base_patch16_224_8k_vocab_cls_pt(**kwargs):
    """BEiT v2 ViT-B/16 recipe: layer scale 0.1, patch aggregation of block 9 through 2 blocks."""
    return _pretrain_model(_BASE, kwargs, init_values=0.1, early_layers=9)


@register_model
def beit_large_patch16_224_8k_vocab_cls_pt(**kwargs):
    """BEiT v2 ViT-L/16 recipe: layer scale 1e-5, patch aggregation of block 21 through 2 blocks."""
    return _pretrain_model(_LARGE, kwargs, init_values=1e-5, early_layers=21)


@register_model
def beit_huge_patch14_224_8k_vocab_cls_pt(**kwargs):
    return _pretrain_model(_HUGE, kwargs, init_values=1e-5, early_layers=29)


@register_model
def beit_24x544_patch16_224_8k_vocab_cls_pt(**kwargs):
    return _pretrain_model(_24X544, kwargs, init_values=0.1, early_layers=21)


@register_model
def beit_base_patch16_224_8k_vocab(**kwargs):
    """BEiT v1-style MIM model (no patch aggregation)."""
    return _pretrain_model(_BASE, kwargs, init_values=0.1, head_layers=0)


@register_model
def beit_base_patch16_192_8k_vocab(**kwargs):
    return _pretrain_model(_BASE, kwargs, img_size=192, init_values=0.1, head_layers=0)


@register_model
def beit_base_patch16_256_8k_vocab(**kwargs):
    return _pretrain_model(_BASE, kwargs, img_size=256, init_values=0.1, head_layers=0)


@register_model
def beit_24x544_patch16_224_8k_vocab(**kwargs):
    return _pretrain_model(_24X544, kwargs, init_values=0.1, head_layers=0)


@register_model
def beit_large_patch16_224_8k_vocab(**kwargs):
    return _pretrain_model(_LARGE, kwargs, init_values=1e-5, head_layers=0)


@register_model
def beit_huge_patch14_224_8k_vocab(**kwargs):
    return _pretrain_model(_HUGE, kwargs, init_values=1e-5, head_layers=0)
