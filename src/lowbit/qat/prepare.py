"""``lowbit.qat.prepare``: a float model -> a fake-quant model any training loop can train.

The model is traced and canonicalized by :func:`lowbit.graph.prepare` (BatchNorm folded into the
preceding conv/linear with its running statistics — they stay frozen during quantization-aware training,
the usual practice when fine-tuning a trained network — dropout removed, ReLU fused). Then every layer
not kept float becomes a :class:`~lowbit.qat.modules.QATLayer` with the method's weight quantizer, and an
activation quantizer goes after every value the integer model will hold as codes: the input of each
quantized layer (traced back through ReLU, pooling and flatten), each quantized layer's output (unless it
only feeds the model output: the last layer then writes float32), each residual add. Activation
quantizers are signed or unsigned by the sign of the value on the calibration batch. The first and the
last layer (in execution order) and their inputs use ``first_last_bits``.
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
from torch import fx, nn

from lowbit.graph import Prepared
from lowbit.graph import prepare as prepare_float
from lowbit.graph._names import fresh_path, set_submodule
from lowbit.graph.attrs import get_preserved, set_preserved
from lowbit.methods.base import QuantConfig, calibration_batches, check_calibration, is_layer, layer_of, resolve_method
from lowbit.methods.qat import QATMethod
from lowbit.quantizers import FakeQuantizer

from .modules import PoolRequant, QATLayer

__all__ = ["prepare", "prepare_graph", "qat_info", "source_node", "is_passthrough", "QAT_FORMAT_VERSION"]

QAT_FORMAT_VERSION = 1


def qat_info(model: Any) -> dict[str, Any] | None:
    """The description :func:`prepare` attaches to a fake-quant model (None for any other model)."""
    model = getattr(model, "module", model) if not isinstance(model, fx.GraphModule) else model
    return get_preserved(model, "lowbit_qat")


def is_passthrough(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Ops that keep codes as codes of the same spec: ReLU/ReLU6 (a clamp), max/avg pooling, flatten, and the
    pooling requantizers."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, nn.MaxPool2d):
            return not mod.return_indices
        return isinstance(mod, (nn.ReLU, nn.ReLU6, nn.AvgPool2d, nn.AdaptiveAvgPool2d, PoolRequant))
    return node.op == "call_function" and node.target is torch.flatten


def source_node(gm: fx.GraphModule, node: Any) -> Any:
    """The node whose codes ``node`` carries: back through pass-through ops."""
    while isinstance(node, fx.Node) and is_passthrough(gm, node):
        node = node.args[0]
    return node


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.add, torch.add) and len(node.args) == 2
            and all(isinstance(a, fx.Node) for a in node.args) and not node.kwargs)


class _Recorder(fx.Interpreter):
    """Records the minimum of every node's output and the shape of its first input on one batch."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.min: dict[str, float] = {}
        self.in_shape: dict[str, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
            self.min[n.name] = float(out.min())
        if n.args and isinstance(n.args[0], fx.Node):
            x = self.env.get(n.args[0])
            if isinstance(x, torch.Tensor):
                self.in_shape[n.name] = tuple(x.shape)
        return out


def _pool_counts(mod: nn.Module, in_shape: tuple[int, ...]) -> torch.Tensor | int:
    from lowbit.kernels.reference import adaptive_counts
    from lowbit.nn.base import pair

    if isinstance(mod, nn.AdaptiveAvgPool2d):
        oh, ow = pair(mod.output_size)
        ch = adaptive_counts(in_shape[-2], oh)
        cw = adaptive_counts(in_shape[-1], ow)
        return (ch[:, None] * cw[None, :]).to(torch.float32)
    kh, kw = pair(mod.kernel_size)
    return kh * kw


def _add_module_node(gm: fx.GraphModule, after: fx.Node, base: str, module: nn.Module) -> fx.Node:
    name = fresh_path(gm, base)
    set_submodule(gm, name, module)
    with gm.graph.inserting_after(after):
        new = gm.graph.call_module(name, (after,))
    after.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    return new


def prepare_graph(prepared: Prepared, method: QATMethod, calib: list[torch.Tensor],
                  example_input: torch.Tensor | None = None) -> fx.GraphModule:
    """Insert ``method``'s quantizers into a prepared float graph (see the module docstring) and initialize
    them: weight steps from the weights; activation steps on the first calibration batch, or, without
    calibration data, on the first batch the model sees (then ``example_input`` decides the signs).

    ``method``: a :class:`QATMethod`, or any method object with the same ``config``, ``precision``,
    ``weight_quantizer`` and ``act_quantizer`` (e.g. the 4.6-bit family, whose precisions are level counts)."""
    gm = copy.deepcopy(prepared.gm)
    cfg = method.config
    batch = calib[0] if calib else example_input
    if batch is None:
        raise ValueError("lowbit.qat.prepare needs calibration data or an example input")
    rec = _Recorder(gm)
    with torch.no_grad():
        rec.run(batch)

    # --- layers ----------------------------------------------------------------------------------
    layer_nodes = [n for n in gm.graph.nodes if n.op == "call_module" and is_layer(gm.get_submodule(str(n.target)))
                   and not cfg.layer(str(n.target)).keep_float]
    order: list[str] = []
    for n in layer_nodes:
        if str(n.target) not in order:
            order.append(str(n.target))
    if not order:
        raise ValueError("the model has no layer to quantize (conv/linear with zero padding), or all are kept float")
    bits_of = method.precision(order)
    a_bits = bits_of(None)[1]

    done: dict[str, QATLayer] = {}
    for n in layer_nodes:
        t = str(n.target)
        if t not in done:
            layer, act = layer_of(gm.get_submodule(t))
            wq = method.weight_quantizer(layer.weight, bits_of(t)[0], t)
            wq.initialize(layer.weight.detach())
            done[t] = QATLayer(layer, act, wq)
            set_submodule(gm, t, done[t])

    # --- values that become codes ------------------------------------------------------------------
    need: dict[fx.Node, int] = {}

    def want(node: Any, bits: int) -> None:
        src = source_node(gm, node)
        if isinstance(src, fx.Node):
            need[src] = max(need.get(src, 0), bits)

    for n in list(gm.graph.nodes):
        if n.op == "call_module" and str(n.target) in done:
            want(n.args[0], bits_of(str(n.target))[1])
            if any(u.op != "output" for u in n.users):
                need[n] = max(need.get(n, 0), a_bits)
        elif _is_add(n) and any(source_node(gm, a) in need or source_node(gm, a) in layer_nodes for a in n.args):
            for a in n.args:
                want(a, a_bits)
            need[n] = max(need.get(n, 0), a_bits)

    quantizer_of: dict[fx.Node, FakeQuantizer] = {}
    for src, bits in need.items():
        signed = rec.min.get(src.name, -1.0) < 0
        q = method.act_quantizer(bits, signed, src.name)
        quantizer_of[src] = q
        _add_module_node(gm, src, f"aq_{src.name}", q)

    # --- pooling requantizers, input quantizers of the layers ---------------------------------------
    for n in list(gm.graph.nodes):
        if n.op != "call_module":
            continue
        mod = gm.get_submodule(str(n.target))
        if isinstance(mod, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            src = source_node(gm, n.args[0])
            q = quantizer_of.get(_quantizer_source(gm, src)) if isinstance(src, fx.Node) else None
            if q is not None:
                counts = _pool_counts(mod, rec.in_shape[n.name])
                _add_module_node(gm, n, f"{n.target}_requant", PoolRequant(q, counts))
        elif isinstance(mod, QATLayer):
            src = source_node(gm, n.args[0])
            mod.set_input_quantizer(gm.get_submodule(str(src.target)) if _is_quantizer(gm, src) else None)

    gm.graph.lint()
    gm.recompile()
    if calib:
        _initialize_activations(gm, calib)
    gm.train()
    info = {"version": QAT_FORMAT_VERSION, "method": method.name, "config": cfg.to_dict(), "layers": order,
            "unsupported": list(prepared.unsupported)}
    set_preserved(gm, "lowbit_qat", info)
    return gm


def _is_quantizer(gm: fx.GraphModule, node: Any) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_module"
            and isinstance(gm.get_submodule(str(node.target)), FakeQuantizer))


def _quantizer_source(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """For a quantizer node, the node it quantizes; else the node itself."""
    return node.args[0] if _is_quantizer(gm, node) else node


def _initialize_activations(gm: fx.GraphModule, calib: list[torch.Tensor]) -> None:
    """One pass over the first calibration batch initializes every activation quantizer (each sees the
    output of the already quantized layers before it)."""
    with torch.no_grad():
        gm.eval()
        gm(calib[0])


def prepare(
    model: nn.Module,
    method: str | QuantConfig = "lsq",
    example_input: torch.Tensor | None = None,
    calib: Any = None,
    config: QuantConfig | dict[str, Any] | None = None,
    **options: Any,
) -> fx.GraphModule:
    """A fake-quant copy of ``model`` for training-aware ``method`` (a name such as ``"lsq"`` or a config
    object such as ``LSQConfig(bits=(4, 4))``), trainable by any loop; ``options`` are config fields.

    calib: data to initialize the activation steps (a tensor [N, ...], a Dataset, a DataLoader or batches;
    the first ``calib_samples`` samples are used); example_input (one batch) is taken from it if not given.
    Without ``calib`` the activation steps are initialized on the first batch the model sees (as the LSQ
    paper does; under torch.distributed rank 0's batch decides), and ``example_input`` — a few samples,
    at least one — serves to trace the model. The result is an ``nn.Module`` in training mode;
    :func:`lowbit.qat.convert` turns it into an integer model. ``model`` itself is not modified.
    """
    cls, config = resolve_method(method, config)
    if not issubclass(cls, QATMethod):
        raise ValueError(f"method {cls.name!r} is not a training-aware method; use lowbit.quantize for it "
                         f"(training-aware: {', '.join(_qat_methods())})")
    m = cls(config, **options)
    batches = calibration_batches(calib, m.config.calib_samples, m.config.calib_batch_size)
    if example_input is None:
        if not batches:
            raise ValueError("pass calibration data (calib=) or an example input batch (example_input=)")
        example_input = batches[0][:1]
    if calib is not None:
        check_calibration(batches, example_input, cls.name)
    return prepare_graph(prepare_float(model, example_input), m, batches, example_input)


def _qat_methods() -> list[str]:
    from lowbit.methods import METHODS

    return [n for n, c in METHODS.items() if issubclass(c, QATMethod)]

