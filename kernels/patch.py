"""Put the fused relative-position attention into models built elsewhere, without changing their code.

``patch_timm_beit(model)`` swaps :func:`kernels.relpos_attention` into every attention block of a
timm ``Beit`` model (``beit_*``, ``beitv2_*``) in place. Parameters, buffers and the state dict
are untouched; only the forward of ``timm.models.beit.Attention`` changes, so that the bias
(the block's own table, the model's shared one, or both) reaches the kernel as one ``[H, N, N]``
tensor instead of timm's ``[1, H, N, N]`` float mask for ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import relpos_attention, relpos_bias

_PATCHED_CLASSES: dict[type, type] = {}


def _relpos_forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
    """timm's ``Attention.forward`` (timm/models/beit.py) with the fused kernel for the core."""
    if self.training and self.attn_drop.p > 0:  # dropout on the probabilities: the kernel has none
        return super(type(self), self).forward(x, shared_rel_pos_bias=shared_rel_pos_bias)
    batch, tokens, channels = x.shape
    if self.q_bias is None:
        qkv = self.qkv(x)
    else:
        qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        if self.qkv_bias_separate:
            qkv = self.qkv(x) + qkv_bias
        else:
            qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
    q, k, v = qkv.reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    bias = None
    if self.relative_position_bias_table is not None:
        bias = relpos_bias(self.relative_position_bias_table, self.relative_position_index)
    if shared_rel_pos_bias is not None:
        shared = shared_rel_pos_bias.reshape(shared_rel_pos_bias.shape[-3:])
        bias = shared if bias is None else bias + shared

    x = relpos_attention(q, k, v, bias, scale=self.scale)
    x = x.transpose(1, 2).reshape(batch, tokens, -1)  # a view: the kernel writes [B, N, H, Dh]
    return self.proj_drop(self.proj(x))


def _patched_class(attention_class: type) -> type:
    if attention_class not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[attention_class] = type(
            f"Relpos{attention_class.__name__}",
            (attention_class,),
            {"forward": _relpos_forward, "__doc__": f"{attention_class.__name__} with kernels.relpos_attention."},
        )
    return _PATCHED_CLASSES[attention_class]


def patch_timm_beit(model: torch.nn.Module) -> torch.nn.Module:
    """Make every attention block of a timm BEiT model use :func:`kernels.relpos_attention`.

    Works in place on ``timm.models.beit.Beit`` models (``timm.create_model("beitv2_base_patch16_224")``
    and the other ``beit*`` variants) or any module containing their ``Attention`` blocks, and
    returns the model. Outputs and gradients equal timm's up to floating-point rounding; the
    state dict and checkpoints are unchanged. Attention dropout (``attn_drop_rate > 0``), which
    the kernel does not implement, falls back to timm's own forward while training.

    Raises:
        ImportError: timm is not installed.
        TypeError: ``model`` is not a module.
        ValueError: ``model`` contains no timm BEiT attention block.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch_timm_beit: argument 'model' must be a torch.nn.Module; got {type(model).__name__}")
    try:
        from timm.models.beit import Attention as BeitAttention
    except ImportError as exc:
        raise ImportError("patch_timm_beit needs timm (pip install timm)") from exc
    patched = 0
    for module in model.modules():
        if type(module) is BeitAttention:
            module.__class__ = _patched_class(BeitAttention)
            patched += 1
        elif isinstance(module, BeitAttention) and type(module) in _PATCHED_CLASSES.values():
            patched += 1  # already patched: patching twice is harmless
    if not patched:
        raise ValueError(
            f"patch_timm_beit: argument 'model' ({type(model).__name__}) contains no timm.models.beit.Attention "
            "block; expected a timm Beit model such as timm.create_model('beitv2_base_patch16_224')"
        )
    return model
