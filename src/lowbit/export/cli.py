"""``lowbit export FILE.lowbit --onnx OUT.onnx``: a saved model as an ONNX QDQ graph."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from lowbit.cliargs import add_threads


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: give the sizes as integers, e.g. 1,3,32,32") from None
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: every size must be >= 1")
    return dims


def cmd_export(args: argparse.Namespace) -> int:
    import lowbit

    from .onnx import compare_onnx, example_from_meta, export_onnx

    model = lowbit.load(args.file, verify=not args.no_verify)
    example: Any = None
    if args.shape:
        specs = model.lowbit_meta.get("input", {"dtype": "float32"})
        specs = specs if isinstance(specs, list) else [specs] * len(args.shape)
        if len(specs) != len(args.shape):
            raise ValueError(f"the model takes {len(specs)} inputs; give --shape once per input")
        gen = torch.Generator().manual_seed(0)
        example = tuple(torch.randn(s, generator=gen) if sp["dtype"] == "float32" else
                        torch.randint(0, 256, s, generator=gen).to(getattr(torch, sp["dtype"]))
                        for s, sp in zip(args.shape, specs, strict=True))
        example = tuple(e if sp["dtype"] != "int8" else (e.to(torch.int16) - 128).to(torch.int8)
                        for e, sp in zip(example, specs, strict=True))
    path = export_onnx(model, args.onnx, example_input=example, inputs=(args.file,))
    print(f"{args.file} -> {path} ({path.stat().st_size:,} bytes, ONNX opset 18, QDQ)")
    check = example if example is not None else example_from_meta(model.lowbit_meta)
    if check is not None:
        try:
            r = compare_onnx(model, path, check, threads=args.threads or 1)
        except ImportError:
            print("onnxruntime is not installed: the export was not checked")
            return 0
        print(f"checked in ONNX Runtime against lowbit on one example: max |difference| {r['max_abs']:.4g} "
              f"(outputs up to {r['scale']:.4g})")
    return 0


def add_commands(sub: Any) -> None:
    sp = sub.add_parser("export", help="write a saved lowbit model in another format (ONNX QDQ)")
    sp.add_argument("file", help="a lowbit model file")
    sp.add_argument("--onnx", required=True, metavar="OUT.onnx", help="write an ONNX QDQ graph here")
    sp.add_argument("--shape", type=_shape, action="append", metavar="N,C,H,W",
                    help="input sizes for the export (once per input; default: the model's recorded example)")
    add_threads(sp, what="for the ONNX Runtime check")
    sp.add_argument("--no-verify", action="store_true", help="skip the file's SHA-256 check")
    sp.set_defaults(fn=cmd_export)
