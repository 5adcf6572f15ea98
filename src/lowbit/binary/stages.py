"""Gradual freezing: the stages in which the layers of a fake-binary model become binary.

A stage belongs to one layer that has a binarizer: its ±1 weights, or the sign taken of its output. At its
start the layer's binarizers switch on (a UBQ binarizer anneals ``δ`` to 0 over the stage's training steps); during
it the layer and everything not yet frozen train; at its end the layer freezes: its weights (and
quantizer steps) stop training and the :class:`~lowbit.binary.modules.SignBatchNorm` after it keeps its
running statistics — from then on that part of the network computes exactly what the integer model
will. Layers without a binarizer (the 8-bit last layer) freeze with the next stage, or the last. ``order`` (config)
chooses the sequence: network order (``forward``), ``reverse``, or explicit layer names.

With ``freeze="none"`` there is a single phase: every binarizer is on from the start (annealing over the
whole training) and nothing freezes. Own training loops drive the stages with :func:`begin_stage` /
:func:`end_stage` (or :func:`begin_all`) and any optimizer over the parameters that still require grad.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from lowbit.quantizers import Binarizer, FakeQuantizer

from .modules import SignBatchNorm

__all__ = ["plan_stages", "reset_stages", "begin_stage", "end_stage", "begin_all", "stage_count"]


def _path_of(gm: nn.Module, target: nn.Module) -> str | None:
    for name, m in gm.named_modules():
        if m is target:
            return name
    return None


def _owner(gm: fx.GraphModule, node: fx.Node, layers: set[str]) -> str | None:
    """The layer whose output ``node`` carries (back through BatchNorm, ReLU, pooling, flattening), or None."""
    from lowbit.qat.prepare import is_passthrough

    while isinstance(node, fx.Node) and node.op == "call_module" and str(node.target) not in layers and (
            is_passthrough(gm, node) or isinstance(gm.get_submodule(str(node.target)), SignBatchNorm)):
        node = node.args[0]
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.flatten:
        node = node.args[0]
        while isinstance(node, fx.Node) and node.op == "call_module" and str(node.target) not in layers and (
                is_passthrough(gm, node) or isinstance(gm.get_submodule(str(node.target)), SignBatchNorm)):
            node = node.args[0]
    if isinstance(node, fx.Node) and node.op == "call_module" and str(node.target) in layers:
        return str(node.target)
    return None


def _layer_parts(gm: fx.GraphModule, layers: list[str]) -> dict[str, tuple[list[str], list[str]]]:
    """Per layer: (its binarizers, the modules to freeze with it). A layer's binarizers are its weights' and
    the signs taken of its output (so the BatchNorm before them trains with the sign on and then freezes as a
    threshold) [ours]; a sign of a value no layer produces (the model input, a residual add) belongs to the
    first layer that reads it."""
    names = set(layers)
    parts: dict[str, tuple[list[str], list[str]]] = {t: ([], [t]) for t in layers}
    for t in layers:
        mod = gm.get_submodule(t)
        wq = getattr(mod, "weight_quantizer", None)
        if isinstance(wq, Binarizer):
            parts[t][0].append(f"{t}.weight_quantizer")
        iq = getattr(mod, "input_quantizer", None)
        path = _path_of(gm, iq) if iq is not None else None
        if isinstance(iq, FakeQuantizer) and not isinstance(iq, Binarizer) and path is not None:
            parts[t][1].append(path)
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        m = gm.get_submodule(str(n.target))
        if isinstance(m, SignBatchNorm):
            owner = _owner(gm, n.args[0], names)
            if owner is not None:
                parts[owner][1].append(str(n.target))
        elif isinstance(m, Binarizer):
            owner = _owner(gm, n.args[0], names)
            if owner is None:
                owner = next((str(u.target) for u in n.users if u.op == "call_module" and str(u.target) in names),
                             None)
            if owner is None:
                raise ValueError(f"sign {n.target!r} is neither after a layer nor read by one: no stage can own it")
            parts[owner][0].append(str(n.target))
    return parts


def _resolve_order(order: tuple[str, ...], staged: list[str]) -> list[str]:
    if order == ("forward",):
        return list(staged)
    if order == ("reverse",):
        return list(reversed(staged))
    if sorted(order) != sorted(staged):
        raise ValueError(f"order must name every binarized layer once: {', '.join(staged)} (got {', '.join(order)})")
    return list(order)


def plan_stages(gm: fx.GraphModule, layers: list[str], cfg: Any) -> list[dict[str, Any]]:
    """The stages of ``gm`` (one per layer with a binarizer, in ``cfg.order``), each
    ``{"layer", "binarizers", "freeze", "epochs"}``; a binarizer shared by several layers (one input) switches
    on in the first of their stages."""
    parts = _layer_parts(gm, layers)
    staged = [t for t in layers if parts[t][0]]
    if not staged:
        raise ValueError("no layer of this model is binarized (all are kept float or at first_last_bits)")
    seq = _resolve_order(tuple(cfg.order), staged)
    epochs = list(cfg.stage_epochs)
    if len(epochs) not in (1, len(seq)):
        raise ValueError(f"stage_epochs has {len(epochs)} values for {len(seq)} stages ({', '.join(seq)}); give "
                         "one value or one per stage")
    if len(epochs) == 1:
        epochs *= len(seq)
    extra: dict[str, list[str]] = {t: [] for t in staged}
    pending: list[str] = []
    for t in layers:  # layers without a binarizer freeze with the next binarized layer in network order
        if t in extra:
            extra[t] += pending
            pending = []
        else:
            pending += parts[t][1]
    extra[staged[-1]] += pending
    seen: set[str] = set()
    stages = []
    for t, e in zip(seq, epochs, strict=True):
        bins = [b for b in parts[t][0] if b not in seen]
        seen.update(bins)
        stages.append({"layer": t, "binarizers": bins, "freeze": parts[t][1] + extra[t], "epochs": e})
    return stages


def _info(model: nn.Module) -> dict[str, Any]:
    from .prepare import binary_info

    info = binary_info(model)
    if info is None:
        raise ValueError("this model was not made by lowbit.binary.prepare")
    return info


def stage_count(model: nn.Module) -> int:
    return len(_info(model)["stages"])


def _binarizer(model: nn.Module, path: str) -> Binarizer:
    m = model.get_submodule(path)
    assert isinstance(m, Binarizer)
    return m


def reset_stages(model: nn.Module) -> None:
    """The state before training: every binarizer off (gradual freezing) or on (``freeze="none"``)."""
    info = _info(model)
    gradual = info["config"]["freeze"] == "gradual"
    for s in info["stages"]:
        for b in s["binarizers"]:
            q = _binarizer(model, b)
            if gradual:
                q.enabled.fill_(False)
            else:
                q.enable(0)


def begin_all(model: nn.Module, anneal_steps: int) -> None:
    """``freeze="none"``: switch every binarizer on, a UBQ one annealing over ``anneal_steps`` training steps."""
    for s in _info(model)["stages"]:
        for b in s["binarizers"]:
            _binarizer(model, b).enable(anneal_steps)


def begin_stage(model: nn.Module, k: int, anneal_steps: int) -> None:
    """Start stage ``k``: switch its binarizers on (annealing over ``anneal_steps`` training steps)."""
    stages = _info(model)["stages"]
    if not 0 <= k < len(stages):
        raise ValueError(f"stage {k} does not exist (this model has {len(stages)})")
    for b in stages[k]["binarizers"]:
        _binarizer(model, b).enable(anneal_steps)


def end_stage(model: nn.Module, k: int) -> None:
    """End stage ``k``: its binarizers end their annealing and its layers freeze (BatchNorms included)."""
    stage = _info(model)["stages"][k]
    for b in stage["binarizers"]:
        _binarizer(model, b).finish()
    for path in stage["freeze"]:
        m = model.get_submodule(path)
        for sub in m.modules():
            if isinstance(sub, SignBatchNorm):
                sub.freeze()
        for p in m.parameters():
            p.requires_grad_(False)

