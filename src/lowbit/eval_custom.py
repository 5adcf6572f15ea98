"""``lowbit eval`` for any model: your own metric, latency on inputs like the model's recorded example.

``--metric package.module:function`` is called with the loaded model and returns a number or a dict of
numbers (e.g. the cosine similarity of sentence embeddings to the float model, or a task metric);
``--model package.module:function`` builds the float model a weights-only file is loaded into.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn


def resolve(spec: str, what: str) -> Any:
    """The object ``package.module:attr`` names (the current folder is on the import path)."""
    from lowbit.graph.load import _cwd_on_path

    mod, _, attr = spec.partition(":")
    if not mod or not attr:
        raise ValueError(f"--{what} {spec!r} must look like package.module:function")
    _cwd_on_path()
    try:
        obj: Any = importlib.import_module(mod)
    except Exception as e:
        raise ValueError(f"--{what} {spec!r}: cannot import {mod!r}: {e}") from e
    for atom in attr.split("."):
        if not hasattr(obj, atom):
            raise ValueError(f"--{what} {spec!r}: {mod!r} has no attribute {attr!r}")
        obj = getattr(obj, atom)
    if not callable(obj):
        raise ValueError(f"--{what} {spec!r} is not callable")
    return obj


def load_file(args: argparse.Namespace) -> nn.Module:
    import lowbit

    model = None
    if getattr(args, "model", None):
        model = resolve(args.model, "model")()
        if not isinstance(model, nn.Module):
            raise ValueError(f"--model {args.model} returned a {type(model).__name__}, not an nn.Module")
    return lowbit.load(args.file, verify=not args.no_verify, model=model)


def latency_inputs(model: nn.Module, batch: int) -> tuple[torch.Tensor, ...]:
    from lowbit.evaluate import model_input
    from lowbit.export.onnx import example_from_meta

    ex = example_from_meta(getattr(model, "lowbit_meta", {}))
    if ex is None:
        raise ValueError("the file records no example input to time the model on; evaluate it with --data")
    ex = tuple(x.expand(batch, *x.shape[1:]).contiguous() if x.dim() and x.shape[0] == 1 else x for x in ex)
    return model_input(model, ex, as_tuple=True)


def cmd_eval_metric(args: argparse.Namespace, model: nn.Module) -> int:
    from lowbit.evaluate import measure_latency

    fn = resolve(args.metric, "metric")
    with torch.inference_mode():
        score = fn(model)
    scores = score if isinstance(score, dict) else {args.metric.rpartition(":")[2]: score}
    xs = latency_inputs(model, args.batch_size)
    lat = measure_latency({"model": lambda: model(*xs)}, args.batch_size, repeats=args.repeats,
                          threads=args.threads)["model"]
    shown = ", ".join(f"{k} {float(v):.6g}" for k, v in scores.items())
    print(f"{args.file}: method {model.lowbit_meta.get('method')}, {Path(args.file).stat().st_size:,} bytes, {shown}, "
          f"latency {lat.median_ms:.3f} ms (median of {lat.repeats}, batch {lat.batch_size}, inputs like the "
          f"recorded example, {lat.threads} threads)")
    return 0
