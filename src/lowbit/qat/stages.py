"""Layer-by-layer stages of a fake-quant model (:func:`lowbit.qat.prepare_graph`): which quantizers belong to
which layer, the model with only its first ``k`` layers quantized, and range calibration stage by stage.

* **Stages.** Layer ``i`` (execution order) owns its weight quantizer and every activation quantizer whose
  value is computed by layer ``i`` at the latest: its output, a residual add after it; the model input
  belongs to layer 0. Quantizing layer ``i`` means setting these quantizers' steps.
* **Views.** :func:`staged_view` builds a ``GraphModule`` running the first ``k`` layers and their
  activations fake-quantized and everything after them in float32. The view shares every module and
  parameter with the fake-quant model, so training its float tail trains the fake-quant model.
* **Ranges.** :class:`RangeRule` sets a step by a lowbit observer (:mod:`lowbit.observers`, fed the whole
  calibration set batch by batch) or a step initializer (:mod:`lowbit.quantizers.init`, on the first
  calibration batch). :func:`calibrate_stage` calibrates one layer's quantizers on the activations of the
  model whose earlier layers are already quantized; :func:`calibrate_float` calibrates every quantizer at
  once on the float network's activations (plain post-training quantization).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from lowbit.formats.granularity import PerAxis
from lowbit.graph._names import fresh_path
from lowbit.methods.base import as_inputs
from lowbit.observers import OBSERVERS, Observer, make_observer
from lowbit.quantizers import INITIALIZERS, FakeQuantizer

from .modules import PoolRequant, QATLayer
from .prepare import qat_info

__all__ = ["RangeRule", "Staging", "calibrate_float", "calibrate_stage", "staged_view", "staging"]


@dataclass
class Staging:
    """``layers``: the quantized layers in execution order; ``acts``: activation quantizer node names in graph
    order; ``stage``: node name -> the index of the layer that owns it."""

    layers: list[str]
    acts: list[str]
    stage: dict[str, int]

    def acts_of(self, i: int) -> list[str]:
        return [a for a in self.acts if self.stage[a] == i]

    def acts_upto(self, i: int) -> set[str]:
        """Activation quantizers of layers 0..i-1."""
        return {a for a in self.acts if self.stage[a] < i}


def staging(qm: fx.GraphModule) -> Staging:
    """The stages of fake-quant model ``qm`` (module docstring)."""
    info = qat_info(qm)
    if info is None:
        raise ValueError("not a model made by lowbit.qat.prepare")
    layers = list(info["layers"])
    index = {name: i for i, name in enumerate(layers)}
    upstream: dict[fx.Node, int] = {}
    acts: list[str] = []
    stage: dict[str, int] = {}
    for n in qm.graph.nodes:
        u = max((upstream.get(a, -1) for a in n.all_input_nodes), default=-1)
        if n.op == "call_module" and str(n.target) in index:
            u = max(u, index[str(n.target)])
        upstream[n] = u
        if n.op == "call_module" and isinstance(qm.get_submodule(str(n.target)), FakeQuantizer):
            acts.append(n.name)
            stage[n.name] = max(u, 0)
    return Staging(layers, acts, stage)


class _Stop(Exception):
    """Raised by a tap to end a forward pass early (nothing after it is needed)."""


class _Tap(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], None]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.fn(x)
        return x


def staged_view(qm: fx.GraphModule, layers: set[str], acts: set[str],
                taps: dict[str, Callable[[torch.Tensor], None]] | None = None) -> fx.GraphModule:
    """A view of ``qm`` (sharing its modules) where the layers in ``layers`` have quantized weights and the
    activation quantizers (node names) in ``acts`` quantize; the other layers run float and the other
    quantizers pass values through. ``taps``: activation quantizer node name -> ``fn(x)`` called on the
    value it would quantize (the quantizer itself is then bypassed)."""
    taps = taps or {}
    new = fx.GraphModule(qm, copy.deepcopy(qm.graph))
    node_of = {id(qm.get_submodule(str(n.target))): n.name for n in qm.graph.nodes
               if n.op == "call_module" and isinstance(qm.get_submodule(str(n.target)), FakeQuantizer)}
    for n in list(new.graph.nodes):
        if n.op != "call_module":
            continue
        target = str(n.target)
        mod = qm.get_submodule(target)
        if isinstance(mod, QATLayer) and target not in layers:
            name = fresh_path(new, f"float_{target.replace('.', '_')}")
            new.add_module(name, mod.float_module())
            n.target = name
        elif isinstance(mod, FakeQuantizer) and n.name in taps:
            name = fresh_path(new, f"tap_{n.name}")
            new.add_module(name, _Tap(taps[n.name]))
            n.target = name
        elif (isinstance(mod, FakeQuantizer) and n.name not in acts) or (
                isinstance(mod, PoolRequant) and node_of.get(id(mod.source)) not in acts):
            n.replace_all_uses_with(n.args[0])
            new.graph.erase_node(n)
    new.graph.lint()
    new.recompile()
    return new.eval()


# ------------------------------------------------------------------------------------------------ ranges

@dataclass(frozen=True)
class RangeRule:
    """How a step is chosen: ``kind="observer"`` (a :data:`lowbit.observers.OBSERVERS` name, fed every
    calibration batch) or ``kind="init"`` (a :data:`lowbit.quantizers.INITIALIZERS` name, on the first
    calibration batch)."""

    kind: str
    name: str

    def __post_init__(self) -> None:
        known = OBSERVERS if self.kind == "observer" else INITIALIZERS if self.kind == "init" else None
        if known is None:
            raise ValueError(f"range rule kind must be 'observer' or 'init', got {self.kind!r}")
        if self.name not in known:
            raise ValueError(f"unknown {'observer' if self.kind == 'observer' else 'initializer'} {self.name!r}; "
                             f"known: {', '.join(sorted(known))}")

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


def _set_step(q: FakeQuantizer, obs: Observer) -> None:
    scale, zp = obs.qparams(q.fmt)
    if bool((zp != 0).any()):  # the quantizers lowbit places here have zero points fixed at 0
        raise ValueError(f"{q.describe()}: the observer chose a nonzero zero point, which this format cannot hold")
    q.step.set(scale.to(torch.float32).reshape(q.param_shape))
    q.initialized.fill_(1)


@torch.no_grad()
def set_weight_step(q: FakeQuantizer, weight: torch.Tensor, rule: RangeRule) -> None:
    """The step of weight quantizer ``q`` from ``weight`` by ``rule``."""
    if rule.kind == "init":
        q.init = rule.name
        q.initialize(weight)
        return
    g = q.granularity
    obs = make_observer(rule.name, axis=g.axis if isinstance(g, PerAxis) else None)
    obs.observe(weight.detach())
    _set_step(q, obs)


class _Collector:
    """What a tap feeds: an observer (every batch) or the first batch for an initializer."""

    def __init__(self, rule: RangeRule) -> None:
        self.rule = rule
        self.obs = make_observer(rule.name) if rule.kind == "observer" else None
        self.first: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> None:
        if self.obs is not None:
            self.obs.observe(x.detach())
        elif self.first is None:
            self.first = x.detach().clone()

    def apply(self, q: FakeQuantizer) -> None:
        if self.obs is not None:
            _set_step(q, self.obs)
            return
        if self.first is None:
            raise ValueError(f"{q.describe()} saw no data")
        q.init = self.rule.name
        q.initialize(self.first)


@torch.no_grad()
def _observe(view: nn.Module, batches: Sequence[Any]) -> None:
    for b in batches:
        try:
            view(*as_inputs(b))
        except _Stop:
            pass


def _calibrate(qm: fx.GraphModule, names: list[str], layers: set[str], acts: set[str], batches: Sequence[Any],
               rule: RangeRule) -> None:
    """Calibrate the activation quantizers ``names`` together, on the view (``layers``, ``acts``)."""
    collectors = {n: _Collector(rule) for n in names}
    last = names[-1] if len(names) == 1 else None

    def tap(name: str) -> Callable[[torch.Tensor], None]:
        def fn(x: torch.Tensor) -> None:
            collectors[name](x)
            if name == last:
                raise _Stop  # one quantizer: the rest of the network is not needed
        return fn

    view = staged_view(qm, layers, acts, {n: tap(n) for n in names})
    _observe(view, batches if rule.kind == "observer" else batches[:1])
    modules = {n.name: qm.get_submodule(str(n.target)) for n in qm.graph.nodes if n.name in collectors}
    for n, c in collectors.items():
        c.apply(modules[n])


def calibrate_stage(qm: fx.GraphModule, st: Staging, i: int, batches: Sequence[Any], weight_rule: RangeRule,
                    act_rule: RangeRule) -> None:
    """Quantize layer ``i`` of ``qm``: its weight step from its current weights, then each of its activation
    quantizers (graph order) on the activations of the model whose layers ``0..i`` have quantized weights and
    whose earlier activation quantizers (layers ``< i``, and those of layer ``i`` already done) quantize."""
    name = st.layers[i]
    layer = qm.get_submodule(name)
    set_weight_step(layer.weight_quantizer, layer.layer.weight, weight_rule)
    on = set(st.layers[: i + 1])
    done = st.acts_upto(i)
    for a in st.acts_of(i):
        _calibrate(qm, [a], on, done, batches, act_rule)
        done.add(a)


def calibrate_float(qm: fx.GraphModule, st: Staging, batches: Sequence[Any], weight_rule: RangeRule,
                    act_rule: RangeRule) -> None:
    """Plain post-training quantization: every weight step from the weights, every activation step from the
    float network's activations (one pass over ``batches``)."""
    for name in st.layers:
        layer = qm.get_submodule(name)
        set_weight_step(layer.weight_quantizer, layer.layer.weight, weight_rule)
    _calibrate(qm, list(st.acts), set(), set(), batches, act_rule)
