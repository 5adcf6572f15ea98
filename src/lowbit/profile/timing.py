"""Per-layer timings of a model's forward: how long each layer ran, how much of that in native kernels,
and which kernel path the native calls took.

:class:`HookTimer` is the timing source for a model run node by node (a :class:`~lowbit.modelfile.LoadedModel`,
a torch.fx GraphModule or any ``nn.Module``): forward pre/post hooks on the layers the graph calls, and
timing wrappers around the kernel entry points of ``lowbit._native`` (looked up by attribute at every
call, so the wrappers see every call the kernels make). A timing source has one job: one forward under
:meth:`forward` returns a :class:`ForwardTimes`. A model-level executor that runs a plan of native calls
can supply its own per-step times through the same :class:`ForwardTimes` record.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

__all__ = ["ForwardTimes", "HookTimer", "LayerInfo", "KERNEL_ENTRY_POINTS", "PlanTimer", "plan_executor",
           "timed_layers"]

#: The native entry points that do a layer's arithmetic, with the family they belong to.
KERNEL_ENTRY_POINTS = {
    "int8_conv2d": "int8", "int8_gemm": "int8", "qops_add": "add", "qops_pool2d": "pool",
    "binary_conv2d": "binary", "binary_linear": "binary", "bm_conv2d": "BM", "bm_linear": "BM",
    "w46_conv2d": "4.6-bit", "w46_linear": "4.6-bit",
}
GLUE = "(glue)"  # native calls made outside any layer (graph functions)


@dataclass
class LayerInfo:
    """What a layer computed on its first timed call: the shapes it saw and the kernel paths it took."""

    name: str
    type: str
    calls: int = 0
    in_bytes: int = 0
    out_bytes: int = 0
    out_numel: int = 0
    paths: list[str] = field(default_factory=list)


@dataclass
class ForwardTimes:
    """One forward: wall time; per layer the time inside it and inside native kernels; and the glue, the
    time outside every layer (graph functions, the interpreter, the hooks), clocked on its own from the
    end of one layer to the start of the next (seconds)."""

    total_s: float
    layer_s: dict[str, float]
    kernel_s: dict[str, float]
    glue_s: float


def timed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The modules one forward calls as graph steps: a loaded file's called modules, an fx graph's
    call_module targets, else the leaf modules."""
    called = getattr(model, "called_modules", None)
    if isinstance(called, dict) and called:
        return dict(called)
    if isinstance(model, fx.GraphModule):
        return {str(n.target): model.get_submodule(str(n.target)) for n in model.graph.nodes if n.op == "call_module"}
    return {name: m for name, m in model.named_modules() if name and not list(m.children())}


def _nbytes(v: Any) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (tuple, list)):
        return sum(_nbytes(t) for t in v)
    return 0


def _kernel_path(entry: str, native: Any) -> str:
    """The path the call just made took, as dispatch chose it (read back from the native side)."""
    family = KERNEL_ENTRY_POINTS[entry]
    if family == "int8":
        if not hasattr(native, "last_kernel_path"):  # a build from before the drivers recorded it
            return f"{native.int8_isa()} int8"
        isa, kind, fused_add = native.last_kernel_path()
        return f"{isa} {kind}{'+add' if fused_add else ''}"
    if family in ("add", "pool"):
        return f"native {family}"
    query = {"binary": "binary_path", "BM": "bm_path", "4.6-bit": "w46_path"}[family]
    return f"{getattr(native, query)()} {family}"


class HookTimer:
    """Times the layers of ``model`` with forward hooks while installed (``with timer.installed(): ...``)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = timed_layers(model)
        self.info = {name: LayerInfo(name, type(m).__name__) for name, m in self.layers.items()}
        self._stack: list[tuple[str, float]] = []
        self._gap = [0.0, 0.0]  # [end of the last outermost layer (or the forward's start), glue so far]
        self._layer_s: dict[str, float] = {}
        self._kernel_s: dict[str, float] = {}
        self._record_shapes = True

    # -------------------------------------------------------------- hooks
    def _pre(self, name: str) -> Callable[..., None]:
        stack, gap = self._stack, self._gap

        def pre(module: nn.Module, args: Any) -> None:
            t = time.perf_counter()
            if not stack:
                gap[1] += t - gap[0]
            stack.append((name, t))

        return pre

    def _post(self, name: str) -> Callable[..., None]:
        stack, layer_s, info, gap = self._stack, self._layer_s, self.info[name], self._gap

        def post(module: nn.Module, args: Any, out: Any) -> None:
            t = time.perf_counter()
            _, t0 = stack.pop()
            if not stack:
                gap[0] = t
            layer_s[name] = layer_s.get(name, 0.0) + (t - t0)
            if self._record_shapes:
                info.calls += 1
                info.in_bytes += _nbytes(args)
                info.out_bytes += _nbytes(out)
                info.out_numel += out.numel() if isinstance(out, torch.Tensor) else 0

        return post

    def _wrap(self, native: Any, entry: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        stack, kernel_s = self._stack, self._kernel_s

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            dt = time.perf_counter() - t0
            owner = stack[-1][0] if stack else GLUE
            kernel_s[owner] = kernel_s.get(owner, 0.0) + dt
            if self._record_shapes:
                path = _kernel_path(entry, native)
                paths = self.info[owner].paths if owner in self.info else self._glue_paths
                if path not in paths:
                    paths.append(path)
            return out

        return timed

    @contextmanager
    def installed(self) -> Iterator[HookTimer]:
        """Hooks on the layers and timing wrappers on the native entry points, removed on exit."""
        from lowbit import _native

        self._glue_paths: list[str] = []
        handles = []
        saved: dict[str, Any] = {}
        try:
            for name, m in self.layers.items():
                handles.append(m.register_forward_pre_hook(self._pre(name)))
                handles.append(m.register_forward_hook(self._post(name), always_call=True))
            for entry in KERNEL_ENTRY_POINTS:
                fn = getattr(_native, entry, None)
                if fn is not None:
                    saved[entry] = fn
                    setattr(_native, entry, self._wrap(_native, entry, fn))
            yield self
        finally:
            for entry, fn in saved.items():
                setattr(_native, entry, fn)
            for h in handles:
                h.remove()

    def forward(self, run: Callable[[], Any], record_shapes: bool = False) -> ForwardTimes:
        """Run one forward (``run()``) and return its times; ``record_shapes`` fills :attr:`info` (once)."""
        self._layer_s.clear()
        self._kernel_s.clear()
        self._stack.clear()
        self._record_shapes = record_shapes
        t0 = time.perf_counter()
        self._gap[:] = [t0, 0.0]
        run()
        t1 = time.perf_counter()
        return ForwardTimes(t1 - t0, dict(self._layer_s), dict(self._kernel_s), self._gap[1] + (t1 - self._gap[0]))

    @property
    def glue_paths(self) -> list[str]:
        return list(getattr(self, "_glue_paths", []))


def plan_executor(model: nn.Module, x: Any) -> Any:
    """The model-level executor (:mod:`lowbit.runtime`) when ``model(x)`` runs as a native plan, else None."""
    try:
        from lowbit.runtime import executor_of
    except ImportError:
        return None
    ex = executor_of(model)
    if ex is None or not isinstance(x, torch.Tensor) or not hasattr(ex, "run"):
        return None
    return ex if ex.plan_for((x,), {}) is not None else None


class PlanTimer:
    """Per-step times of a model that runs as a plan of native calls (:mod:`lowbit.runtime`): the executor
    clocks each step inside its native runner (``Executor.run(x, timings)``). A step is one kernel call,
    so all of its time is kernel time; the glue is what the forward spends outside the steps (the call
    into the plan, the input and output copies). A graph node the plan folded into another step (a
    residual add in a convolution's epilogue) has no time of its own: :attr:`fused_into` names its step."""

    def __init__(self, executor: Any, x: torch.Tensor) -> None:
        self.executor, self.x = executor, x
        self.paths: dict[str, str] = {}
        self.fused_into: dict[str, str] = {}

    def forward(self, record_shapes: bool = False) -> ForwardTimes:
        timings: dict[str, dict[str, Any]] = {}
        t0 = time.perf_counter()
        self.executor.run(self.x, timings)
        total = time.perf_counter() - t0
        if record_shapes:
            for name, e in timings.items():
                self.paths[name] = str(e.get("path", ""))
                for node in e.get("fused", ()):
                    self.fused_into[str(node)] = name
        steps = {name: float(e["seconds"]) for name, e in timings.items()}
        return ForwardTimes(total, steps, dict(steps), total - sum(steps.values()))
