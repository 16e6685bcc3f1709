"""beitv2-fast kernels: fused ops for masked image modeling with a visual tokenizer.

A standalone library (it depends on torch, and on triton for CUDA tensors; never on
``beitv2_fast``) so that other codebases can import the ops on their own::

    import kernels
    ids, similarity = kernels.codebook_lookup(z, codebook)

Every op is a torch custom op (``torch.ops.beitv2.*``) with CPU and CUDA kernels, a fake
kernel and autograd, so ``torch.compile(fullgraph=True)`` traces it without a graph break.
``kernels.set_backend`` (or ``BEITV2_KERNELS``) chooses between the Triton, CUDA C++ and
plain PyTorch implementations; ``python -m kernels.env`` says which one runs here and why.
"""

from __future__ import annotations

import importlib.metadata
import warnings

from . import attention, codebook, masked_ce, reference
from ._dispatch import BACKENDS, get_backend, set_backend
from .attention import relative_position_index, relpos_attention, relpos_attention_packed, relpos_bias
from .codebook import codebook_ema_stats, codebook_lookup
from .masked_ce import masked_linear_cross_entropy
from .patch import patch_timm_beit

# Marks this package as beitv2-fast's, for the import guard in beitv2_fast/__init__.py.
__beitv2_kernels__ = True

# Each op's table of implementations (backend -> kernels): what dispatch and `python -m kernels.env` read.
OPS = {
    "codebook_lookup": codebook.IMPLEMENTATIONS,
    "masked_linear_cross_entropy": masked_ce.IMPLEMENTATIONS,
    "relpos_attention": attention.IMPLEMENTATIONS,
}

__all__ = [
    "BACKENDS",
    "codebook_ema_stats",
    "codebook_lookup",
    "get_backend",
    "masked_linear_cross_entropy",
    "patch_timm_beit",
    "reference",
    "relative_position_index",
    "relpos_attention",
    "relpos_attention_packed",
    "relpos_bias",
    "set_backend",
]


def _warn_if_shadowed_by_pypi_kernels() -> None:
    # The PyPI distribution "kernels" (Hugging Face's kernel-hub loader) installs a top-level
    # package of the same name; whichever is found first on sys.path wins.
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    warnings.warn(
        "the PyPI package 'kernels' is installed beside beitv2-fast and uses the same import name "
        "'kernels'; `import kernels` may load either one. Fix: `pip uninstall kernels`, then "
        "reinstall beitv2-fast (`pip install -e .`).",
        stacklevel=2,
    )


_warn_if_shadowed_by_pypi_kernels()
