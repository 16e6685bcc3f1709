"""The benchmark suite, run from the repository root as modules (``python -m bench.bench_kernels``,
``python -m bench.train_step``) so that its helpers import as ``bench._common`` and
``bench.reference`` while ``kernels`` and ``beitv2_fast`` are the installed packages."""
