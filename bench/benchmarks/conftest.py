"""pytest-benchmark cases for the CPU kernels and the data pipeline, outside the default test run
(``testpaths`` is ``tests``)::

    pytest bench/benchmarks --benchmark-only                     # everything
    pytest bench/benchmarks -k masking --benchmark-only          # one part
    pytest bench/benchmarks --benchmark-only --benchmark-autosave   # keep them in .benchmarks/ to compare

The kernel cases are ``bench/bench_kernels.py``'s own providers at CPU-sized shapes (``BEITV2_BENCH_BATCH``
images, default 4), grouped so that each table compares the providers of one op, pass and shape.
"""

from __future__ import annotations
