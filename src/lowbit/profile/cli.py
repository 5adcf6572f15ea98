"""``lowbit profile FILE``: per-layer time, GMAC/s, kernel vs glue, kernel path and roofline bound."""

from __future__ import annotations

import argparse
import json

from lowbit.cliargs import add_threads, positive_int


def cmd_profile(args: argparse.Namespace) -> int:
    from lowbit.files import check_output, write_text

    from .core import load_for_profile, profile_model
    from .output import format_profile, write_profile_report

    inputs = (args.file,)
    for out, folder in ((args.json, False), (args.report, True)):
        if out:
            check_output(out, inputs=inputs, folder=folder)  # a bad output path fails before the timing
    model, x = load_for_profile(args.file, args.input_shape)
    from pathlib import Path

    p = profile_model(model, x, threads=args.threads, repeats=args.repeats, warmup=args.warmup,
                      name=Path(args.file).name)
    print(format_profile(p))
    if args.json:
        write_text(args.json, json.dumps(p.to_json(), indent=1), inputs=inputs)
        print(f"\nJSON: {args.json}")
    if args.report:
        write_profile_report(p, args.report, inputs=inputs)
        print(f"report: {args.report}/profile.md, profile.png")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("profile", help="why isn't it faster: time per layer, kernel path and roofline bound")
    sp.add_argument("file", help="a lowbit model file (lowbit.save)")
    add_threads(sp, what="for lowbit's kernels and torch")
    sp.add_argument("--input-shape", default=None,
                    help="C,H,W of one input sample (default: the shape the file records)")
    sp.add_argument("--repeats", type=positive_int, default=20, help="timed forwards (default 20; median)")
    sp.add_argument("--warmup", type=int, default=3, help="untimed forwards first (default 3)")
    sp.add_argument("--json", default=None, help="also write the profile as JSON to this file")
    sp.add_argument("--report", default=None, help="write profile.md, profile.png and profile.json to this folder")
    sp.set_defaults(fn=cmd_profile)
