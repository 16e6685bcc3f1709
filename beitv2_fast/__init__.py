"""beitv2-fast: BEiT v2 (VQ-KD visual tokenizer + masked image modeling) on fused kernels."""

import kernels as _kernels

if not getattr(_kernels, "__beitv2_kernels__", False):
    raise ImportError(
        f"`import kernels` loaded {getattr(_kernels, '__file__', _kernels)!r}, which is not beitv2-fast's kernel "
        "library: the unrelated PyPI package 'kernels' shares its import name. Fix: `pip uninstall kernels`, "
        "then reinstall beitv2-fast (`pip install -e .`)."
    )

__version__ = "0.1.0"

from . import _timm  # noqa: E402  (after the kernels check)

_timm.register_when_timm_loads()  # our names in timm.create_model, whichever of the two is imported first
