"""Which kernel the 4.6-bit layers of a plan run, chosen on the plan itself.

A 4.6-bit layer may run the 4.6-bit kernel or the int8 kernel on the same codes
(:mod:`lowbit.kernels.w46_dispatch`; the same integers either way). Timing each layer alone, node by node,
misleads inside a plan: there the int8 convolution can take the residual add that follows it into its
epilogue (the 4.6-bit kernel cannot), and the Python around a node-by-node call is gone. So in ``auto``
mode :func:`compile_plan` builds the plan with every 4.6-bit layer on the int8 kernel and with every one on
the 4.6-bit kernel, times both step by step on the call's input, gives each layer the kernel whose steps
took less (its own step, plus on the 4.6-bit side the add and clamp steps the int8 plan had fused into it),
builds that mixed plan too, and keeps the fastest of the three whole plans (warm-up, interleaved rounds,
the minimum of each), on every kernel path: on AVX2 the 4.6-bit kernel wins on 3x3 and linear layers but
loses 5x on depthwise ones. A plan that runs any layer on the 4.6-bit kernel
must beat the all-int8 plan by :data:`MARGIN`: within that, the timings (a few rounds, once per input
shape) do not tell the plans apart, and the all-int8 plan, one kernel family with the fused residual
adds, is kept. A model with 4.6-bit layers is therefore not slower than the same codes on the int8 kernels,
up to timing noise. With a forced ``LOWBIT_W46_DISPATCH`` the plan runs that kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lowbit.kernels import native as nat
from lowbit.kernels import w46_dispatch, w46_plan

from .plan import CompiledPlan, build_plan

__all__ = ["compile_plan"]

_WARMUP, _ROUNDS = 2, 5
#: how much faster (relative) than the all-int8 plan a plan with 4.6-bit steps must time to be kept
MARGIN = 0.05
_LAYER_KINDS = ("conv", "gemm", "w46conv", "w46gemm")


def compile_plan(nodes: Sequence[Any], module: Callable[[str], nn.Module], x: torch.Tensor) -> CompiledPlan:
    """The plan of ``nodes`` for ``x`` (:func:`lowbit.runtime.plan.build_plan`), its 4.6-bit layers' kernels
    chosen on the plan where the dispatch is measured (module docstring)."""
    state = w46_plan.quick_state(nat._C)
    if state[2] != "auto":
        return build_plan(nodes, module, x)
    on_int8 = build_plan(nodes, module, x, w46_routes="int8")
    if on_int8.dispatch_state is None:  # no 4.6-bit layer
        return on_int8
    on_w46 = build_plan(nodes, module, x, w46_routes="w46")
    routes, costs = _per_layer(on_int8, on_w46, x)
    cands = {"int8": on_int8, "w46": on_w46}
    if set(routes.values()) == {"int8", "w46"}:
        cands["per layer"] = build_plan(nodes, module, x, w46_routes=routes)
    times = w46_dispatch._measure({k: (lambda p=p: p.run(x)) for k, p in cands.items()})
    best = min(times, key=lambda k: times[k])
    if times[best] > (1.0 - MARGIN) * times["int8"]:
        best = "int8"
    plan = cands[best]
    plan.w46_choice = {"plan": best, "us": {k: round(v * 1e6, 2) for k, v in times.items()},
                       "layers": routes, "layer_us": costs}
    return plan


def _step_times(plan: CompiledPlan, x: torch.Tensor) -> dict[str, float]:
    """Seconds per step name, the minimum over rounds."""
    best = torch.full((len(plan.steps),), float("inf"), dtype=torch.float64)
    t = torch.zeros(len(plan.steps), dtype=torch.float64)
    for i in range(_WARMUP + _ROUNDS):
        plan.run(x, t)
        if i >= _WARMUP:
            best = torch.minimum(best, t)
    return {s.name: float(v) for s, v in zip(plan.steps, best.tolist(), strict=True)}


def _per_layer(on_int8: CompiledPlan, on_w46: CompiledPlan, x: torch.Tensor
               ) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """The faster kernel per 4.6-bit layer from step times of the two plans, and those times (µs)."""
    ti, tw = _step_times(on_int8, x), _step_times(on_w46, x)
    w46_layers = {s.name for s in on_w46.steps if s.kind in ("w46conv", "w46gemm")}
    routes, costs = {}, {}
    for s in on_int8.steps:
        if s.kind not in _LAYER_KINDS or s.name not in w46_layers:
            continue
        int8_cost = ti[s.name]
        w46_cost = tw[s.name] + sum(tw.get(f, 0.0) for f in s.fused)  # the add / clamp it no longer fuses
        routes[s.name] = "w46" if w46_cost < int8_cost else "int8"
        costs[s.name] = {"int8": round(int8_cost * 1e6, 2), "w46": round(w46_cost * 1e6, 2)}
    return routes, costs
