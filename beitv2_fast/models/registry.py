"""Model names: ``create_model(name, **kwargs)`` for the reference's names (and a few more), also
registered with ``timm.create_model`` when timm is installed.

timm is optional, and importing it takes seconds, so it is not imported here: the names are
registered as soon as timm is imported (now, if it already is). Names timm already defines
(``beit_base_patch16_224``, ``beit_large_patch16_224``, ...: the same architecture as ours) are
left to timm there; ``create_model`` here always builds ours.
"""

from __future__ import annotations

import fnmatch
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable

import torch.nn as nn

__all__ = ["create_model", "list_models", "register_model", "register_with_timm", "register_with_timm_when_available"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``factory`` under its function name (a decorator)."""
    _MODELS[factory.__name__] = factory
    return factory


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
        **kwargs: the model's constructor arguments, overriding the name's defaults.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    pretrained_weight = pretrained_weight or kwargs.pop("init_ckpt", None)
    if pretrained and pretrained_weight is None:
        raise ValueError(
            f"pretrained=True for {name!r} needs pretrained_weight=<local file>: beitv2-fast never downloads weights"
        )
    model = _MODELS[name](**kwargs)
    if pretrained_weight is not None:
        from .convert import load_checkpoint

        load_checkpoint(model, pretrained_weight, strict=True)
    return model


def register_with_timm() -> list[str]:
    """Register every name timm does not already define with ``timm.create_model``; returns them."""
    from timm.models import _registry

    module = sys.modules[__name__]
    added = []
    for name in list_models():
        if _registry.is_model(name):
            continue

        def entry(
            pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, _name=name, **kwargs
        ):
            return create_model(_name, pretrained=pretrained, **kwargs)

        entry.__name__ = entry.__qualname__ = name
        entry.__module__ = __name__
        setattr(module, name, entry)
        _registry.register_model(entry)
        added.append(name)
    return added


class _RegisterWhenTimmLoads(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``timm`` is first imported, it lets the other finders locate it
    and registers our names once timm's package has run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        exec_timm = spec.loader.exec_module

        def exec_module(module):
            exec_timm(module)
            register_with_timm()

        spec.loader.exec_module = exec_module
        return spec


def register_with_timm_when_available() -> None:
    """Register with timm now if it is imported, else as soon as it is (if it is installed)."""
    if "timm" in sys.modules:
        register_with_timm()
    elif importlib.util.find_spec("timm") is not None:
        if not any(isinstance(f, _RegisterWhenTimmLoads) for f in sys.meta_path):
            sys.meta_path.insert(0, _RegisterWhenTimmLoads())
