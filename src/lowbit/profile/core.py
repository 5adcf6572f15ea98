"""``lowbit profile``: where a model's time goes, layer by layer, and how far each layer is from what this
CPU allows (see :mod:`lowbit.profile.roofline`).

The whole-model time is measured without any instrumentation; the per-layer times come from a timing
source (:mod:`lowbit.profile.timing`) in separate forwards interleaved with the plain ones, so a burst
of noise on a shared machine hits both alike. Every time is a median over the repeats.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .roofline import Ceilings, ceilings, layer_bound
from .timing import GLUE, ForwardTimes, HookTimer, LayerInfo, PlanTimer, plan_executor

__all__ = ["LayerProfile", "ModelProfile", "profile_model", "profile_file"]


@dataclass
class LayerProfile:
    name: str
    type: str
    shape: str  # kernel geometry, e.g. "3x3/2 64->128"
    path: str  # kernel path(s) the native calls took
    calls: int
    ms: float  # median time inside the layer per forward
    kernel_ms: float  # ... of which inside native kernels
    macs: int
    bytes: int  # inputs + outputs + the layer's own tensors
    gmacs: float | None  # MACs / ms
    bound_ms: float
    limit: str  # "compute" or "memory"
    x_bound: float  # ms / bound_ms (1.0 = at the roofline)


@dataclass
class ModelProfile:
    model: str
    input_shape: list[int]
    threads: int
    isa: str
    cpu: str
    repeats: int
    mode: str  # "plan" (timed by the model-level executor, step by step) or "node-by-node" (forward hooks)
    total_ms: float  # whole forward, no instrumentation (median)
    parts_ms: float  # sum of the layers' medians + the glue median (instrumented forwards)
    kernel_ms: float  # inside native kernels (all layers and the glue)
    layer_overhead_ms: float  # inside layers but outside kernels (Python wrappers, torch ops in layers)
    glue_ms: float  # between layers (graph functions, interpreter, profiler hooks)
    glue_paths: list[str]
    peak_gmacs: float
    copy_gbs: float
    load: float  # CPU share of other processes while timing (nan if unknown)
    layers: list[LayerProfile] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["load"] = None if math.isnan(self.load) else self.load
        return d


def _unwrap(m: nn.Module) -> nn.Module:
    from lowbit.graph import Fused

    return m.layer if isinstance(m, Fused) else m


def _weight(m: nn.Module) -> torch.Tensor | None:
    for attr in ("weight_q", "cpos", "weight"):
        w = getattr(m, attr, None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2:
            return w
    return None


def _shape(m: nn.Module | None, w: torch.Tensor | None) -> str:
    if m is None or w is None:
        return ""
    geo = getattr(m, "geometry", None) or {}
    stride = geo.get("stride", getattr(m, "stride", None))
    groups = int(geo.get("groups", getattr(m, "groups", 1)) or 1)
    if w.dim() == 4:
        s = stride[0] if isinstance(stride, (tuple, list)) else (stride or 1)
        text = f"{w.shape[2]}x{w.shape[3]}/{s} {w.shape[1] * groups}->{w.shape[0]}"
        return text + (" dw" if groups > 1 and groups == w.shape[0] else (f" g{groups}" if groups > 1 else ""))
    return f"{w.shape[1]}->{w.shape[0]}"


def _tensor_bytes(m: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(m.buffers()) + list(m.parameters()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _layer_row(info: LayerInfo, m: nn.Module | None, ms: float, kernel_ms: float, c: Ceilings) -> LayerProfile:
    inner = _unwrap(m) if m is not None else None
    w = _weight(inner) if inner is not None else None
    macs = info.out_numel * math.prod(w.shape[1:]) if w is not None else 0
    nbytes = info.in_bytes + info.out_bytes + (_tensor_bytes(m) if m is not None else 0)
    int8_macs = any(k in p for p in info.paths for k in ("gemm", "conv", "depthwise", "4.6-bit"))
    bound, limit = layer_bound(macs, nbytes, c, int8_macs)
    if bound <= 0 or ms <= 0:  # nothing moved, or no time of its own (fused into another step)
        limit = "-"
    path = ", ".join(info.paths) if info.paths else "torch"
    return LayerProfile(info.name, info.type, _shape(inner, w), path, info.calls, ms, kernel_ms, macs, nbytes,
                        macs / (ms * 1e6) if macs and ms > 0 else None, bound, limit,
                        ms / bound if bound > 0 and ms > 0 else math.inf)


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def profile_model(model: nn.Module, x: Any, *, threads: int = 1, repeats: int = 20, warmup: int = 3,
                  name: str = "model") -> ModelProfile:
    """Profile ``model`` on the batch ``x`` (a tensor, or a tuple for several inputs) with ``threads``
    threads: ``warmup`` untimed forwards, then ``repeats`` rounds of one plain and one instrumented
    forward. The ceilings of :func:`lowbit.profile.roofline.ceilings` are measured at the first call.

    A model that runs as a native plan (:mod:`lowbit.runtime`) is timed step by step by the plan itself
    (``mode == "plan"``); any other model by forward hooks on its layers (``mode == "node-by-node"``)."""
    from lowbit.bench.models import _Load, cpu_description
    from lowbit.evaluate import torch_threads

    if repeats < 1 or warmup < 0 or threads < 1:
        raise ValueError("repeats and threads must be >= 1 and warmup >= 0")
    xs = x if isinstance(x, tuple) else (x,)
    model.eval()
    timer = HookTimer(model)
    c = ceilings(threads)
    plain: list[float] = []
    times: list[ForwardTimes] = []
    load = _Load()
    with torch_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            model(*xs)
        with timer.installed():  # node by node (hooks turn a plan off): shapes and kernel paths per layer
            timer.forward(lambda: model(*xs), record_shapes=True)
        ex = plan_executor(model, xs[0]) if len(xs) == 1 else None
        plan = PlanTimer(ex, xs[0]) if ex is not None else None
        if plan is not None:
            plan.forward(record_shapes=True)
        load.start()
        for i in range(repeats):
            if i % 2:  # which one goes first alternates: periodic preemption hits both alike
                times.append(plan.forward() if plan else _instrumented(timer, model, xs))
            t0 = time.perf_counter()
            model(*xs)
            plain.append(time.perf_counter() - t0)
            if not i % 2:
                times.append(plan.forward() if plan else _instrumented(timer, model, xs))
        load.stop()
        isa = _isa()
    names = [n for n in timer.layers if timer.info[n].calls]
    if plan is not None:  # steps that are not modules of the graph (functions, the output copy)
        names += [n for n in plan.paths if n not in timer.info]
    rows = []
    for n in names:
        info = timer.info.get(n) or LayerInfo(n, "plan step", calls=1)
        if plan is not None:
            info.paths = [plan.paths[n]] if n in plan.paths else (
                [f"fused into {plan.fused_into[n]}"] if n in plan.fused_into else ["not in the plan"])
        ms = _median([t.layer_s.get(n, 0.0) for t in times]) * 1e3
        kms = _median([t.kernel_s.get(n, 0.0) for t in times]) * 1e3
        rows.append(_layer_row(info, timer.layers.get(n), ms, kms, c))
    layers_ms = sum(r.ms for r in rows)
    kernel_ms = sum(r.kernel_ms for r in rows) + _median([t.kernel_s.get(GLUE, 0.0) for t in times]) * 1e3
    glue_ms = _median([t.glue_s for t in times]) * 1e3
    shape = list(xs[0].shape) if isinstance(xs[0], torch.Tensor) else []
    return ModelProfile(name, shape, threads, isa, cpu_description(), repeats, "plan" if plan else "node-by-node",
                        _median(plain) * 1e3, layers_ms + glue_ms, kernel_ms,
                        layers_ms - sum(r.kernel_ms for r in rows), glue_ms, timer.glue_paths, c.peak_gmacs,
                        c.copy_gbs, load.mean, rows)


def _instrumented(timer: HookTimer, model: nn.Module, xs: tuple[Any, ...]) -> ForwardTimes:
    with timer.installed():
        return timer.forward(lambda: model(*xs))


def _isa() -> str:
    try:
        from lowbit.kernels import native

        return native.int8_isa() if native.available() else "torch"
    except ImportError:  # pragma: no cover - depends on the build
        return "torch"


def load_for_profile(path: str | os.PathLike[str], input_shape: tuple[int, ...] | str | None = None
                     ) -> tuple[nn.Module, Any]:
    """The model of a lowbit file and a batch-1 input for it, every problem reported before any timing:
    a missing file, a file that is not a lowbit model (or a weights-only one), an unknown input shape,
    an input shape the model does not accept."""
    import lowbit
    from lowbit.evaluate import model_input
    from lowbit.io import read_header
    from lowbit.opcount import _input_shape

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    header = read_header(p)  # ModelFileError: not a lowbit file, corrupt, ...
    if header.get("kind", "graph") == "weights":
        raise ValueError(f"{path} is a weights-only file: it needs the float model's code to run; profile that "
                         "model in Python with lowbit.profile.profile_model(lowbit.load(path, model=...), x)")
    text = ",".join(str(v) for v in input_shape) if isinstance(input_shape, tuple) else input_shape
    shape = _input_shape(header.get("meta") or {}, text)
    model = lowbit.load(p)
    g = torch.Generator().manual_seed(0)
    x = model_input(model, torch.rand((1, *shape), generator=g))
    try:
        with torch.inference_mode():
            model(*(x if isinstance(x, tuple) else (x,)))
    except Exception as e:
        raise ValueError(f"{path}: the model does not accept an input of shape {list(shape)} (C,H,W with batch 1): "
                         f"{type(e).__name__}: {str(e)[:300]}") from None
    return model, x


def profile_file(path: str | os.PathLike[str], *, input_shape: tuple[int, ...] | str | None = None,
                 threads: int = 1, repeats: int = 20, warmup: int = 3) -> ModelProfile:
    """:func:`profile_model` of a saved lowbit model (input shape from the file unless given)."""
    model, x = load_for_profile(path, input_shape)
    return profile_model(model, x, threads=threads, repeats=repeats, warmup=warmup, name=Path(path).name)
