"""Environment report: versions, devices and the implementation each op will use here, and why.

Run ``python -m kernels.env`` (or ``beitv2 env``).
"""

from __future__ import annotations

import platform

import torch

from . import OPS, _dispatch


def report() -> str:
    lines = [
        f"python        {platform.python_version()} ({platform.machine()})",
        f"torch         {torch.__version__} (built for CUDA {torch.version.cuda or 'none'})",
        f"triton        {_dispatch.TRITON_STATUS}",
        f"csrc ext      {_dispatch.CUDA_EXTENSION_STATUS}",
        f"interpreter   TRITON_INTERPRET={'1' if _dispatch.triton_interpret() else '0'}",
        f"backend       {_dispatch.get_backend()!r} (from set_backend or {_dispatch.ENV_VAR})",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(
                f"cuda:{i}        {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB"
            )
    else:
        lines.append("cuda          no CUDA device visible")
    lines.append("")
    lines.append(f"{'op':<30} {'device':<7} {'implementation':<15} reason")
    for name, implementations in OPS.items():
        for device in ("cuda", "cpu"):
            implementation, reason = _dispatch.explain(device, implementations)
            lines.append(f"{name:<30} {device:<7} {implementation:<15} {reason}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
