"""Our model names in ``timm.create_model``, registered as soon as both ``beitv2_fast`` and timm are
imported, in either order (``import beitv2_fast`` installs the hook; importing timm takes seconds,
so it is never imported for this).

- The classifiers (``beit_*_patch*``, ``pretrained_cfg`` given at their registration) are built by
  timm's ``build_model_with_cfg``, as timm's own models: ``pretrained_cfg``/``default_cfg``,
  ``pretrained_cfg_overlay``, ``features_only`` (timm's ``FeatureGetterNet`` over
  ``forward_intermediates``; ``out_indices`` default 3, the last three blocks, as timm's BEiT),
  ``pretrained=True`` with ``pretrained_cfg_overlay=dict(file=<local file>)`` (read by our safe
  loader; weights are never downloaded).
- The other names (pretraining models, tokenizers, segmentors) go to our ``create_model``.
- Names timm already defines (``beit_base_patch16_224``, ``beit_base_patch16_384``,
  ``beit_large_patch16_{224,384,512}``) stay timm's; ours are registered as ``beitv2_fast_<name>``.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys

ALIAS_PREFIX = "beitv2_fast_"
# Filled by register(): timm's registry reads the pretrained cfgs of a module's entry points here.
default_cfgs: dict[str, dict] = {}
# Our name -> its name in timm (``beitv2_fast_<name>`` where timm has the name).
REGISTERED: dict[str, str] = {}


def _entry(name: str, timm_name: str):
    from timm.models import build_model_with_cfg

    from .models.registry import create_model, pretrained_cfg_of

    def no_download(pretrained, kwargs) -> None:
        overlay = kwargs.get("pretrained_cfg_overlay") or {}
        if pretrained and not overlay.get("file"):
            raise ValueError(
                f"pretrained=True for {timm_name!r} needs pretrained_cfg_overlay=dict(file=<local file>): "
                "beitv2-fast never downloads weights"
            )

    if pretrained_cfg_of(name) is None:

        def entry(pretrained=False, **kwargs):
            no_download(pretrained, kwargs)
            file = (kwargs.pop("pretrained_cfg_overlay", None) or {}).get("file")
            for key in ("pretrained_cfg", "cache_dir"):
                kwargs.pop(key, None)
            return create_model(name, pretrained_weight=file, **kwargs)

    else:

        def entry(pretrained=False, **kwargs):
            no_download(pretrained, kwargs)
            if kwargs.get("pretrained_cfg_overlay"):  # a local file is read by our loader (timm resets custom_load)
                kwargs["pretrained_cfg_overlay"] = {"custom_load": True, **kwargs["pretrained_cfg_overlay"]}
            feature_cfg = {"out_indices": kwargs.pop("out_indices", 3), "feature_cls": "getter", **kwargs.pop("feature_cfg", {})}  # fmt: skip
            return build_model_with_cfg(functools.partial(create_model, name), timm_name, pretrained, feature_cfg=feature_cfg, **kwargs)  # fmt: skip

    entry.__name__ = entry.__qualname__ = timm_name
    entry.__module__ = __name__
    return entry


def register() -> dict[str, str]:
    """Register every one of our names with timm (see the module's docstring); returns our name ->
    its name in timm. Idempotent."""
    from timm.layers import register_notrace_function, register_notrace_module
    from timm.models import _registry

    from . import models  # noqa: F401  (every module registers its names on import)
    from .models import vit
    from .models.registry import list_models, pretrained_cfg_of

    # fx tracing (timm's feature extraction, its fx tests) keeps these as single calls: the patch
    # embedding and the grid check test shapes in Python, the blocks call the attention dispatcher.
    register_notrace_module(vit.PatchEmbed)
    register_notrace_module(vit.Block)
    register_notrace_function(vit.check_patch_grid)

    module = sys.modules[__name__]
    for name in list_models():
        if name in REGISTERED:
            continue
        ours = ALIAS_PREFIX + name if _registry.is_model(name) else name
        cfg = pretrained_cfg_of(name)
        if cfg is not None:
            default_cfgs[ours] = {**cfg, "architecture": ours}
        entry = _entry(name, ours)
        setattr(module, ours, entry)
        _registry.register_model(entry)
        REGISTERED[name] = ours
    return dict(REGISTERED)


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
            register()

        spec.loader.exec_module = exec_module
        return spec


def register_when_timm_loads() -> None:
    """Register with timm now if it is imported, else as soon as it is (if it is installed)."""
    if "timm" in sys.modules:
        register()
    elif importlib.util.find_spec("timm") is not None:
        if not any(isinstance(f, _RegisterWhenTimmLoads) for f in sys.meta_path):
            sys.meta_path.insert(0, _RegisterWhenTimmLoads())
