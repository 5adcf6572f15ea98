"""Quantize any ``nn.Module`` by replacing its layers one by one, without tracing it.

The methods whose layers keep float input and output (dynamic range, weight-only, float16) need no
graph: :func:`swap_modules` walks a copy of the model and replaces every module of a type the method
handles (exact types: a subclass may compute something else) by the method's inference module, where
it was. The model's own ``forward`` — Python control flow, Hugging Face model code, anything — runs
unchanged around the replaced layers.

A BatchNorm right after a conv or linear layer inside an ``nn.Sequential`` is folded into it first (as
the graph front-end does); elsewhere BatchNorm stays a float op after the quantized layer.

Shared weights are quantized once: a module reachable at several paths is replaced by one new module
at all of them, and different modules sharing a weight tensor (tied input/output embeddings) get
modules holding the same quantized tensor (saved once). A weight shared with a module the method
leaves float keeps its layer float too, so the tie holds; such layers are listed with the reason.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .base import LayerSettings, QuantConfig
from .common import quantize_weight


class NoQuantizableLayerError(ValueError):
    """The model has no layer the method can quantize."""


class Unsupported(ValueError):
    """This layer cannot be converted by the method (the message says why); it stays float."""


class WeightCache:
    """Each weight tensor quantized (or cast) once, however many modules hold it."""

    def __init__(self) -> None:
        self._done: dict[tuple[int, str], Any] = {}
        self._keep: list[torch.Tensor] = []  # ids stay unique while the cache lives

    def get(self, w: torch.Tensor, how: str, make: Callable[[], Any]) -> Any:
        key = (id(w), how)
        if key not in self._done:
            self._done[key] = make()
            self._keep.append(w)
        return self._done[key]

    def int8(self, w: torch.Tensor, settings: LayerSettings, transpose: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 codes, float32 scale per output row) of a weight [N, ...] (``transpose``: of ``w.t()``)."""
        how = f"int8:{settings.weight_granularity}:{settings.weight_observer}:{transpose}"
        return self.get(w, how, lambda: quantize_weight((w.t() if transpose else w).detach().contiguous(), settings))

    def float16(self, w: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        return self.get(w, f"f16:{transpose}", lambda: (w.t() if transpose else w).detach().to(torch.float16)
                        .contiguous())


#: builder(module, path, settings, cache) -> replacement module; raises Unsupported to keep it float.
Builder = Callable[[nn.Module, str, LayerSettings, WeightCache], nn.Module]


@dataclass
class SwapResult:
    model: nn.Module
    swapped: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # path -> why it stayed float
    #: path -> the float module's class and parameter shapes (what a weights-only file is loaded into)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    folded: list[str] = field(default_factory=list)  # BatchNorm folded into the layer before it


def fold_sequential_batchnorm(model: nn.Module) -> list[str]:
    """Fold every BatchNorm that directly follows a Conv1d/Conv2d/Linear inside an ``nn.Sequential`` (exact
    type: its forward is the chain, so the layer feeds only the BatchNorm) into that layer, and replace it
    by ``nn.Identity``, as the graph front-end folds them. Layers or BatchNorms reachable at several
    paths, or whose tensors are shared, are left as they are. Returns the paths of the folded BatchNorms."""
    from lowbit.graph.prepare import _BN_FOR, _fold_bn

    paths = {}
    for path, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(path)
    holders: dict[int, int] = {}
    for m in model.modules():
        for t in [*m._parameters.values(), *m._buffers.values()]:
            if t is not None:
                holders[id(t)] = holders.get(id(t), 0) + 1
    folded = []
    for seq in list(model.modules()):
        if type(seq) is not nn.Sequential:
            continue
        keys = list(seq._modules)
        for a, b in zip(keys, keys[1:], strict=False):
            layer, bn = seq._modules[a], seq._modules[b]
            if (type(layer) not in _BN_FOR or type(bn) is not _BN_FOR[type(layer)] or bn.running_mean is None
                    or len(paths.get(id(layer), [])) != 1 or len(paths.get(id(bn), [])) != 1):
                continue
            n = layer.out_channels if isinstance(layer, (nn.Conv1d, nn.Conv2d)) else layer.out_features
            tensors = [*layer.parameters(), *bn.parameters(), *bn.buffers()]
            if bn.num_features != n or any(holders.get(id(t), 0) > 1 for t in tensors):
                continue
            seq._modules[a] = _fold_bn(layer, bn)
            seq._modules[b] = nn.Identity()
            folded.append(paths[id(bn)][0])
    return folded


def candidate_paths(model: nn.Module, builders: dict[str, Builder]) -> list[str]:
    """Paths of the modules a method would replace (outermost first; nothing inside a replaced module)."""
    return [p for p, _ in _candidates(model, builders)]


def class_key(cls: type) -> str:
    """``module.Class`` of a class (how builders are keyed: exact types, also for classes lowbit does not
    import, such as Hugging Face's)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def type_key(m: nn.Module) -> str:
    return class_key(type(m))


def _candidates(model: nn.Module, builders: dict[str, Builder]) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []

    def walk(m: nn.Module, prefix: str) -> None:
        for name, child in m._modules.items():  # every path, also of a module registered twice
            if child is None:
                continue
            path = f"{prefix}.{name}" if prefix else name
            if type_key(child) in builders:
                out.append((path, child))
            else:
                walk(child, path)

    if type_key(model) in builders:
        raise NoQuantizableLayerError(f"the model itself is a {type(model).__name__}: wrap it in a container "
                                      "module (e.g. nn.Sequential) so that the layer can be replaced")
    walk(model, "")
    return out


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """id(tensor) -> every (path, module) holding it directly as a parameter or buffer."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        for t in [*m._parameters.values(), *m._buffers.values()]:
            if t is not None:
                owners.setdefault(id(t), []).append((path, m))
    return owners


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + ".")


def swap_modules(model: nn.Module, config: QuantConfig, builders: dict[str, Builder], method: str) -> SwapResult:
    """A copy of ``model`` (eval mode) with every module whose exact type ``builders`` names replaced."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"lowbit.quantize takes an nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model).eval()
    result = SwapResult(model)
    result.folded = fold_sequential_batchnorm(model)
    cands = _candidates(model, builders)
    owners = _owners(model)
    for path, _ in cands:
        if config.layer(path).keep_float:
            result.kept[path] = "keep_float"
    cands = [(p, m) for p, m in cands if p not in result.kept]
    cand_paths = [p for p, _ in cands]
    built: dict[int, nn.Module] = {}
    cache = WeightCache()
    for path, mod in cands:
        settings = config.layer(path)
        tie = _foreign_tie(mod, path, cand_paths, owners)
        if tie:
            result.kept[path] = tie
            warnings.warn(f"{method}: layer '{path}' stays float: {tie}", UserWarning, stacklevel=3)
            continue
        new = built.get(id(mod))
        if new is None:
            try:
                new = builders[type_key(mod)](mod, path, settings, cache)
            except Unsupported as e:
                result.kept[path] = str(e)
                continue
            except ValueError as e:  # the same error type (e.g. an accumulator bound), the layer named
                e.args = (f"layer '{path}' ({type(mod).__name__}): {e}", *e.args[1:])
                raise
            built[id(mod)] = new
        result.info[path] = {"class": type_key(mod), "params": {n: list(t.shape) for n, t in mod.named_parameters()}}
        _set(model, path, new.eval())
        result.swapped.append(path)
    finish_swap(model)
    return result



def _foreign_tie(mod: nn.Module, path: str, cand_paths: list[str], owners: dict[int, list[tuple[str, nn.Module]]]
                 ) -> str | None:
    """Why ``mod`` must stay float to keep a weight tie with a module that is not replaced, else None."""
    for t in mod.parameters():
        for other, om in owners.get(id(t), []):
            if _inside(other, path) or any(_inside(other, c) for c in cand_paths):
                continue
            return f"its weights are shared with '{other}' ({type(om).__name__}), which stays float"
    return None


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def finish_swap(model: nn.Module) -> None:
    """After layers were replaced: eval mode, no gradients (an inference model), and torch's transformer
    encoders kept off their fused fast path, which reads float weights from the layers it runs (each
    layer then runs its own modules)."""
    for m in model.modules():
        if type(m) is nn.TransformerEncoder:
            m.use_nested_tensor = False
            m.enable_nested_tensor = False
    model.eval().requires_grad_(False)
