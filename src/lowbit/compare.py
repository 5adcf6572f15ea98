"""``lowbit.compare``: quantize by several methods, measure each for real, choose by the objective L."""

from __future__ import annotations

import copy
import os
import platform
import shutil
import sys
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

import lowbit
from lowbit import files, io, kernels
from lowbit.evaluate import FloatIO, measure_latency, model_input
from lowbit.graph import prepare
from lowbit.methods import available_methods, get_method, quantize
from lowbit.methods.base import as_inputs, calibration_batches
from lowbit.report import format_table, write_report
from lowbit.select import Lambdas, choose, score

BASELINE = "float"


@dataclass
class CompareResult:
    rows: list[dict[str, Any]]
    chosen: str
    models: dict[str, nn.Module]
    report: dict[str, Path] = field(default_factory=dict)
    saved: Path | None = None

    def table(self) -> str:
        return format_table(self.rows, self.chosen)


def check_counts(**counts: int | None) -> None:
    """Each count (batch size, repeats, threads ...) is None or an int >= 1 (0 for ``warmup``)."""
    for name, v in counts.items():
        least = 0 if name == "warmup" else 1
        if v is None and name == "threads":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {v!r}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _op_counts(model: nn.Module, x: Any) -> dict[str, int]:
    """Operations per sample (lowbit.opcount): ``mul``, ``add``, ``max``, ``lookup``, ``shift``.

    ``x``: the benchmark input, one tensor or a tuple of tensors for a model with several inputs."""
    from lowbit.opcount import count_ops

    first = tuple(t[:1] for t in x) if isinstance(x, (tuple, list)) else x[:1]
    return count_ops(model, model_input(model, first))["total"]


def compare(
    model: nn.Module,
    calib: Any,
    eval_fn: Callable[[nn.Module], float],
    methods: Sequence[str] | None = None,
    lambdas: Lambdas | str = "1,1,1",
    example_input: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    configs: dict[str, dict[str, Any]] | None = None,
    batch_size: int = 1,
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = 1,
    report_dir: str | os.PathLike[str] | None = "report",
    save_chosen: str | os.PathLike[str] | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    train: Any = None,
    test: Any = None,
    models: dict[str, nn.Module] | None = None,
) -> CompareResult:
    """Quantize ``model`` by each method, measure file size, latency and accuracy, choose by L.

    eval_fn(model) -> accuracy in percent; it receives float-in/float-out models (full-integer ones
    are wrapped to quantize their input), so one function serves every method. The float model
    (BatchNorm folded, as lowbit prepares it) is the baseline row ``float``. Training-aware methods
    (``lsq``, ...) take part when named and given labelled ``train`` data (``test`` is only reported
    during their training); methods with an optional training stage (the gradual freezing of ``w46``,
    ``w4``, ``w8``) get ``train`` when named in ``methods``, and run without it otherwise. ``models``:
    candidates already quantized (name -> lowbit model, e.g. from ``lowbit qat``), measured and scored
    beside the methods.
    """
    lam = Lambdas.parse(lambdas) if isinstance(lambdas, str) else lambdas
    models = dict(models or {})
    # by default every post-training method; training-aware ones (they train for minutes) when named, and
    # methods with an optional training stage (w46's gradual freezing) get the training data when named
    named = methods is not None
    if methods is None:
        methods = [m for m in available_methods() if not get_method(m).needs_training_data]
    methods = list(methods)
    for name in methods:
        if get_method(name).needs_training_data and train is None:  # unknown names fail here too, before work
            raise ValueError(f"method {name!r} trains the model: pass labelled training data (train=)")
    clash = sorted(set(models) & (set(methods) | {BASELINE}))
    if clash:
        raise ValueError(f"candidate name(s) {clash} given both as a method and as a ready model")
    if len(set(methods)) != len(methods):
        raise ValueError("a method is listed twice")
    check_counts(batch_size=batch_size, repeats=repeats, threads=threads, warmup=warmup)
    if save_chosen is not None:  # outputs are checked before anything is measured
        files.check_output(save_chosen)
    if report_dir is not None:
        files.check_output(report_dir, folder=True)
    configs = configs or {}
    n_inputs = len(example_input) if isinstance(example_input, (tuple, list)) else 1
    batches = calibration_batches(calib, 10**9, 100, n_inputs)
    if example_input is None:
        if not batches:
            raise ValueError("the calibration set is empty")
        example_input = tuple(t[:1] for t in as_inputs(batches[0]))
    examples = as_inputs(tuple(example_input) if isinstance(example_input, list) else example_input)
    if batches:
        bench = tuple(torch.cat([as_inputs(b)[i] for b in batches])[:batch_size] for i in range(len(examples)))
    else:
        bench = tuple(e.expand(batch_size, *e.shape[1:]) for e in examples)
    if len(bench[0]) < batch_size:
        raise ValueError(f"need at least {batch_size} calibration samples for latency batches")
    example_input = examples[0] if len(examples) == 1 else examples
    bench_input = bench[0] if len(bench) == 1 else bench

    candidates: dict[str, nn.Module] = {}
    candidates[BASELINE] = _baseline(model, example_input, methods)
    took: dict[str, float] = {}  # seconds each method took to quantize (training included)
    bar = tqdm(methods, desc="quantizing", unit="method", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        cls = get_method(name)
        trains = cls.needs_training_data or (named and cls.accepts_training_data and train is not None)
        extra = {"train": train, "test": test} if trains else {}
        t0 = time.perf_counter()
        candidates[name] = quantize(model, name, calib=calib, config=configs.get(name),
                                    example_input=example_input, **extra)
        took[name] = time.perf_counter() - t0
    candidates.update(models)

    rows: list[dict[str, Any]] = []
    tmpdir = Path(tempfile.mkdtemp(prefix="lowbit-compare-"))
    try:
        paths = {name: io.save(m, tmpdir / f"{name}.lowbit") for name, m in candidates.items()}
        inputs = {name: model_input(m, bench_input) for name, m in candidates.items()}
        runs = {name: (lambda m=m, x=inputs[name]: m(*as_inputs(x))) for name, m in candidates.items()}
        if progress:
            print(f"timing {len(runs)} models: batch {batch_size}, {repeats} repeats, interleaved", flush=True)
        lat = measure_latency(runs, batch_size, warmup, repeats, threads)
        for name, m in tqdm(candidates.items(), desc="evaluating", unit="model", disable=not progress):
            with torch.inference_mode():
                acc = float(eval_fn(FloatIO(m).eval()))
            mm = getattr(m, "lowbit_meta", {})
            rows.append({
                "method": name,
                "size_bytes": paths[name].stat().st_size,
                "latency_ms": lat[name].median_ms,
                "accuracy": acc,
                "latency_p10_ms": lat[name].p10_ms,
                "latency_p90_ms": lat[name].p90_ms,
                "batch_size": batch_size,
                "threads": lat[name].threads,
                "float_layers": len(mm.get("float_layers", [])) + len(mm.get("float_ops", [])),
                "quantize_s": round(took[name], 2) if name in took else None,
                **_op_counts(m, bench_input),
            })
        rows = score(rows, BASELINE, lam)
        chosen = choose(rows)["method"]
        saved = None
        if save_chosen is not None:
            saved = files.write_bytes(save_chosen, paths[chosen].read_bytes())
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)

    report: dict[str, Path] = {}
    if report_dir is not None:
        info = {
            "lowbit_version": lowbit.__version__,
            "torch_version": torch.__version__,
            "cpu": _cpu_name(),
            "kernel_backend": kernels.backend_name(),
            "threads": rows[0]["threads"],
            "batch_size": batch_size,
            "repeats": repeats,
            "methods": methods,
            **(meta or {}),
        }
        report = write_report(rows, report_dir, chosen, lam, info)
    return CompareResult(rows, chosen, candidates, report, saved)


def _baseline(model: nn.Module, example: Any, methods: list[str]) -> nn.Module:
    """The float model as lowbit prepares it (BatchNorm folded; through torch.export when torch.fx cannot
    trace it), or, for a model no graph captures (control flow on tensor values), the model itself when
    every method compared needs no graph."""
    meta = {"method": BASELINE, "input": {"dtype": "float32"}, "output": {"dtype": "float32"}}
    try:
        base: nn.Module = prepare(model, example).gm
    except ValueError as e:
        graph_methods = [m for m in methods if get_method(m).needs_graph]
        if graph_methods:
            raise ValueError(f"{e} (methods that need one: {', '.join(graph_methods)})") from e
        base = copy.deepcopy(model).eval().requires_grad_(False)
        meta["graph"] = "module"
    base.lowbit_meta = meta
    base.lowbit_example = example
    return base


class _CallableModule(types.ModuleType):
    """``lowbit.compare`` is both this module and the function: once the module has been imported (it
    then shadows the lazily loaded function on the package), ``lowbit.compare(...)`` still calls it."""

    def __call__(self, *args: Any, **kwargs: Any) -> CompareResult:
        return compare(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
