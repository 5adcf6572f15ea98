"""Building blocks the methods share: weight quantization, layer swapping, activation calibration."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from lowbit.formats.affine import INT8_WEIGHT, UINT8_ACT, quantize
from lowbit.formats.granularity import PerAxis, PerTensor
from lowbit.kernels import AccumulatorOverflowError
from lowbit.observers import Observer, make_observer

from .base import Batch, LayerSettings, as_inputs, is_layer, layer_of


def quantize_weight(w: torch.Tensor, settings: LayerSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Float weights [N, ...] -> (int8 codes in [-127, 127], float32 scales [N])."""
    if not torch.isfinite(w).all():
        raise ValueError("weights contain NaN or Inf")
    g = settings.weight_granularity
    if not isinstance(g, (PerTensor, PerAxis)) or (isinstance(g, PerAxis) and g.axis % w.dim() != 0):
        raise ValueError(f"integer layers scale weights per tensor or per output channel (PerAxis(0)), not {g}")
    obs = make_observer(settings.weight_observer, axis=0 if isinstance(g, PerAxis) else None)
    obs.observe(w.detach())
    scale, _ = obs.qparams(INT8_WEIGHT)
    scale = scale.reshape(-1).to(torch.float32)
    if scale.numel() == 1:
        q = quantize(w, scale, 0, INT8_WEIGHT)
        scale = scale.expand(w.shape[0]).contiguous()
    else:
        q = quantize(w, scale, 0, INT8_WEIGHT, axis=0)
    return q, scale


def layer_error(e: ValueError, name: str) -> ValueError:
    """``e`` with layer ``name`` in its message (once); an :class:`~lowbit.kernels.AccumulatorOverflowError`
    stays one."""
    msg = str(e)
    msg = msg if f"'{name}'" in msg else f"layer '{name}': {msg}"
    return AccumulatorOverflowError(msg) if isinstance(e, AccumulatorOverflowError) else ValueError(msg)


def conv_geometry(layer: nn.Module) -> dict[str, Any]:
    if isinstance(layer, nn.Linear):
        return {}
    return {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": layer.groups}


def swap_layers(
    gm: fx.GraphModule,
    config: Any,
    make: Callable[[nn.Module, str | None, LayerSettings, str], nn.Module],
) -> tuple[fx.GraphModule, list[str]]:
    """Replace every quantizable layer (not kept float) by ``make(layer, act, settings, name)``.

    Used by the methods whose layers keep float input and output (dynamic range, float16).
    Returns the new graph module and the names of layers left in float.
    """
    gm = copy.deepcopy(gm)
    kept: list[str] = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if not is_layer(mod):
            continue
        settings = config.layer(node.target)
        if settings.keep_float:
            kept.append(node.target)
            continue
        layer, act = layer_of(mod)
        try:
            new = make(layer, act, settings, node.target)
        except ValueError as e:
            raise layer_error(e, node.target) from None
        _set_submodule(gm, node.target, new)
    gm.recompile()
    return gm, kept


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, observers: dict[str, Observer]) -> None:
        super().__init__(gm)
        self.observers = observers

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        obs = self.observers.get(n.name)
        if obs is not None and isinstance(out, torch.Tensor) and out.is_floating_point():
            obs.observe(out.detach())
        return out


def calibrate_activations(
    gm: fx.GraphModule, batches: list[Batch], observer: str, progress: bool = True
) -> dict[str, tuple[float, int]]:
    """Run the float graph over the calibration batches; per node: uint8 (scale, zero point)."""
    observers = {n.name: make_observer(observer) for n in gm.graph.nodes if n.op not in ("output", "get_attr")}
    rec = _Recorder(gm, observers)
    with torch.no_grad():
        for b in tqdm(batches, desc="calibrating", unit="batch", disable=not progress, leave=False):
            rec.run(*as_inputs(b))
    out: dict[str, tuple[float, int]] = {}
    for name, obs in observers.items():
        if obs.observed:
            s, z = obs.qparams(UINT8_ACT)
            out[name] = (float(s), int(z))
    return out
