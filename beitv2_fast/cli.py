"""The ``beitv2`` command."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="beitv2", description="BEiT v2 on fused kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("env", help="print versions and the kernel implementation each op uses here")
    args = parser.parse_args(argv)
    if args.command == "env":
        from kernels.env import report

        print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
