"""Test session set-up.

Without a GPU the Triton kernels run under Triton's CPU interpreter; ``triton.jit`` picks the
interpreter when a kernel is defined, so the variable is set here, before any test imports
``kernels``. On a GPU machine the kernels are compiled and the ``cuda`` tests run.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # pytest -n N: share the cores, do not oversubscribe them
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
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


def pytest_generate_tests(metafunc):
    # A kernel test module names the backends it covers in KERNEL_BACKENDS; every test of it
    # that takes the `backend` fixture runs once per backend. The CUDA C++ runs carry the `cuda`
    # marker, so `pytest -m cuda` (bench/gpu_suite.sh) runs every op's C++ tests on a GPU.
    backends = getattr(metafunc.module, "KERNEL_BACKENDS", None)
    if backends and "backend" in metafunc.fixturenames:
        params = [pytest.param(name, marks=pytest.mark.cuda) if name == "cuda" else name for name in backends]
        metafunc.parametrize("backend", params, indirect=True)


@pytest.fixture
def backend(request, device):
    """The test runs under ``kernels.set_backend(name)``, or is skipped where that backend cannot run."""
    import kernels
    from kernels import _dispatch

    name = request.param
    if name == "cuda" and (device.type != "cuda" or not _dispatch.CUDA_EXTENSION_AVAILABLE):
        if device.type == "cuda" and os.environ.get("BEITV2_REQUIRE_CUDA_BACKEND") == "1":  # bench/gpu_suite.sh
            pytest.fail(f"the CUDA C++ backend is required here but unavailable: {_dispatch.CUDA_EXTENSION_STATUS}")
        pytest.skip("the CUDA C++ backend needs a GPU and the built extension")
    if name == "triton" and device.type != "cuda" and not _dispatch.triton_interpret():
        pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1")
    with kernels.set_backend(name):
        yield name


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")
