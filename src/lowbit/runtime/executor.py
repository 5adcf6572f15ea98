"""The model-level executor: a converted integer model runs as a native plan behind ``model(x)``.

:func:`install` (done by ``lowbit.quantize`` and ``lowbit.load``) gives the model an :class:`Executor`
that its ``forward`` calls. On each call with one CPU tensor it looks up the plan for the input's shape and
dtype (compiling it on the first call with that shape: :func:`lowbit.runtime.plan.build_plan`, through
:func:`lowbit.runtime.w46_choice.compile_plan`) and runs
it; anything it cannot plan runs the model's own node-by-node forward, unchanged, and
:func:`plan_status` says why. A module of the graph with forward hooks (a profiler, an activation
recorder) also makes the call run node by node, so that its hooks see the module calls they expect.
The results are the same integers either way (tests/test_plan.py).

Off switches, for debugging and comparisons: ``set_plan(model, False)`` and the environment variable
``LOWBIT_PLAN=0`` (``1`` or unset: on). ``LOWBIT_KERNELS=torch`` also turns it off (the plan runs
lowbit's native kernels only).
"""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from typing import Any

import torch
from torch import fx, nn

from lowbit import kernels
from lowbit.kernels import native as nat
from lowbit.kernels import w46_plan

from .plan import CompiledPlan, Unplannable
from .w46_choice import compile_plan

__all__ = ["Executor", "install", "plan_status", "set_plan", "executor_of", "plan_enabled_by_env"]

MAX_PLANS = 4  # input shapes kept compiled per model (least recently used dropped)


def plan_enabled_by_env() -> bool:
    """``LOWBIT_PLAN``: unset, ``1``: plans on; ``0``: off; anything else is an error (never ignored)."""
    v = os.environ.get("LOWBIT_PLAN", "").strip()
    if v in ("", "1"):
        return True
    if v == "0":
        return False
    raise ValueError(f"LOWBIT_PLAN={os.environ['LOWBIT_PLAN']!r}: use 0 (node-by-node) or 1 (plans, the default)")


def _native_ok() -> str | None:
    if not kernels._use_native():
        return "lowbit's native kernels are off (not built, or LOWBIT_KERNELS=torch / kernels.set_backend('torch'))"
    return None


class Executor:
    """``model.forward`` of a converted model: the plan for the input's shape when there is one, else the
    model's own forward. ``enabled``: the per-model switch (:func:`set_plan`)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.enabled = True
        self._plans: OrderedDict[tuple[Any, ...], CompiledPlan | str] = OrderedDict()
        self._lock = threading.Lock()
        self.last_reason: str | None = None

    # copies (copy.deepcopy, pickle) keep the switch, never the native plans
    def __getstate__(self) -> dict[str, Any]:
        return {"model": self.model, "enabled": self.enabled}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["model"])  # type: ignore[misc]
        self.enabled = state["enabled"]

    def fallback(self, *args: Any, **kwargs: Any) -> Any:
        """The model's node-by-node forward."""
        return _graph_forward(self.model)(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        plan = self.plan_for(args, kwargs)
        if plan is None or not self._lock.acquire(blocking=False):  # busy on another thread: run the graph
            return self.fallback(*args, **kwargs)
        try:
            return plan.run(_as_input(args[0]))
        finally:
            self._lock.release()

    def run(self, x: torch.Tensor, timings: dict[str, dict[str, Any]] | None = None) -> Any:
        """``model(x)``; with ``timings`` (a dict) and a plan for ``x``, adds each step's wall time to
        ``timings[name]`` (name: the module path, ``output`` for the final copy) as ``{"seconds", "calls",
        "kind", "path", "fused"}``; ``path`` names the kernel (``int8 conv 3x3 + add (vnni)``), ``fused``
        the graph nodes folded into the step. Without a plan the graph runs and ``timings`` stays as it is
        (:func:`plan_status` says why)."""
        if timings is None:
            return self(x)
        plan = self.plan_for((x,), {})
        if plan is None:
            return self.fallback(x)
        t = torch.zeros(len(plan.steps), dtype=torch.float64)
        with self._lock:
            y = plan.run(_as_input(x), t)
        isa = nat.int8_isa()
        for s, sec in zip(plan.steps, t.tolist(), strict=True):
            e = timings.setdefault(s.name, {"seconds": 0.0, "calls": 0, "kind": s.kind,
                                            "path": _path_label(s, isa),
                                            "fused": list(s.fused)})
            e["seconds"] += sec
            e["calls"] += 1
        return y

    def plan_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CompiledPlan | None:
        """The plan for these arguments (compiled on first use), or None (the reason in ``last_reason``)."""
        if not self.enabled:
            self.last_reason = "turned off for this model (set_plan(model, False))"
            return None
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            self.last_reason = "traced or compiled (torch.export, torch.compile, jit): the graph runs"
            return None
        if not plan_enabled_by_env():
            self.last_reason = "turned off by LOWBIT_PLAN=0"
            return None
        x = args[0] if len(args) == 1 and not kwargs else None
        if type(x) is not torch.Tensor or x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
            self.last_reason = "the call is not one CPU tensor without gradient"
            return None
        why = _native_ok()
        if why is not None:
            self.last_reason = why
            return None
        key = (x.dtype, tuple(x.shape))
        plan = self._plans.get(key)
        if isinstance(plan, CompiledPlan) and plan.dispatch_state is not None \
                and plan.dispatch_state != w46_plan.quick_state(nat._C):
            plan = None  # a 4.6-bit layer's kernel choice depends on the ISA path / threads / mode: choose again
        if plan is None:
            plan = self._compile(x)
            self._plans[key] = plan
        self._plans.move_to_end(key)  # the last entry: the plan of the latest call (plan_status shows its steps)
        while len(self._plans) > MAX_PLANS:
            self._plans.popitem(last=False)
        if isinstance(plan, str):
            self.last_reason = plan
            return None
        hooked = plan.hooked()
        if hooked is not None:
            self.last_reason = f"forward hooks on '{hooked}' (hooks see module calls: the graph runs node by node)"
            return None
        self.last_reason = None
        return plan

    def _compile(self, x: torch.Tensor) -> CompiledPlan | str:
        try:
            nodes, module = _program(self.model)
            with torch.no_grad():
                return compile_plan(nodes, module, x)
        except Unplannable as e:
            return str(e)

    def status(self) -> dict[str, Any]:
        plans = [p for p in self._plans.values() if isinstance(p, CompiledPlan)]
        return {
            "enabled": self.enabled and plan_enabled_by_env(),
            "planned": [list(p.in_shape) for p in plans],
            "reason": self.last_reason,
            "steps": [p.describe() for p in plans][-1] if plans else [],
            "buffer_bytes": [p.native.nbytes for p in plans],
            "w46_choice": plans[-1].w46_choice if plans else None,
        }


def _path_label(s: Any, isa: str) -> str:
    """A step's kernel path with the ISA it runs on (``int8 conv 3x3 (vnni)``)."""
    if s.kind in ("conv", "gemm"):
        return f"{s.path} ({isa})"
    if s.kind in ("w46conv", "w46gemm"):
        return f"{s.path} ({nat._C.w46_path()})"
    return s.path


def _as_input(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_contiguous() else x.contiguous()


def _program(model: nn.Module) -> tuple[list[Any], Any]:
    """(node list, module lookup) of a GraphModule or a loaded model."""
    from lowbit.modelfile.program import LoadedModel, program_from_fx

    if isinstance(model, LoadedModel):
        return model.lowbit_nodes, model.get_submodule
    if isinstance(model, fx.GraphModule):
        from lowbit.modelfile import ModelFileError

        try:
            nodes, _, _ = program_from_fx(model)
        except ModelFileError as e:
            raise Unplannable(f"the graph calls something outside lowbit's vocabulary: {e}") from None
        return nodes, model.get_submodule
    raise Unplannable(f"a {type(model).__name__} is neither a torch.fx graph nor a loaded lowbit model")


def _graph_forward(model: nn.Module) -> Any:
    """The model's own forward, bound (without the executor)."""
    from lowbit.modelfile.program import LoadedModel

    if isinstance(model, LoadedModel):
        return model.graph_forward
    f = type(model).forward
    return getattr(f, "__wrapped__", f).__get__(model) if getattr(f, "__lowbit_plan__", False) else \
        f.__get__(model)


def _wrap_class_forward(gm: fx.GraphModule) -> None:
    """Route the GraphModule's forward (its own generated class's) through its executor. ``recompile()``
    (a changed graph) puts the plain generated forward back: the graph then runs node by node."""
    cls = type(gm)
    orig = cls.forward
    if getattr(orig, "__lowbit_plan__", False):
        return

    @functools.wraps(orig)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        ex = self.__dict__.get("_lowbit_executor")
        if ex is None:
            return orig(self, *args, **kwargs)
        return ex(*args, **kwargs)

    forward.__lowbit_plan__ = True  # type: ignore[attr-defined]
    cls.forward = forward


def _reinstall(copy: fx.GraphModule) -> None:  # copy.deepcopy hook (a fresh class, a copied executor)
    ex = copy.__dict__.get("_lowbit_executor")
    if ex is not None:
        ex.model = copy
        _wrap_class_forward(copy)


def install(model: nn.Module) -> nn.Module:
    """Give a converted model (GraphModule or loaded file) the executor (idempotent); returns the model.
    The executor lives in ``model._lowbit_executor``; a GraphModule's forward is routed through it, a
    loaded model's forward looks it up."""
    from lowbit.modelfile.program import LoadedModel

    if executor_of(model) is not None:
        return model
    if not isinstance(model, (fx.GraphModule, LoadedModel)):
        raise TypeError(f"the plan executor runs converted graphs, not a {type(model).__name__}")
    ex = Executor(model)
    if isinstance(model, fx.GraphModule):
        from lowbit.graph.attrs import set_preserved

        set_preserved(model, "_lowbit_executor", ex)  # copy.deepcopy keeps it (then _reinstall)
        _wrap_class_forward(model)
        model._register_deepcopy_hook(_reinstall)
    else:
        model.__dict__["_lowbit_executor"] = ex
    return model


def executor_of(model: nn.Module) -> Executor | None:
    """The model's executor, or None."""
    ex = model.__dict__.get("_lowbit_executor")
    return ex if isinstance(ex, Executor) else None


def plan_status(model: nn.Module) -> dict[str, Any]:
    """Whether ``model`` runs as a plan: ``enabled``, ``planned`` (the input shapes compiled), ``reason``
    (why the last call ran node by node, None if it ran the plan), ``steps`` (the latest plan's steps),
    ``buffer_bytes`` and ``w46_choice`` (how the latest plan's 4.6-bit layers chose their kernels on a VNNI
    CPU: :mod:`lowbit.runtime.w46_choice`; None elsewhere). A model without the executor:
    ``{"enabled": False, "reason": ...}``."""
    ex = executor_of(model)
    if ex is None:
        return {"enabled": False, "planned": [], "reason": "the model has no plan executor (not a converted "
                "integer graph)", "steps": [], "buffer_bytes": [], "w46_choice": None}
    return ex.status()


def set_plan(model: nn.Module, enabled: bool) -> None:
    """Turn the plan on or off for ``model`` (off: every call runs the node-by-node forward)."""
    ex = executor_of(model)
    if ex is None:
        raise ValueError("this model has no plan executor (lowbit.quantize / lowbit.load install it on integer "
                         "graphs)")
    ex.enabled = bool(enabled)
