"""The CPU kernels against their baselines: ``bench/bench_kernels.py``'s providers, one benchmark each."""

from __future__ import annotations

import argparse
import functools
import os

import torch

from bench import bench_kernels

BATCH = int(os.environ.get("BEITV2_BENCH_BATCH", "4"))


@functools.cache
def cases() -> dict[str, object]:
    """``bench/bench_kernels.py``'s cases of every op at BATCH images of 197 tokens, fp32, by id."""
    args = argparse.Namespace(
        batch=BATCH, seq=197, m=None, k=8192, d=32, c=768, v=8192, heads=12, head_dim=64, dtype="fp32"
    )
    torch.manual_seed(0)
    found = {}
    for op in bench_kernels.CASES:
        for case in bench_kernels.make_cases(op, args, torch.device("cpu")):
            for provider, fn in case.providers.items():
                found[f"{case.op}-{case.mode}-{provider}"] = (case, provider, fn)
    return found


def pytest_generate_tests(metafunc):
    if "case_id" in metafunc.fixturenames:
        metafunc.parametrize("case_id", list(cases()))


def test_kernel(benchmark, case_id):
    case, provider, fn = cases()[case_id]
    benchmark.group = f"{case.op} {case.shape} {case.dtype}"
    benchmark.extra_info.update(provider=provider, flops=case.flops, bytes=case.bytes_moved)
    benchmark(fn)
