"""The ``hcrlhf`` command.

    hcrlhf --version
    hcrlhf bench advantages [--device cpu|cuda] [--quick]     # the advantage-kernel benchmark
    hcrlhf bench NAME --help                                   # any benchmark in benchmarks/

Exit codes: 0 success, 2 bad usage, 1 any other error.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from hcrlhf import __version__

EPILOG = """examples:
  hcrlhf bench advantages              full grid, writes benchmarks/results/<device>.md
  hcrlhf bench advantages --quick      a smoke run on two shapes
  hcrlhf bench advantages --device cpu --ops gae
"""


def available_benchmarks() -> dict[str, str]:
    """{name: module} for benchmarks/bench_<name>.py and benchmarks/guarantee.py."""
    import hcrlhf.benchmarks as package

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("bench_"):
            found[info.name.removeprefix("bench_")] = f"hcrlhf.benchmarks.{info.name}"
        elif info.name == "guarantee":
            found["guarantee"] = "hcrlhf.benchmarks.guarantee"
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hcrlhf", description="High-Confidence Safe RLHF with fused kernels.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hcrlhf {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = commands.add_parser("bench", help="run a kernel benchmark and print its table",
                                description="Run a benchmark; arguments after NAME go to it.", add_help=True)
    bench.add_argument("name", metavar="NAME", help="advantages | logprobs | guarantee | ... (see `hcrlhf bench list`)")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark (try --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "bench":
            benchmarks = available_benchmarks()
            if args.name == "list":
                print("\n".join(sorted(benchmarks)))
                return 0
            if args.name not in benchmarks:
                parser.error(f"unknown benchmark {args.name!r}; choose from {sorted(benchmarks)}")
            return int(importlib.import_module(benchmarks[args.name]).main(args.args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    except SystemExit:
        raise
    except Exception as exc:  # a clean message and exit code 1 for any other failure
        print(f"hcrlhf: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
