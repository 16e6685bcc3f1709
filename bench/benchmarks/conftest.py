"""pytest-benchmark cases for the CPU kernels and the data pipeline, outside the default test run
(``testpaths`` is ``tests``)::

    pytest bench/benchmarks --benchmark-only                     # everything
    pytest bench/benchmarks -k masking --benchmark-only          # one part
    pytest bench/benchmarks --benchmark-only --benchmark-autosave   # keep them in .benchmarks/ to compare

The kernel cases are ``bench/kernels.py``'s own providers at CPU-sized shapes (``BEITV2_BENCH_BATCH``
images, default 4), grouped so that each table compares the providers of one op, pass and shape.
"""

from __future__ import annotations

import sys

from bench_support import BENCH_DIR

import kernels  # noqa: F401 - the package, before bench/ (which holds a kernels.py) is on the path

if BENCH_DIR not in sys.path:
    sys.path.append(BENCH_DIR)  # bench/_common.py and bench/reference
