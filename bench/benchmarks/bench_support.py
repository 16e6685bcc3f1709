"""Helpers of the benchmark cases."""

from __future__ import annotations

import importlib.util
import os
import sys

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench_kernels():
    """``bench/kernels.py`` as the module ``bench_kernels`` (its name would shadow the package)."""
    if "bench_kernels" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_kernels", os.path.join(BENCH_DIR, "kernels.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_kernels"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_kernels"]
