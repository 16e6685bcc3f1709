"""Test session set-up.

Without a GPU the Triton kernels run under Triton's CPU interpreter; ``triton.jit`` picks the
interpreter when a kernel is defined, so the variable is set here, before any test imports
``kernels``. On a GPU machine the kernels are compiled and the ``cuda`` tests run.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_interpreter = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 (CPU-only machines set it)")
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "interpreter" in item.keywords and not interpreting:
            item.add_marker(skip_interpreter)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")
