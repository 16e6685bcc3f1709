"""Build script: the Python packages, plus the optional CUDA extension ``kernels._C`` from csrc/.

The extension is built when torch (a CUDA build) and nvcc are both present in the build
environment, which means installing with ``--no-build-isolation`` after torch. Without them the
install is pure Python and the Triton and PyTorch backends serve every op.

Environment:
    BEITV2_BUILD_CUDA=0|1   skip the extension, or require it (fail loudly if it cannot build)
    TORCH_CUDA_ARCH_LIST    architectures to compile for; default "8.0;9.0" (A100, H100/H200)
    CUDA_HOME               the CUDA toolkit; found from nvcc when unset
    MAX_JOBS                parallel compile jobs (ninja)
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup


def _log(message: str) -> None:
    print(f"[beitv2-fast setup] {message}", file=sys.stderr)


def _find_cuda_home() -> str | None:
    """A toolkit directory with bin/nvcc and include/cuda_runtime.h (nvcc on PATH may be a wrapper)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for home in filter(None, candidates):
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


def _cuda_extension():
    """``(ext_modules, cmdclass)`` for kernels._C, or empty ones with the reason logged."""
    mode = os.environ.get("BEITV2_BUILD_CUDA", "auto")
    if mode == "0":
        _log("BEITV2_BUILD_CUDA=0: skipping the CUDA extension")
        return [], {}

    def skip(reason: str):
        if mode == "1":
            raise SystemExit(
                f"[beitv2-fast setup] BEITV2_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}"
            )
        _log(f"not building the CUDA extension: {reason}")
        return [], {}

    try:
        import torch
    except ImportError:
        return skip("torch is not importable here; install torch first, then pip install --no-build-isolation")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU-only build")
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        return skip("nvcc and the CUDA headers were not found (set CUDA_HOME)")
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    nvcc_version = subprocess.run(
        [os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True
    ).stdout
    _log(
        f"building kernels._C with {cuda_home} ({nvcc_version.strip().splitlines()[-1]}) "
        f"for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
    )

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    extension = CUDAExtension(
        name="kernels._C",
        sources=sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/*.cu")),
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
        py_limited_api=True,
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
