"""What the benchmark scripts share: the run's environment, timing statistics, process memory on
the CPU, and the tables they print and append (CSV, Markdown)."""

from __future__ import annotations

import csv
import ctypes
import ctypes.util
import datetime
import os
import platform
import subprocess
from collections.abc import Sequence

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device_name(device: torch.device) -> str:
    """``NVIDIA H200`` on CUDA; ``CPU <model> x<cores>`` on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    return f"CPU {model} x{os.cpu_count()}"


def environment(device: torch.device) -> dict[str, str]:
    """Date, commit, device and library versions: the columns every results row starts with.

    The commit is ``$BEITV2_COMMIT`` when set (a copy of the tree without ``.git``, as on a lent
    GPU machine), else git's."""
    commit = os.environ.get("BEITV2_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT
            ).stdout.strip()
        except OSError:
            commit = ""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "commit": commit or "unknown",
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
    }


def quantiles_ms(seconds: Sequence[float]) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds, the quantiles of ``triton.testing.do_bench``."""
    times = torch.tensor(list(seconds), dtype=torch.float64) * 1e3
    return tuple(times.quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist())


# --------------------------------------------------------------------------------------------
# Process memory on the CPU (Linux)
# --------------------------------------------------------------------------------------------
def rss_kib(field: str = "VmRSS") -> int:
    """A ``/proc/self/status`` field in KiB: ``VmRSS`` (resident now) or ``VmHWM`` (its peak)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Set the peak resident set (VmHWM) to the current one."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def trim_heap() -> None:
    """Give the heap's free memory back to the system (glibc ``malloc_trim``)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def return_freed_memory() -> None:
    """Make the resident set follow the live allocations from now on. glibc keeps freed heap
    blocks (the resident set then overstates what is in use) unless large blocks are mapped one
    by one and the heap is trimmed. That costs a page fault per large allocation: call it for
    memory measurements only, after the timed steps."""
    libc = _libc()
    m_mmap_threshold, m_trim_threshold = -3, -1  # from malloc.h
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(m_mmap_threshold, 64 * 1024)
        libc.mallopt(m_trim_threshold, 64 * 1024)
    trim_heap()


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def format_table(rows: list[dict], columns: Sequence[str]) -> str:
    """Aligned plain-text columns."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def markdown_table(rows: list[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def append_csv(rows: list[dict], path: str) -> None:
    """Append ``rows`` to ``path``. A file written with fewer columns is rewritten with the union
    of the columns, its older rows leaving the new ones empty."""
    if not rows:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    if not os.path.exists(path) or not os.path.getsize(path):
        mode, old_rows = "w", []
    else:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            old_rows = [] if set(fields) <= set(header) else list(reader)
        mode = "a" if set(fields) <= set(header) else "w"
        fields = list(dict.fromkeys(header + fields))
    with open(path, mode, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        if mode == "w":
            writer.writeheader()
            writer.writerows(old_rows)
        writer.writerows(rows)
