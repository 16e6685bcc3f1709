"""Classification on BEiT v2 features: fine-tuning models, loading a pretrained checkpoint for
fine-tuning, a linear probe, and the optimizer parameter groups of the reference.

The fine-tuning model is :class:`~beitv2_fast.models.vit.BEiT` (the reference's
``modeling_finetune.VisionTransformer``); the names below build it with the defaults of the
reference's fine-tuning script (``qkv_bias``, per-block relative position bias, no absolute
position embedding, layer scale, mean pooling with ``fc_norm``, head scaled by 0.001), so that the
released fine-tuned checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn

from .convert import (
    PRETRAINING_ONLY_PREFIXES,
    check_backbone_weights,
    fill_derived_buffers,
    load_state_dict_file,
    select_weights,
)
from .registry import register_model
from .vit import (
    NUM_CLS_TABLE_ENTRIES,
    SIZES,
    BEiT,
    BEiTBackbone,
    resample_abs_pos_embed,
    resize_rel_pos_bias_table,
    trunc_normal_,
)

log = logging.getLogger("beitv2_fast")

FINETUNE_DEFAULTS = {
    "qkv_bias": True,
    "use_rel_pos_bias": True,
    "use_abs_pos_emb": False,
    "init_scale": 0.001,
    "num_classes": 1000,
}


def _cfg(img_size: int = 224) -> dict:
    """timm's ``pretrained_cfg`` of a classifier: input, preprocessing, head (no weights: local files only,
    read by ``BEiT.load_pretrained``, hence ``custom_load``)."""
    return {
        "num_classes": 1000, "input_size": (3, img_size, img_size), "pool_size": None, "fixed_input_size": True,
        "crop_pct": 0.9 if img_size == 224 else 1.0, "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "first_conv": "patch_embed.proj",
        "classifier": "head", "license": "mit", "custom_load": True,
    }  # fmt: skip


def _finetune_model(size: dict, kwargs: dict, *, init_values: float = 0.1, **arch) -> BEiT:
    return BEiT(**{**FINETUNE_DEFAULTS, "init_values": init_values, **size, **arch, **kwargs})


@register_model(pretrained_cfg=_cfg())
def beit_tiny_patch16_224(**kwargs) -> BEiT:
    return _finetune_model(SIZES["tiny"], kwargs, patch_size=16)


@register_model(pretrained_cfg=_cfg())
def beit_small_patch16_224(**kwargs) -> BEiT:
    return _finetune_model(SIZES["small"], kwargs, patch_size=16)


@register_model(pretrained_cfg=_cfg())
def beit_base_patch16_224(**kwargs) -> BEiT:
    return _finetune_model(SIZES["base"], kwargs, patch_size=16)


@register_model(pretrained_cfg=_cfg(256))
def beit_base_patch16_256(**kwargs) -> BEiT:
    return _finetune_model(SIZES["base"], kwargs, patch_size=16, img_size=256)


@register_model(pretrained_cfg=_cfg(384))
def beit_base_patch16_384(**kwargs) -> BEiT:
    return _finetune_model(SIZES["base"], kwargs, patch_size=16, img_size=384)


@register_model(pretrained_cfg=_cfg())
def beit_24x544_patch16_224(**kwargs) -> BEiT:
    return _finetune_model({"embed_dim": 544, "depth": 24, "num_heads": 16}, kwargs, patch_size=16)


@register_model(pretrained_cfg=_cfg())
def beit_large_patch16_224(**kwargs) -> BEiT:
    return _finetune_model(SIZES["large"], kwargs, init_values=1e-5, patch_size=16)


@register_model(pretrained_cfg=_cfg(384))
def beit_large_patch16_384(**kwargs) -> BEiT:
    return _finetune_model(SIZES["large"], kwargs, init_values=1e-5, patch_size=16, img_size=384)


@register_model(pretrained_cfg=_cfg(512))
def beit_large_patch16_512(**kwargs) -> BEiT:
    return _finetune_model(SIZES["large"], kwargs, init_values=1e-5, patch_size=16, img_size=512)


@register_model(pretrained_cfg=_cfg())
def beit_huge_patch14_224(**kwargs) -> BEiT:
    return _finetune_model(SIZES["huge"], kwargs, init_values=1e-5, patch_size=14)


@register_model(pretrained_cfg=_cfg())
def beit_giant_patch14_224(**kwargs) -> BEiT:
    giant = {"embed_dim": 1408, "depth": 40, "num_heads": 16, "mlp_ratio": 6144 / 1408}
    return _finetune_model(giant, kwargs, init_values=1e-5, patch_size=14)


# ------------------------------------------------------------------------------------------------
# From a pretraining checkpoint to a fine-tuning model
# ------------------------------------------------------------------------------------------------
def expand_shared_rel_pos_bias(state_dict: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Copy the shared ``rel_pos_bias.relative_position_bias_table`` into every block's
    ``blocks.{i}.attn.relative_position_bias_table`` and drop the shared entries (the reference's
    fine-tuning loader)."""
    out = dict(state_dict)
    table = out.pop("rel_pos_bias.relative_position_bias_table", None)
    out.pop("rel_pos_bias.relative_position_index", None)
    if table is not None:
        for i in range(num_layers):
            out[f"blocks.{i}.attn.relative_position_bias_table"] = table.clone()
    return out


def prepare_finetune_state_dict(
    model: BEiT, checkpoint, *, model_key: str = "model|module", model_prefix: str = "", model_filter_name: str = ""
) -> dict[str, torch.Tensor]:
    """The reference's ``run_class_finetuning.py`` checkpoint preparation, for ``model``, checked.

    Chooses the weights with the reference's selectors (:func:`~beitv2_fast.models.convert.select_weights`:
    ``model_key``, ``model_prefix``, ``model_filter_name``; every layout :func:`load_checkpoint`
    reads, MMPretrain's included); drops ``head.*`` when its shape differs (another number of
    classes); expands a shared relative position table into per-block tables when the model has
    those; drops ``relative_position_index`` entries (the model's are used); resizes relative
    position tables to the model's patch grid (the reference's geometric-progression bicubic
    resampling) and ``pos_embed`` (bicubic).

    Raises:
        BackboneMismatchError: the weights would leave part of the backbone as initialised (see
            :func:`~beitv2_fast.models.convert.check_backbone_weights`); one line naming the file.
    """
    source = "given as a state dict"
    if isinstance(checkpoint, (str, os.PathLike)):
        source = repr(os.fspath(checkpoint))
        checkpoint = load_state_dict_file(checkpoint, unwrap=False)
    state_dict = select_weights(
        checkpoint, model_key=model_key, model_prefix=model_prefix, model_filter_name=model_filter_name, source=source
    )
    own = model.state_dict()
    for key in ("head.weight", "head.bias"):
        if key in state_dict and (key not in own or state_dict[key].shape != own[key].shape):
            del state_dict[key]
    if model.block_kwargs["window_size"] is not None:
        state_dict = expand_shared_rel_pos_bias(state_dict, model.get_num_layers())
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("relative_position_index")}
    grid = model.patch_embed.grid_size
    for key, value in list(state_dict.items()):
        if key.endswith("relative_position_bias_table") and key in own and value.shape != own[key].shape:
            span = math.isqrt(value.shape[0] - NUM_CLS_TABLE_ENTRIES)  # 2 * side - 1 (square, as the reference)
            state_dict[key] = resize_rel_pos_bias_table(value, ((span + 1) // 2,) * 2, grid)
    if (
        "pos_embed" in state_dict
        and model.pos_embed is not None
        and state_dict["pos_embed"].shape != model.pos_embed.shape
    ):
        state_dict["pos_embed"] = resample_abs_pos_embed(state_dict["pos_embed"], grid)
    state_dict = fill_derived_buffers(model, state_dict)
    check_backbone_weights(model, state_dict, source)
    return state_dict


def load_for_finetuning(
    model: BEiT, checkpoint, *, model_key: str = "model|module", model_prefix: str = "", model_filter_name: str = ""
):
    """Load a pretraining (or fine-tuned) checkpoint into a fine-tuning model, as the reference does
    (``mask_token``, ``lm_head``, ``cls_pt_layers``, ``norm`` of a MIM checkpoint go unused; a new
    head stays as initialised), but never silently: a file that does not give the whole backbone
    raises :class:`~beitv2_fast.models.convert.BackboneMismatchError` (see
    :func:`prepare_finetune_state_dict`). Returns ``(missing_keys, unexpected_keys)``: what starts
    as initialised, and what was left out."""
    state_dict = prepare_finetune_state_dict(
        model, checkpoint, model_key=model_key, model_prefix=model_prefix, model_filter_name=model_filter_name
    )
    result = model.load_state_dict(state_dict, strict=False)
    on_purpose = [k for k in result.unexpected_keys if k.startswith(PRETRAINING_ONLY_PREFIXES)]
    others = [k for k in result.unexpected_keys if k not in on_purpose]
    log.info(
        "fine-tuning weights: %d loaded; initialised anew: %s; left out on purpose (pretraining heads, tokenizer): "
        "%s; left out, not in the model: %s",
        len(state_dict) - len(result.unexpected_keys), _modules(result.missing_keys), _modules(on_purpose),
        _modules(others),
    )  # fmt: skip
    return result


def _modules(keys: list[str]) -> str:
    """``lm_head.weight, lm_head.bias, cls_pt_layers.0.norm1.weight`` as ``lm_head, cls_pt_layers.0``."""
    names = []
    for key in keys:
        parts = key.split(".")
        names.append(".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0])
    return ", ".join(dict.fromkeys(names)) or "none"


# ------------------------------------------------------------------------------------------------
# Linear probe
# ------------------------------------------------------------------------------------------------
class LinearProbe(nn.Module):
    """A linear classifier on frozen features: ``Linear(BatchNorm1d(feature, affine=False))``.

    The BatchNorm without affine parameters before the linear layer is MAE's linear-probing
    protocol (it normalises features whose scale varies a lot between layers and models).

    Default: the class token of the last block, through the backbone's final LayerNorm. The
    reference published no protocol (microsoft/unilm#1574); BEiT v2's patch aggregation trains
    exactly the last block's class token to summarise the image for the MIM heads, and the paper
    credits that module for its linear-probing gains, so the class token of the last block is the
    feature the method is built to make linearly separable. Mean pooling and other blocks (BEiT
    v1's probe used an intermediate block with mean pooling) are one argument away.

    Args:
        backbone: a BEiT model (:class:`BEiT`, ``BEiTForMaskedImageModeling``); frozen here.
        num_classes: classes of the linear layer.
        block: the block whose output tokens are read (0-based; negative counts from the end).
        pool: ``"cls"`` (class token) or ``"mean"`` (mean of the patch tokens).
        final_norm: apply the backbone's final LayerNorm (``fc_norm`` if it has one, else
            ``norm``) to the pooled feature.
    """

    def __init__(
        self, backbone: BEiTBackbone, num_classes: int, block: int = -1, pool: str = "cls", final_norm: bool = True
    ):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean'; got {pool!r}")
        self.backbone = backbone.requires_grad_(False).eval()
        self.block = block
        self.pool = pool
        norm = getattr(backbone, "fc_norm", None) or getattr(backbone, "norm", None)
        self.feature_norm = norm if final_norm and isinstance(norm, nn.LayerNorm) else nn.Identity()
        dim = backbone.embed_dim
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        trunc_normal_(self.head[1].weight.data, 0.01, 2.0)  # MAE's head initialisation
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.backbone.eval()  # frozen: no stochastic depth, no dropout
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled, normalised frozen feature ``[B, D]``."""
        with torch.no_grad():
            tokens = self.backbone.intermediate_tokens(x, [self.block])[0]
            pooled = tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(1)
            return self.feature_norm(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``; only ``head`` gets gradients."""
        return self.head(self.forward_features(x))


# ------------------------------------------------------------------------------------------------
# Optimizer parameter groups
# ------------------------------------------------------------------------------------------------
def get_parameter_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float | None = None,
    skip_list: Iterable[str] = (),
) -> list[dict]:
    """The reference's ``optim_factory.get_parameter_groups``.

    No weight decay for parameters with ``ndim <= 1``, names ending in ``.bias`` and names in
    ``skip_list`` or ``model.no_weight_decay()``; frozen parameters are left out. With
    ``layer_decay``, each group carries ``lr_scale = layer_decay ** (depth + 1 - layer_id)`` from
    ``model.get_layer_id`` (fine-tuning); without, every group has ``lr_scale`` 1 (pretraining).
    """
    skip = set(skip_list) | set(getattr(model, "no_weight_decay", lambda: set())())
    num_layers = model.get_num_layers() + 2 if layer_decay is not None else 1
    groups: dict[str, dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        no_decay = parameter.ndim <= 1 or name.endswith(".bias") or name in skip
        layer = model.get_layer_id(name) if layer_decay is not None else 0
        key = f"layer_{layer}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            scale = layer_decay ** (num_layers - 1 - layer) if layer_decay is not None else 1.0
            groups[key] = {
                "params": [],
                "param_names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": scale,
            }
        groups[key]["params"].append(parameter)
        groups[key]["param_names"].append(name)
    return list(groups.values())
