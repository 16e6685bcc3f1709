"""Model names: ``create_model(name, **kwargs)`` for the reference's names (and a few more).

They are registered with ``timm.create_model`` too (``beitv2_fast._timm``), as soon as both
``beitv2_fast`` and timm are imported. Names timm already defines (``beit_base_patch16_224``,
``beit_large_patch16_224``, ...) give timm's model there and ours under ``beitv2_fast_<name>``;
``create_model`` here always builds ours.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable

import torch
import torch.nn as nn

__all__ = ["create_model", "list_models", "pretrained_cfg_of", "register_model"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_PRETRAINED_CFGS: dict[str, dict] = {}


def register_model(factory: Callable[..., nn.Module] | None = None, *, pretrained_cfg: dict | None = None):
    """Register ``factory`` under its function name (a decorator, also as
    ``@register_model(pretrained_cfg=...)``: timm's description of the input and the head, which the
    built model carries as ``pretrained_cfg``)."""

    def register(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _MODELS[factory.__name__] = factory
        if pretrained_cfg is not None:
            _PRETRAINED_CFGS[factory.__name__] = {**pretrained_cfg, "architecture": factory.__name__}
        return factory

    return register if factory is None else register(factory)


def pretrained_cfg_of(name: str) -> dict | None:
    """The timm ``pretrained_cfg`` of a registered name (classifiers only), or None."""
    cfg = _PRETRAINED_CFGS.get(name)
    return dict(cfg) if cfg is not None else None


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style ``pattern``, sorted."""
    return sorted(name for name in _MODELS if fnmatch.fnmatch(name, pattern))


def create_model(name: str, pretrained: bool = False, pretrained_weight: str | None = None, **kwargs) -> nn.Module:
    """Build a registered model, optionally with weights from a local file.

    Args:
        name: a name from :func:`list_models` (the reference's names, e.g.
            ``beit_base_patch16_224_8k_vocab_cls_pt``, ``beit_base_patch16_224``,
            ``vqkd_encoder_base_decoder_3x768x12_clip``).
        pretrained: must come with ``pretrained_weight`` (or the reference's ``init_ckpt``):
            weights are never downloaded.
        pretrained_weight: a local checkpoint (official, timm, MMPretrain or ours), loaded with
            ``strict=True`` through :func:`beitv2_fast.models.convert.load_checkpoint`.
        **kwargs: the model's constructor arguments, overriding the name's defaults; also
            ``device`` and ``dtype`` (the model is built on that device, then cast), and the
            reference's ``drop_block_rate=None`` (ignored: BEiT has no DropBlock).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    pretrained_weight = pretrained_weight or kwargs.pop("init_ckpt", None)
    if pretrained and pretrained_weight is None:
        raise ValueError(
            f"pretrained=True for {name!r} needs pretrained_weight=<local file>: beitv2-fast never downloads weights"
        )
    if kwargs.get("drop_block_rate", 0) is None:
        del kwargs["drop_block_rate"]  # the reference's fine-tuning script passes timm's DropBlock rate as None
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = _MODELS[name](**kwargs)
    if dtype is not None:
        model.to(dtype)
    if name in _PRETRAINED_CFGS:
        model.pretrained_cfg = model.default_cfg = pretrained_cfg_of(name)
    if pretrained_weight is not None:
        from .convert import load_checkpoint

        load_checkpoint(model, pretrained_weight, strict=True)
    return model
