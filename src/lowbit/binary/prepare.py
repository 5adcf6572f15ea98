"""``lowbit.binary.prepare``: a float model -> a fake-binary model any training loop can train.

The model is traced and canonicalized by :func:`lowbit.graph.prepare` (BatchNorm folded, ReLU fused).
With binary activations (``bits=(1, 1)``):

* every layer not kept float becomes a :class:`~lowbit.binary.modules.BinaryLayer` whose weights go through
  a ±1 :class:`~lowbit.quantizers.Binarizer` (the first and the last layer: an 8-bit fake quantizer);
* every layer that does not read the model input takes signs: a Binarizer goes right before it (one per
  input value), and a conv pads its signs with ``pad_value``;
* a layer whose output only reaches sign-taking layers (through max-pooling, flattening, ReLU) gets a
  :class:`~lowbit.binary.modules.SignBatchNorm` after it, initialized to the identity on the calibration
  batch (the trained BatchNorm was folded into the layer), and loses its fused ReLU (``sign(relu(y)) =
  sign(y)``, and the ReLU would cut the gradient): at convert time the BatchNorm and the sign become the
  layer's per-channel threshold;
* the layers reading the model input take 8-bit codes (an 8-bit fake quantizer on the input).

With ``bits=(1, A)``, A > 1 (binary weights only) the model is :func:`lowbit.qat.prepare_graph`'s, with
Binarizers on the weights. Either way the model records the stages of gradual freezing
(:mod:`lowbit.binary.stages`) and every binarizer starts in the state its first stage needs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn

from lowbit.graph import Prepared
from lowbit.graph import prepare as prepare_float
from lowbit.graph._names import fresh_path, set_submodule
from lowbit.graph.attrs import set_preserved
from lowbit.methods.base import calibration_batches, check_calibration, is_layer, layer_of, resolve_method
from lowbit.methods.binary import BinaryMethod
from lowbit.qat.prepare import is_passthrough, source_node

from .modules import BinaryLayer, SignBatchNorm
from .stages import plan_stages, reset_stages

__all__ = ["prepare", "prepare_graph", "binary_info", "BINARY_FORMAT_VERSION"]

BINARY_FORMAT_VERSION = 1


def binary_info(model: Any) -> dict[str, Any] | None:
    """The description :func:`prepare` attaches to a fake-binary model (None for any other model)."""
    from lowbit.graph.attrs import get_preserved

    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return get_preserved(model, "lowbit_binary")


def _fallback_reason(layer: nn.Module, signs_in: bool, binary_w: bool, pad_value: int) -> str | None:
    """Why the binary kernels cannot run a layer that is binary in training (it then runs on the int8
    kernels with its ±1 codes), or None."""
    if not (signs_in and binary_w):
        return None
    if isinstance(layer, nn.Conv1d):
        return "1-D convolution (the binary kernels run 2-D convolutions and linear layers)"
    if isinstance(layer, nn.Conv2d) and pad_value == 0 and any(layer.padding):  # type: ignore[arg-type]
        return "zero padding (pad_value=0): binary kernels pad with +1 or -1"
    return None


def _users_through(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The consumers of ``node``'s value, looking through pass-through ops (ReLU, pooling, flatten)."""
    out, todo = [], list(node.users)
    while todo:
        u = todo.pop()
        if is_passthrough(gm, u) and not _is_avg_pool(gm, u):
            todo.extend(u.users)
        else:
            out.append(u)
    return out


def _is_avg_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)),
                                                   (nn.AvgPool2d, nn.AdaptiveAvgPool2d))


def _insert_before(gm: fx.GraphModule, user: fx.Node, arg: fx.Node, base: str, module: nn.Module) -> fx.Node:
    name = fresh_path(gm, base)
    set_submodule(gm, name, module)
    with gm.graph.inserting_before(user):
        new = gm.graph.call_module(name, (arg,))
    user.replace_input_with(arg, new)
    return new


def _insert_after(gm: fx.GraphModule, node: fx.Node, base: str, module: nn.Module) -> fx.Node:
    name = fresh_path(gm, base)
    set_submodule(gm, name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    return new


class _Inputs(fx.Interpreter):
    """Records the first input of chosen nodes and the minimum of every node's output on one batch."""

    def __init__(self, gm: fx.GraphModule, watch: set[str]) -> None:
        super().__init__(gm)
        self.watch, self.inputs, self.min = watch, {}, {}

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.watch:
            self.inputs[n.name] = self.env[n.args[0]]
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
            self.min[n.name] = float(out.min())
        return out


def _bnn_graph(prepared: Prepared, method: BinaryMethod, batch: torch.Tensor) -> tuple[fx.GraphModule, list[str],
                                                                                      list[dict[str, str]]]:
    gm = copy.deepcopy(prepared.gm)
    cfg = method.bcfg
    rec = _Inputs(gm, set())
    with torch.no_grad():
        rec.run(batch)
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and is_layer(gm.get_submodule(str(n.target)))
             and not cfg.layer(str(n.target)).keep_float]
    order = list(dict.fromkeys(str(n.target) for n in nodes))
    if not order:
        raise ValueError("the model has no layer to binarize (conv/linear with zero padding), or all are kept float")
    edge = {order[0], order[-1]} if cfg.first_last_bits is not None else set()
    signs_in = {str(n.target): source_node(gm, n.args[0]).op != "placeholder" for n in nodes}
    fallback: list[dict[str, str]] = []

    # --- layers ----------------------------------------------------------------------------------------
    for t in order:
        layer, act = layer_of(gm.get_submodule(t))
        binary_w = t not in edge
        wq = method.weight_quantizer(layer.weight, 1 if binary_w else (cfg.first_last_bits or 8), t)
        if not binary_w:
            wq.initialize(layer.weight.detach())
        conv = isinstance(layer, (nn.Conv1d, nn.Conv2d))
        pad = cfg.pad_value if signs_in[t] and conv and cfg.pad_value != 0 else None
        why = _fallback_reason(layer, signs_in[t], binary_w, cfg.pad_value)
        if why is not None:
            fallback.append({"layer": t, "reason": why})
        int8_kernel = not (binary_w and signs_in[t]) or why is not None
        set_submodule(gm, t, BinaryLayer(layer, act, wq, pad, int8_kernel))

    # --- BatchNorm before the signs ------------------------------------------------------------------
    bn_nodes: list[fx.Node] = []
    for n in [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) in signs_in]:
        users = _users_through(gm, n)
        if users and all(u.op == "call_module" and signs_in.get(str(u.target), False) for u in users):
            mod = gm.get_submodule(str(n.target))
            mod.act = None
            bn = SignBatchNorm(mod.layer.weight.shape[0])
            bn_nodes.append(_insert_after(gm, n, f"{str(n.target).replace('.', '_')}_bn", bn))

    # --- input quantizers: a Binarizer before each sign-taking layer, 8 bits on the model input ---------
    shared: dict[fx.Node, nn.Module] = {}
    for n in [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) in signs_in]:
        t, x = str(n.target), n.args[0]
        mod = gm.get_submodule(t)
        if x in shared:
            q = shared[x]
            n.replace_input_with(x, next(u for u in x.users if u.op == "call_module"
                                         and gm.get_submodule(str(u.target)) is q))
        else:
            if signs_in[t]:
                q = method.binarizer("act", f"ab_{x.name}")
                base = f"ab_{x.name}"
            else:
                bits = cfg.first_last_bits if t in edge and cfg.first_last_bits else 8
                q = method.act_quantizer(bits, rec.min.get(source_node(gm, x).name, -1.0) < 0, x.name)
                base = f"aq_{x.name}"
            _insert_before(gm, n, x, base, q)
            shared[x] = q
        mod.set_input_quantizer(q)  # type: ignore[operator]
    gm.graph.lint()
    gm.recompile()

    # --- initialize: BatchNorms to the identity, 8-bit quantizers on the batch ---------------------------
    gm.eval()
    rec = _Inputs(gm, {n.name for n in bn_nodes})
    with torch.no_grad():
        rec.run(batch)
    for n in bn_nodes:
        gm.get_submodule(str(n.target)).init_identity(rec.inputs[n.name])  # type: ignore[operator]
    return gm, order, fallback


def prepare_graph(prepared: Prepared, method: BinaryMethod, calib: list[torch.Tensor]) -> fx.GraphModule:
    """The fake-binary model of a prepared float graph (see the module docstring), in training mode."""
    from lowbit.qat import prepare_graph as qat_prepare_graph
    from lowbit.qat.prepare import qat_info

    if not calib:
        raise ValueError("lowbit.binary.prepare needs calibration data (one batch or more)")
    cfg = method.bcfg
    if cfg.binary_activations:
        gm, order, fallback = _bnn_graph(prepared, method, calib[0])
    else:
        gm = qat_prepare_graph(prepared, method, calib)
        order, fallback = list(qat_info(gm)["layers"]), []  # type: ignore[index]
    stages = plan_stages(gm, order, cfg)
    info = {"version": BINARY_FORMAT_VERSION, "method": method.name, "config": cfg.to_dict(), "layers": order,
            "stages": stages, "fallback": fallback, "unsupported": list(prepared.unsupported), "trained": False,
            "example_shape": [1, *calib[0].shape[1:]]}
    set_preserved(gm, "lowbit_binary", info)
    reset_stages(gm)
    gm.train()
    return gm


def prepare(model: nn.Module, method: Any = "binary_ste", example_input: torch.Tensor | None = None,
            calib: Any = None, config: Any = None, **options: Any) -> fx.GraphModule:
    """A fake-binary copy of ``model`` for ``method`` (``"binary_ste"``, ``"ubq"`` or a config object such as
    ``UBQConfig(noise="gauss")``); ``options`` are config fields. ``calib``: data whose first batch initializes
    the BatchNorms before the signs and the 8-bit quantizers. Train it with :func:`lowbit.binary.train` (which
    runs the stages of gradual freezing) or your own loop (see :mod:`lowbit.binary.stages`), then
    :func:`lowbit.binary.convert`. ``model`` itself is not modified."""
    cls, config = resolve_method(method, config)
    if not issubclass(cls, BinaryMethod):
        raise ValueError(f"method {cls.name!r} is not a binary-network method (binary_ste, ubq)")
    m = cls(config, **options)
    batches = calibration_batches(calib, m.config.calib_samples, m.config.calib_batch_size)
    if example_input is None:
        if not batches:
            raise ValueError("pass calibration data (calib=) to initialize the BatchNorms and 8-bit quantizers")
        example_input = batches[0][:1]
    check_calibration(batches, example_input, cls.name)
    return prepare_graph(prepare_float(model, example_input), m, batches)
