"""Import microsoft/unilm ``beit2/`` from a checkout the user points at, on modern torch and timm.

The reference was written for torch 1.7 and timm 0.4.12 (``beit2/requirements.txt``). Nothing of it
is copied here: :func:`import_beit2` puts the checkout's ``beit2/`` folder on ``sys.path`` and
imports its modules with these shims, each installed only where the real thing is missing:

- ``torch._six`` (removed in torch 2.0): ``inf`` and ``string_classes``.
- ``timm.optim``: ``nadam.Nadam`` and ``radam.RAdam`` are ``NAdamLegacy``/``RAdamLegacy`` in timm
  1.0, and ``novograd`` is gone (a ``NovoGrad`` that refuses to be built stands in: the recipes
  use AdamW); every other timm import of the reference still resolves in timm 1.0.
- ``einops``, ``tensorboardX``, ``ftfy``, ``regex``, ``pkg_resources``, ``cgitb``: the
  reference's own requirements; when absent, :mod:`einops_lite`, torch's TensorBoard writer and
  stubs stand in (``ftfy``/``regex`` serve only CLIP's text tokenizer, which the image paths never
  call).
- While the reference's modules import, ``timm.models.registry.register_model`` leaves timm's
  registry alone: the reference registers names that timm 1.0 and beitv2-fast also define
  (``beit_base_patch16_224``, ``beit_base_patch16_224_8k_vocab_cls_pt``...), and build the
  reference's models by calling its factory functions instead.

And at run time:

- :func:`random_clip_loader`: ``vqkd_teacher.clip.load`` downloads OpenAI's weights; the benchmark
  needs only the architecture, so the loader builds the same ``CLIP`` with random weights.
- :func:`patch_cuda_calls`: ``torch.cuda.synchronize()`` in the reference's engines becomes a no-op
  on a machine without CUDA, and its ``torch.cuda.amp.autocast()`` (fp16) takes the benchmark's
  precision policy (bf16 on CUDA) so that every provider runs the same arithmetic.
- :func:`loss_scaler`: the engines read the scale from ``loss_scaler.state_dict()["scale"]``,
  which a disabled ``GradScaler`` (no CUDA) leaves out; there it reads 1.0.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import math
import os
import sys
import types
from collections.abc import Iterator

import torch

BEIT2_MODULES = (
    "modeling_finetune",
    "modeling_pretrain",
    "norm_ema_quantizer",
    "modeling_vqkd",
    "utils",
    "optim_factory",
    "engine_for_pretraining",
    "engine_for_vqkd",
)


def find_beit2(unilm_dir: str) -> str:
    """The ``beit2/`` folder of a unilm checkout (or the folder itself).

    Raises:
        ValueError: no ``modeling_pretrain.py`` there, naming the path and what was expected.
    """
    for candidate in (os.path.join(unilm_dir, "beit2"), unilm_dir):
        if os.path.isfile(os.path.join(candidate, "modeling_pretrain.py")):
            return os.path.abspath(candidate)
    raise ValueError(
        f"--unilm-dir {unilm_dir!r}: expected a checkout of microsoft/unilm (with beit2/modeling_pretrain.py) "
        "or its beit2/ folder"
    )


def _missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


def _unavailable(what: str):
    def refuse(*args, **kwargs):
        raise RuntimeError(f"{what} is not available under the benchmark's compatibility shim (bench/reference)")

    return refuse


class _RefusedOptimizer:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("timm 1.0 has no NovoGrad; the BEiT v2 recipes use AdamW")


def _tensorboardx() -> types.ModuleType:
    def summary_writer(*args, **kwargs):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(*args, **kwargs)

    return _module("tensorboardX", SummaryWriter=summary_writer)


def _pkg_resources() -> types.ModuleType:
    import packaging.version

    return _module("pkg_resources", packaging=packaging)


def install_missing_modules() -> list[str]:
    """Put stand-ins for the modules the reference imports but modern environments lack into
    ``sys.modules``; returns their names."""
    from . import einops_lite

    stand_ins = {
        "torch._six": lambda: _module("torch._six", inf=math.inf, string_classes=(str, bytes)),
        "einops": lambda: _module("einops", rearrange=einops_lite.rearrange, repeat=einops_lite.repeat),
        "tensorboardX": _tensorboardx,
        "ftfy": lambda: _module("ftfy", fix_text=_unavailable("ftfy.fix_text (CLIP text tokenizer)")),
        "regex": lambda: _module(
            "regex", IGNORECASE=0, compile=lambda *a, **k: _module("pattern", findall=_unavailable("CLIP's tokenizer"))
        ),
        "pkg_resources": _pkg_resources,
        "cgitb": lambda: _module("cgitb", enable=lambda *a, **k: None),
        "timm.optim.novograd": lambda: _module("timm.optim.novograd", NovoGrad=_RefusedOptimizer),
    }
    installed = []
    for name, build in stand_ins.items():
        if _missing(name):
            sys.modules[name] = build()
            installed.append(name)
    for module_name, old_name, new_name in (("nadam", "Nadam", "NAdamLegacy"), ("radam", "RAdam", "RAdamLegacy")):
        module = importlib.import_module(f"timm.optim.{module_name}")
        if not hasattr(module, old_name):
            setattr(module, old_name, getattr(module, new_name, _RefusedOptimizer))
            installed.append(f"timm.optim.{module_name}.{old_name}")
    return installed


@contextlib.contextmanager
def _timm_registry_untouched() -> Iterator[None]:
    """While the reference imports, its ``@register_model`` returns the factory unregistered."""
    import timm.models.registry as registry

    original = registry.register_model
    registry.register_model = lambda fn: fn
    try:
        yield
    finally:
        registry.register_model = original


def import_beit2(unilm_dir: str) -> types.SimpleNamespace:
    """Import the reference's modules from ``unilm_dir`` (a unilm checkout or its ``beit2/``).

    Returns:
        A namespace with one attribute per module of :data:`BEIT2_MODULES`, plus ``path`` and
        ``shims`` (the stand-in modules that were installed).
    """
    path = find_beit2(unilm_dir)
    shims = install_missing_modules()
    if path not in sys.path:
        sys.path.insert(0, path)
    modules = {}
    with _timm_registry_untouched():
        for name in BEIT2_MODULES:
            modules[name] = importlib.import_module(name)
    return types.SimpleNamespace(path=path, shims=shims, **modules)


def create_model(beit2: types.SimpleNamespace, module: str, name: str, **kwargs) -> torch.nn.Module:
    """Build one of the reference's models by its factory, as timm 0.4.12's ``create_model`` did
    for the reference's run scripts: keyword arguments that are None are dropped."""
    factory = getattr(getattr(beit2, module), name)
    return factory(**{key: value for key, value in kwargs.items() if value is not None})


def random_clip_loader(beit2: types.SimpleNamespace):
    """A replacement for ``vqkd_teacher.clip.load`` that builds OpenAI CLIP ViT-B/16 (as
    ``clip.load("ViT-B/16", device="cpu", jit=False)`` would: fp32, eval mode) with random weights."""
    clip_model = importlib.import_module("vqkd_teacher.clip.model")

    def load(name: str = "ViT-B/16", device="cpu", jit: bool = False, download_root=None):
        if name != "ViT-B/16":
            raise ValueError(f"the benchmark's CLIP stand-in builds ViT-B/16 only; got {name!r}")
        model = clip_model.CLIP(
            embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
            context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12,
        )  # fmt: skip
        return model.to(device).float().eval(), None

    return load


def patch_cuda_calls(autocast_dtype: torch.dtype | None) -> None:
    """Adapt the engines' CUDA calls to this machine and the benchmark's precision policy.

    Args:
        autocast_dtype: the dtype ``torch.cuda.amp.autocast()`` uses (None: leave it, fp16).
    """
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda device=None: None
    if autocast_dtype is not None:
        torch.cuda.amp.autocast = functools.partial(torch.autocast, "cuda", dtype=autocast_dtype)


def loss_scaler(beit2: types.SimpleNamespace):
    """The reference's ``NativeScalerWithGradNormCount``; without CUDA its disabled ``GradScaler``
    reports the scale 1.0 that the engines log."""
    scaler = beit2.utils.NativeScalerWithGradNormCount()
    if not scaler._scaler.is_enabled():
        scaler.state_dict = lambda: {"scale": 1.0}
    return scaler
