"""``lowbit bench ...``: the benchmark subcommands. A new benchmark adds its parser in :func:`add_commands`."""

from __future__ import annotations

import argparse

from lowbit.cliargs import add_threads, positive_int


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    from lowbit.bench.kernels import run

    run(threads=args.threads, json_path=args.json, repeats=args.repeats, quick=args.quick,
        paths=_names(args.paths), impls=_names(args.impls))
    return 0


def _names(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _ints(text: str) -> list[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be integers >= 1, got {text!r}")
    return vals


def cmd_bench_models(args: argparse.Namespace) -> int:
    from lowbit.bench.models import run

    run(models=_names(args.models), impls=_names(args.impls), threads=args.threads, repeats=args.repeats,
        rounds=args.rounds, settle_ms=args.settle_ms, quiet_wait_s=args.quiet_wait, json_path=args.json,
        quick=args.quick)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("bench", help="benchmarks")
    bsub = sp.add_subparsers(dest="what", required=True)
    bp = bsub.add_parser("kernels", help="GEMM/conv kernels against torch fp32, torch int8 and peers")
    add_threads(bp)
    bp.add_argument("--json", default=None, help="write the records to this JSON file")
    bp.add_argument("--repeats", type=positive_int, default=20, help="timed repeats (default 20)")
    bp.add_argument("--quick", action="store_true", help="few repeats, for a smoke test")
    bp.add_argument("--paths", default=None, help="comma-separated lowbit dispatch paths to measure (default: all "
                    "this CPU runs, at most LOWBIT_ISA)")
    bp.add_argument("--impls", default=None, help="comma-separated implementations to measure (default: all), "
                    "e.g. lowbit_int8,lowbit_bm8,lowbit_bm16")
    bp.set_defaults(fn=cmd_bench_kernels)

    from lowbit.bench.models import DEFAULT_IMPLS, IMPLS, MODELS

    mp = bsub.add_parser("models", help="whole networks (batch 1) against torch fp32/int8 and ONNX Runtime")
    mp.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(MODELS)} (default all)")
    mp.add_argument("--impls", default=None,
                    help=f"comma-separated subset of {','.join(IMPLS)} (default {','.join(DEFAULT_IMPLS)})")
    mp.add_argument("--threads", type=_ints, default=[1], help="thread count(s), e.g. 1,2 (default 1)")
    mp.add_argument("--repeats", type=int, default=3, help="repeats of the interleaved rounds (default 3)")
    mp.add_argument("--rounds", type=int, default=None, help="rounds per repeat (default: as many as fit ~2 s)")
    mp.add_argument("--settle-ms", type=float, default=2.0,
                    help="untimed pause after each call, for spinning thread pools to sleep (default 2)")
    mp.add_argument("--quiet-wait", type=float, default=30.0,
                    help="seconds to wait, before each repeat, for other processes to use < 10%% CPU (default 30)")
    mp.add_argument("--json", default=None, help="write the records to this JSON file")
    mp.add_argument("--quick", action="store_true", help="resnet20 only, few rounds: a smoke test")
    mp.set_defaults(fn=cmd_bench_models)
