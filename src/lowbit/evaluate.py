"""Measure a model for real: accuracy, latency (interleaved, median of repeats), file size."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.formats.affine import QFormat, dequantize, quantize

_IO_FORMATS = {"uint8": QFormat(8, signed=False, symmetric=False), "int8": QFormat(8, signed=True, symmetric=False)}


def model_input(model: nn.Module, x: Any, as_tuple: bool = False) -> Any:
    """A float batch in the form the model takes (input codes for a full-integer model).

    ``x``: one tensor, or a tuple of tensors for a model with several inputs (``meta["input"]`` is then
    a list with one format per input). Returns the same structure, or always a tuple with ``as_tuple``.
    """
    spec = getattr(model, "lowbit_meta", {}).get("input", {"dtype": "float32"})
    xs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    specs = spec if isinstance(spec, list) else [spec] * len(xs)
    if len(specs) != len(xs):
        raise ValueError(f"the model takes {len(specs)} inputs, got {len(xs)}")
    out = tuple(t if s["dtype"] == "float32" else quantize(t, s["scale"], s["zero_point"], _IO_FORMATS[s["dtype"]])
                for t, s in zip(xs, specs, strict=True))
    return out if as_tuple or isinstance(x, (tuple, list)) else out[0]


def model_output(model: nn.Module, y: torch.Tensor) -> torch.Tensor:
    spec = getattr(model, "lowbit_meta", {}).get("output", {"dtype": "float32"})
    if spec["dtype"] == "float32":
        return y
    return dequantize(y, spec["scale"], spec["zero_point"])


class FloatIO(nn.Module):
    """Float in, float out view of any lowbit model (quantizes the input / dequantizes the output of a
    full-integer model), so one evaluation function serves every method."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        while isinstance(model, FloatIO):  # wrapping twice must not quantize twice
            model = model.model
        self.model = model
        meta = getattr(model, "lowbit_meta", {})
        self.lowbit_meta = {**meta, "input": {"dtype": "float32"}, "output": {"dtype": "float32"}}

    def forward(self, *xs: torch.Tensor) -> Any:
        return model_output(self.model, self.model(*model_input(self.model, xs, as_tuple=True)))


def accuracy(model: nn.Module, dataset: Any, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent over a dataset of (x, y) (TensorDataset or any indexable)."""
    m = FloatIO(model).eval()
    correct = total = 0
    with torch.no_grad():
        if isinstance(dataset, torch.utils.data.TensorDataset):
            xs, ys = dataset.tensors[0], dataset.tensors[1]
            for i in range(0, len(xs), batch_size):
                pred = m(xs[i : i + batch_size]).argmax(-1)
                correct += int((pred == ys[i : i + batch_size]).sum())
                total += len(pred)
        else:
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
            for x, y in loader:
                pred = m(x).argmax(-1)
                correct += int((pred == y).sum())
                total += len(pred)
    if total == 0:
        raise ValueError("the evaluation set is empty")
    return 100.0 * correct / total


@dataclass
class Latency:
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    batch_size: int
    threads: int

    @property
    def per_sample_ms(self) -> float:
        return self.median_ms / self.batch_size


def _native_kernels() -> Any:
    try:
        from lowbit.kernels import native
    except ImportError:  # pragma: no cover - the wrappers ship with the package
        return None
    return native if native.available() else None


@contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` threads for torch and for lowbit's kernels (None: leave both as they are);
    both counts are restored on exit, also after an exception."""
    old = torch.get_num_threads()
    nat = _native_kernels() if n else None
    old_nat = nat.num_threads() if nat is not None else None
    if n:
        torch.set_num_threads(n)
        if nat is not None:
            nat.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)
        if nat is not None and old_nat is not None:
            nat.set_num_threads(old_nat)


def measure_latency(
    runs: dict[str, Callable[[], Any]],
    batch_size: int,
    warmup: int = 3,
    repeats: int = 20,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Latency]:
    """Time each callable ``repeats`` times after ``warmup`` calls, interleaved round-robin so that a
    burst of noise on a shared machine hits every candidate alike; report the median. Each round runs the
    candidates in its own order (a seeded shuffle), so every candidate follows every other about equally
    often: in a fixed order (or a rotation of it, which keeps the same neighbours) the candidate that runs
    right after a slow one (a float model evicting the caches) pays for it in every round (measured: +15
    to +20 µs on a 40 µs model, whichever model came first)."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch_threads(threads) as nt, torch.inference_mode():
        for _ in range(warmup):
            for fn in runs.values():
                fn()
        items = list(runs.items())
        order = random.Random(0)
        for _ in range(repeats):
            order.shuffle(items)
            for name, fn in items:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        ts.sort()
        out[name] = Latency(statistics.median(ts), ts[len(ts) // 10], ts[(9 * len(ts)) // 10], repeats,
                            batch_size, nt)
    return out
