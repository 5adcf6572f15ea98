"""Conversion of a trained float network to BM layers (methods.md §4).

:func:`convert` swaps chosen ``nn.Linear`` / ``nn.Conv2d`` layers (also inside lowbit's ``Fused``
conv+activation modules) for :class:`~lowbit.bm.layers.BMLinear` / :class:`~lowbit.bm.layers.BMConv2d`
with ``v± = ln max(±W, eps)`` and the bias copied, leaving everything else (BatchNorm, activations,
pooling, the layers not chosen) as it was, so the converted model can be compared with the float one
layer by layer (:func:`layer_outputs`).
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lowbit.graph import Fused

from .layers import BMConv2d, BMLayer, BMLinear

__all__ = ["convert", "convertible_layers", "select_layers", "bm_layers", "execution_order", "layer_outputs",
           "set_options"]

_SUPPORTED = "nn.Linear and nn.Conv2d (zero padding), alone or in lowbit's Fused conv/linear + ReLU modules"


def _inner(m: nn.Module) -> tuple[nn.Module, str | None]:
    if isinstance(m, Fused):
        return m.layer, m.act
    return m, None


def _convertible(m: nn.Module) -> bool:
    inner, _ = _inner(m)
    if type(inner) is nn.Linear:
        return True
    return type(inner) is nn.Conv2d and inner.padding_mode == "zeros" and not isinstance(inner.padding, str)


def _weight_layer(m: nn.Module) -> bool:
    """A module BM conversion could be meant for: has a weight and is not a normalization layer."""
    inner, _ = _inner(m)
    if isinstance(inner, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, BMLayer)):
        return False
    return isinstance(getattr(inner, "weight", None), torch.Tensor)


def convertible_layers(model: nn.Module) -> list[str]:
    """Names (as in ``named_modules``) of the layers :func:`convert` can turn into BM layers."""
    out: list[str] = []
    inside: set[str] = set()
    for name, m in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if _convertible(m):
            out.append(name)
            inside.add(name)
    return out


def bm_layers(model: nn.Module) -> list[str]:
    """Names of the BM layers in ``model``."""
    return [n for n, m in model.named_modules() if isinstance(m, BMLayer)]


def select_layers(model: nn.Module, layers: str | Sequence[str] | None) -> list[str]:
    """The layers :func:`convert` would touch for ``layers`` (validated: errors name the layer)."""
    candidates = convertible_layers(model)
    if layers is None:
        return candidates
    patterns = [p for p in (layers.split(",") if isinstance(layers, str) else layers) if p]
    modules = dict(model.named_modules())
    chosen: list[str] = []
    for pat in patterns:
        if pat in modules:  # an exact name: it must be convertible
            m = modules[pat]
            if isinstance(m, BMLayer):
                raise ValueError(f"layer '{pat}' is already a BM layer")
            if not _convertible(m):
                inner, _ = _inner(m)
                raise ValueError(f"cannot convert layer '{pat}' ({type(inner).__name__}) to a BM layer: "
                                 f"BM conversion supports {_SUPPORTED}")
            hits = [pat]
        else:
            hits = [n for n in candidates if fnmatch.fnmatchcase(n, pat)]
            bad = [n for n, m in modules.items() if n and fnmatch.fnmatchcase(n, pat) and n not in candidates
                   and _weight_layer(m) and not any(n.startswith(c + ".") for c in candidates)]
            if bad:
                inner, _ = _inner(modules[bad[0]])
                raise ValueError(f"cannot convert layer '{bad[0]}' ({type(inner).__name__}) matched by '{pat}' to "
                                 f"a BM layer: BM conversion supports {_SUPPORTED}")
            if not hits:
                raise ValueError(f"no convertible layer matches '{pat}'; convertible layers: "
                                 f"{', '.join(candidates) or 'none'}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def convert(model: nn.Module, layers: str | Sequence[str] | None = None, *, eps: float = 1e-6,
            inplace: bool = False, **options: Any) -> nn.Module:
    """Replace the chosen conv/linear layers of a trained float model by BM layers.

    layers: None (every convertible layer, :func:`convertible_layers`), or layer names / glob patterns
        (a list or a comma-separated string), e.g. ``"features.*"``. An exact name of a layer BM cannot
        convert, or a pattern matching one, is an error naming the layer and its type.
    eps: weights are converted as ``v± = ln max(±W, eps)`` (the paper's 1e-6).
    options: BM layer options (``floor``, ``temperature``, ``code_bits``, ``log_step_bits``).
    Returns the converted model (a copy unless ``inplace``); its BM layers know their names
    (``lowbit_name``), used in error messages.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert takes an nn.Module, got {type(model).__name__}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    names = select_layers(model, layers)
    if not inplace:
        model = copy.deepcopy(model)
    for name in names:
        m = model.get_submodule(name)
        inner, act = _inner(m)
        cls = BMLinear if isinstance(inner, nn.Linear) else BMConv2d
        bm = cls.from_float(inner, eps=eps, act=act, **options)  # type: ignore[arg-type]
        bm.lowbit_name = name
        bm.train(m.training)
        _set(model, name, bm)
    return model


def set_options(model: nn.Module, **options: Any) -> None:
    """Set BM layer attributes (``temperature``, ``code_bits``, ``log_step_bits``, ``floor``) on every BM layer."""
    known = {"temperature", "code_bits", "log_step_bits", "floor"}
    bad = set(options) - known
    if bad:
        raise ValueError(f"unknown BM layer option(s) {sorted(bad)}; known: {sorted(known)}")
    if "code_bits" in options and options["code_bits"] not in (8, 16):
        raise ValueError(f"BM integer codes are 8 or 16 bits wide, got {options['code_bits']}")
    for m in model.modules():
        if isinstance(m, BMLayer):
            for k, v in options.items():
                setattr(m, k, v)


def _observe(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """One eval-mode, no-grad run on ``x``; the first output of each named submodule, in call order."""
    out: dict[str, torch.Tensor] = {}

    def hook(n: str) -> Any:
        return lambda _m, _i, o: out.setdefault(n, o.detach())

    hooks = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return out


def execution_order(model: nn.Module, example_input: torch.Tensor, names: Iterable[str]) -> list[str]:
    """``names`` sorted by when their module first runs on ``example_input`` (modules never run last)."""
    names = list(names)
    seen = list(_observe(model, example_input, names))
    return seen + [n for n in names if n not in seen]


def layer_outputs(model: nn.Module, x: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Outputs of the named submodules on input ``x`` (eval mode, no grad): for layer-by-layer checks."""
    return _observe(model, x, list(names))
