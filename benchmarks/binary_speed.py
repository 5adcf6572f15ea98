"""Whole-model speed of packed binary networks against torch fp32 and lowbit int8 (issue 10's speed rows).

Batch 1, one thread, one process; the three forms of each architecture are timed interleaved (round-robin
over the candidates, warm-up first), and the median over the rounds is reported with its ratio to the
binary model. The weights are random (speed does not depend on them): the binary model is prepared with
``binary_ste`` on a calibration batch, its binarizers switched on and its BatchNorms set by one training
-mode pass, then converted; the int8 model is lowbit's ``static`` quantization of the float model.

    .venv/bin/python benchmarks/binary_speed.py [--rounds 200] [--json out.json]

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import lowbit
import lowbit.binary as lb
from lowbit import files
from lowbit.compare import _cpu_name
from lowbit.kernels.native import set_num_threads
from lowbit.models import SmallCNN


class WideCNN(SmallCNN):
    """small_cnn with 4x the channels (128, 128, 256, 256) and a 1024-unit hidden layer."""

    widths = (128, 128, 256, 256)
    hidden = 1024


def _binary(model: nn.Module, calib: torch.Tensor) -> nn.Module:
    qm = lb.prepare(model, "binary_ste", calib=calib)
    lb.begin_all(qm, 1)
    qm.train()(calib)  # one training-mode pass: binarizers count it, BatchNorms take its statistics
    return lb.convert(qm.eval())


def _time(fns: dict[str, Callable[[], object]], rounds: int, warmup: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for f in fns.values():
                f()
        for _ in range(rounds):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    set_num_threads(1)
    rows = []
    for name, cls in (("small_cnn", SmallCNN), ("wide_cnn (4x small_cnn)", WideCNN)):
        torch.manual_seed(0)
        model = cls(1, 10, 28).eval()
        calib = torch.randn(64, 1, 28, 28)
        forms = {"torch fp32": model, "lowbit int8": lowbit.quantize(model, "static", calib=calib),
                 "lowbit binary": _binary(model, calib)}
        x = torch.randn(1, 1, 28, 28)
        med = _time({k: (lambda m=m, x=x: m(x)) for k, m in forms.items()}, args.rounds, args.warmup)
        b = med["lowbit binary"]
        for k, t in med.items():
            rows.append({"model": name, "form": k, "median_ms": 1e3 * t, "binary_speedup": t / b})
    print(f"CPU: {_cpu_name()}; batch 1, 1 thread, {args.rounds} interleaved rounds, median")
    print("| model | form | median ms | binary is x faster |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['form']} | {r['median_ms']:.3f} | {r['binary_speedup']:.2f} |")
    if args.json:
        files.write_text(args.json, json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
