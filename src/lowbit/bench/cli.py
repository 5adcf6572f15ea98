"""``lowbit bench ...``: the benchmark subcommands. A new benchmark adds its parser in :func:`add_commands`."""

from __future__ import annotations

import argparse

from lowbit.cliargs import add_threads, positive_int


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    from lowbit.bench.kernels import run

    run(threads=args.threads, json_path=args.json, repeats=args.repeats, quick=args.quick)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("bench", help="benchmarks")
    bsub = sp.add_subparsers(dest="what", required=True)
    bp = bsub.add_parser("kernels", help="GEMM/conv kernels against torch fp32, torch int8 and peers")
    add_threads(bp)
    bp.add_argument("--json", default=None, help="write the records to this JSON file")
    bp.add_argument("--repeats", type=positive_int, default=20, help="timed repeats (default 20)")
    bp.add_argument("--quick", action="store_true", help="few repeats, for a smoke test")
    bp.set_defaults(fn=cmd_bench_kernels)
