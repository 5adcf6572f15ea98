"""Capture a model — float, or with lowbit's layers swapped in — as a graph a lowbit file can hold.

:func:`capture` runs ``torch.export`` (non-strict: the model's Python runs once on an example, control
flow that depends on sizes or settings is resolved, control flow on tensor values is an error) with
lowbit's modules as leaf ops (:mod:`lowbit.graph.leaf`), and converts the program into a
``torch.fx.GraphModule`` of ATen calls (from the allow-list a file may hold), calls of lowbit's modules
and constant tensors. Every size that can vary stays variable (``torch.export.Dim.AUTO``); the sizes the
model's code fixes are checked on entry (:class:`lowbit.nn.CheckShape`). The graph is run on the example
and must reproduce the model's output, or the capture is refused.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from .exported import convert_exported
from .leaf import leaves

__all__ = ["CaptureError", "add_input_checks", "capture", "input_checks", "restore_input_checks"]


class CaptureError(RuntimeError):
    """The model cannot be captured as a graph (the message says why)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]


def _widen(x: torch.Tensor) -> torch.Tensor:
    """A batch of one sample repeated to two, so that export does not fix the batch size at 1."""
    return torch.cat([x, x]) if x.dim() and x.shape[0] == 1 else x


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.export's own warnings and logged graph dumps stay out of the user's console (a failure is
    one CaptureError saying why)."""
    loggers = [logging.getLogger(n) for n in ("torch.fx.experimental.symbolic_shapes", "torch._export",
                                              "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):  # torch prints failed graphs
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def _export(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    auto = torch.export.Dim.AUTO
    dynamic = tuple({d: auto for d in range(t.dim())} for t in inputs)
    with _quiet():
        try:
            ep = torch.export.export(model, inputs, dynamic_shapes=dynamic, strict=False)
        except Exception as e:
            raise CaptureError(f"torch.export cannot capture {type(model).__name__}: {_first_line(e)}") from e
    ep.graph.eliminate_dead_code()  # e.g. the shape-only calls of the leaves' meta_forward
    return ep


def _inputs(example: Any) -> tuple[torch.Tensor, ...]:
    inputs = tuple(_widen(t) for t in (example if isinstance(example, (tuple, list)) else (example,)))
    if not all(isinstance(t, torch.Tensor) for t in inputs):
        raise CaptureError("the example input must be a tensor or a tuple of tensors")
    return inputs


def capture(model: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """``model`` as a GraphModule a lowbit file can hold; :class:`CaptureError` if it cannot be captured."""
    inputs = _inputs(example)
    model = model.eval()
    with leaves(model) as found:
        ep = _export(model, inputs)
    try:
        gm = convert_exported(ep, check=False, modules=False, leaves=found)
    except NotImplementedError as e:
        raise CaptureError(str(e)) from e
    add_input_checks(gm, ep)
    _compare(model, gm, inputs)
    return gm


def export_graph(model: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """A float model's graph for the quantizers (static, full_integer) through torch.export: its conv,
    linear, batch-norm, ReLU and pooling ops as torch.nn modules, every other op an ATen call."""
    inputs = _inputs(example)
    ep = _export(model.eval(), inputs)
    gm = convert_exported(ep, check=False, modules=True)
    _compare(model, gm, inputs)
    return gm


def add_input_checks(gm: fx.GraphModule, ep: Any) -> None:
    """A :class:`~lowbit.nn.CheckShape` after every input of ``gm`` (converted from the program ``ep``): its
    dtype and the sizes export fixed (the others, dynamic, any size)."""
    from lowbit.nn import CheckShape

    vals = [n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder" and n.name in
            {s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"}]
    checks = {i: CheckShape(i, str(val.dtype).removeprefix("torch."),
                            [int(d) if isinstance(d, int) else None for d in val.shape]) for i, val in enumerate(vals)}
    _insert_checks(gm, checks)


def _insert_checks(gm: fx.GraphModule, checks: dict[int, nn.Module]) -> None:
    """Each check module called on its input (by index) before anything else reads that input."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, chk in checks.items():
        name = f"input_check_{i}"
        while hasattr(gm, name):
            name += "_"
        gm.add_submodule(name, chk)
        with gm.graph.inserting_after(phs[i]):
            node = gm.graph.call_module(name, (phs[i],))
        phs[i].replace_all_uses_with(node, delete_user_cb=lambda u, c=node: u is not c)
    gm.graph.lint()
    gm.recompile()


def input_checks(model: nn.Module) -> dict[int, Any]:
    """The :class:`~lowbit.nn.CheckShape` reading each input of a graph (a loaded ``.pt2``), by input index."""
    from lowbit.nn import CheckShape

    if not isinstance(model, fx.GraphModule):
        return {}
    found = {}
    for i, ph in enumerate(n for n in model.graph.nodes if n.op == "placeholder"):
        for u in ph.users:
            if u.op == "call_module" and isinstance(model.get_submodule(u.target), CheckShape):
                found[i] = model.get_submodule(u.target)
    return found


def restore_input_checks(gm: fx.GraphModule, checks: dict[int, Any], inputs: Any) -> None:
    """Put the entry checks of the float graph (:func:`input_checks`) after the inputs of its quantized
    graph (which the quantizers built without them); an input the quantized graph takes as integer codes
    (``inputs``: the meta's input description) is checked for that dtype."""
    from lowbit.nn import CheckShape

    if not checks:
        return
    descs = inputs if isinstance(inputs, list) else [inputs]

    def dtype(i: int, chk: Any) -> str:
        d = descs[i].get("dtype") if i < len(descs) and isinstance(descs[i], dict) else None
        return d if d in ("int8", "uint8") else chk.dtype

    _insert_checks(gm, {i: CheckShape(i, dtype(i, c), list(c.shape)) for i, c in checks.items()})


def _compare(model: nn.Module, gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> None:
    with torch.no_grad():
        want = pytree.tree_leaves(model(*inputs))
        got = pytree.tree_leaves(gm(*inputs))
    want = [t for t in want if isinstance(t, torch.Tensor)]
    got = [t for t in got if isinstance(t, torch.Tensor)]
    if len(want) != len(got):
        raise CaptureError(f"the captured graph returns {len(got)} tensors, the model {len(want)}")
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        if w.shape != g.shape or w.dtype != g.dtype:
            raise CaptureError(f"output {i} of the captured graph is {g.dtype} {tuple(g.shape)}, "
                               f"the model's {w.dtype} {tuple(w.shape)}")
        if w.is_floating_point():
            scale = float(w.abs().max()) if w.numel() else 0.0
            ok = torch.allclose(g, w, rtol=1e-4, atol=1e-5 * max(scale, 1e-6), equal_nan=True)
        else:
            ok = torch.equal(g, w)
        if not ok:
            raise CaptureError(f"output {i} of the captured graph differs from the model's (max difference "
                               f"{float((g.double() - w.double()).abs().max()):.3g}); the model's result depends on "
                               "something export does not see")
