"""``lowbit.binary.convert``: a trained fake-binary model -> its execution form on lowbit's kernels.

Each value of the new graph is float32, 8-bit codes of a :class:`~lowbit.formats.QSpec`, or packed signs
(:mod:`lowbit.nn.binary`). Per layer of the fake-binary model:

* ±1 weights and signs in -> :class:`~lowbit.nn.QBinaryConv` / :class:`~lowbit.nn.QBinaryLinear` on the
  XNOR-popcount kernels. If every consumer of its output takes signs (through its BatchNorm, max-pooling,
  flattening, ReLU), it writes packed signs: with ``y = α·dot + b`` and the BatchNorm ``z = a·y + c``,
  ``z > 0`` is ``A·dot + B > 0`` (``A = aα``, ``B = ab + c``), i.e. for the integer ``dot``:
  ``dot >= floor(-B/A) + 1`` when ``A > 0``, ``not (dot >= ceil(-B/A))`` when ``A < 0`` (the flip; a
  negative γ), a constant when ``A = 0``. Otherwise it writes float32 ``α·dot + b``. A linear layer
  reading a flattened map of signs runs as a convolution with the map's size as kernel;
* 8-bit weights (first and last layers) -> :class:`~lowbit.nn.QConv` / :class:`~lowbit.nn.QLinear` on the
  int8 kernels, fed 8-bit codes, or signs unpacked to the codes ``{0, 2}`` (zero point 1); their float
  output goes through :class:`~lowbit.nn.QSignBits` (the same threshold, on the float value) when signs
  follow;
* ±1 weights the binary kernels cannot run (``binary_fallback``) -> the int8 kernels with ±1 codes.

Because the fake-binary model's frozen BatchNorms and exact signs compute the same function, the
integer model gives the same predictions up to float rounding at exact ties.
"""

from __future__ import annotations

import copy
import math
import operator
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from lowbit.formats.affine import quantize_bias
from lowbit.formats.qspec import QSpec
from lowbit.graph.attrs import set_preserved
from lowbit.nn import (
    Dequantize,
    QBinaryConv,
    QBinaryLinear,
    QBitMaxPool2d,
    QConv,
    QLinear,
    QMaxPool2d,
    QSignBits,
    Quantize,
    QUnpackBits,
)
from lowbit.nn.binary import SIGN_SPEC
from lowbit.quantizers import Binarizer, FakeQuantizer

from .modules import BinaryLayer, SignBatchNorm
from .prepare import binary_info

__all__ = ["convert"]

_SIGN_KERNEL_SPEC = SIGN_SPEC.unsigned()  # codes {0, 2}, zero point 1
_SIGN_PRESERVING = (nn.ReLU, nn.ReLU6)


@dataclass(frozen=True)
class Bits:
    """Packed signs of ``channels`` channels: a map ``[B, H, W, words]`` or a vector ``[B, words]``;
    ``flat``: a map flattened (NCHW order) in the graph but kept as a map, ``(C, H, W)``."""

    channels: int
    map: bool
    flat: tuple[int, int, int] | None = None


Domain = None | QSpec | Bits


class _Shapes(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[str, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n.name] = tuple(out.shape)
        return out


def _is_binarizer(gm: fx.GraphModule, n: Any) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), Binarizer)


def _mod(gm: fx.GraphModule, n: fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(n.target)) if n.op == "call_module" else None


def _sign_path(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Whether every consumer of ``n`` (through its BatchNorm, ReLU, max-pooling, flattening) is a binarizer."""
    todo, seen = list(n.users), 0
    while todo:
        u = todo.pop()
        m = _mod(gm, u)
        if isinstance(m, (SignBatchNorm, *_SIGN_PRESERVING)) or (isinstance(m, nn.MaxPool2d) and not m.return_indices) \
                or (u.op == "call_function" and u.target is torch.flatten):
            todo.extend(u.users)
        elif _is_binarizer(gm, u):
            seen += 1
        else:
            return False
    return seen > 0


def _bn_after(gm: fx.GraphModule, n: fx.Node) -> SignBatchNorm | None:
    users = list(n.users)
    if len(users) == 1 and isinstance(_mod(gm, users[0]), SignBatchNorm):
        return gm.get_submodule(str(users[0].target))  # type: ignore[return-value]
    return None


def _affine(bn: SignBatchNorm | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    if bn is None:
        return torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    if not bool(bn.frozen) and bn.training:
        raise ValueError("convert the model in eval mode (its BatchNorms must use their running statistics)")
    return bn.scale_shift()


def int_threshold(scale: torch.Tensor, bias: torch.Tensor | None, bn: SignBatchNorm | None, k: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(thr, flip)`` with ``(dot >= thr) XOR flip == (a(scale·dot + bias) + c > 0)`` for integer dots in
    ``[-k, k]`` (see the module docstring)."""
    n = scale.numel()
    a, c = _affine(bn, n)
    b = torch.zeros(n, dtype=torch.float64) if bias is None else bias.detach().double()
    big_a = a * scale.detach().double()
    big_b = a * b + c
    thr = torch.empty(n, dtype=torch.int64)
    flip = big_a < 0
    for i in range(n):
        A, B = float(big_a[i]), float(big_b[i])
        if A == 0.0:
            t = -(k + 1) if B > 0 else k + 1  # always +1 / always -1
        elif A > 0:
            t = math.floor(-B / A) + 1
        else:
            t = math.ceil(-B / A)
        thr[i] = min(max(t, -(k + 1)), k + 1)
    return thr.to(torch.int32), flip


def float_threshold(bn: SignBatchNorm | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(thr, flip)`` in float32 with ``(y >= thr) XOR flip == (a·y + c > 0)`` for every float32 ``y`` (the
    affine map evaluated in float64): ``thr`` is the smallest float32 on the side the comparison selects."""
    a, c = _affine(bn, n)
    thr = torch.empty(n, dtype=torch.float32)
    for i in range(n):
        A, C = float(a[i]), float(c[i])
        if A == 0.0:
            thr[i] = -math.inf if C > 0 else math.inf
            continue

        def above(y: torch.Tensor, A: float = A, C: float = C) -> bool:
            """Whether ``y`` is on the ``>= thr`` side: ``z > 0`` for A > 0, ``z <= 0`` for A < 0 (flipped)."""
            z = A * float(y) + C
            return z > 0 if A > 0 else z <= 0

        t = torch.tensor(-C / A, dtype=torch.float32)
        up, down = torch.tensor(math.inf), torch.tensor(-math.inf)
        if above(t):
            while not torch.isinf(t) and above(torch.nextafter(t, down)):
                t = torch.nextafter(t, down)
        else:
            while not torch.isinf(t) and not above(t):
                t = torch.nextafter(t, up)
        thr[i] = t
    return thr, a < 0


class _Builder:
    def __init__(self, gm: fx.GraphModule, shapes: dict[str, tuple[int, ...]], fallback: set[str]) -> None:
        self.gm, self.shapes, self.fallback = gm, shapes, fallback
        self.g = fx.Graph()
        self.root = nn.Module()
        self.env: dict[str, tuple[fx.Node, Domain]] = {}
        self.meta: dict[str, Any] = {"float_ops": [], "binary_layers": [], "int8_layers": []}

    def add(self, base: str, mod: nn.Module, *args: Any) -> fx.Node:
        name = base.replace(".", "_") or "m"
        k = 0
        while hasattr(self.root, name):
            k += 1
            name = f"{base.replace('.', '_')}_{k}"
        self.root.add_module(name, mod)
        return self.g.call_module(name, args)

    # --- domain casts ------------------------------------------------------------------------------
    def as_float(self, arg: Any) -> Any:
        if not isinstance(arg, fx.Node):
            return arg
        node, dom = self.env[arg.name]
        if isinstance(dom, Bits):
            node, dom = self.as_codes(arg)
        if isinstance(dom, QSpec):
            return self.add(f"dequant_{arg.name}", Dequantize(dom), node)
        return node

    def as_codes(self, arg: fx.Node) -> tuple[fx.Node, QSpec]:
        """Signs as 8-bit codes {0, 2} (NCHW, flattened if the graph flattened them)."""
        node, dom = self.env[arg.name]
        if isinstance(dom, QSpec):
            return node, dom
        if not isinstance(dom, Bits):
            raise ValueError(f"'{arg.name}' is float where codes are needed")
        y = self.add(f"unpack_{arg.name}", QUnpackBits(dom.channels), node)
        if dom.flat is not None:
            y = self.g.call_function(torch.flatten, (y, 1))
        return y, _SIGN_KERNEL_SPEC

    def as_bits(self, arg: fx.Node) -> tuple[fx.Node, Bits]:
        node, dom = self.env[arg.name]
        if isinstance(dom, Bits):
            return node, dom
        x = self.as_float(arg)
        c = self.shapes[arg.name][1]
        thr = torch.full((c,), float(torch.nextafter(torch.tensor(0.0), torch.tensor(1.0))))
        return self.add(f"sign_{arg.name}", QSignBits(thr), x), Bits(c, len(self.shapes[arg.name]) > 2)

    # --- layers ----------------------------------------------------------------------------------------
    def layer(self, n: fx.Node, mod: BinaryLayer) -> None:
        t = str(n.target)
        layer = mod.layer
        signs = _sign_path(self.gm, n)
        bn = _bn_after(self.gm, n) if signs else None
        n_out = layer.weight.shape[0]
        x_dom = self.env[n.args[0].name][1]
        if mod.binary_weights and isinstance(x_dom, Bits) and t not in self.fallback:
            self.binary_layer(n, mod, signs, bn)
            return
        # the int8 kernels: 8-bit weights, or ±1 weights the binary kernels cannot run / with 8-bit input
        e = mod.export()
        if isinstance(x_dom, Bits):
            x, in_spec = self.as_codes(n.args[0])
        elif isinstance(x_dom, QSpec):
            x, in_spec = self.env[n.args[0].name]
        else:
            raise ValueError(f"layer '{t}' reads float values: its input quantizer is missing")
        s_in = in_spec.per_tensor_params[0]
        bias = e["bias"]
        bq = None if bias is None else quantize_bias(bias, s_in, e["scale"])
        act = None if signs else mod.act
        if isinstance(layer, nn.Linear):
            q: nn.Module = QLinear(e["codes"], e["scale"], bq, in_spec, None, act, e["format"])
        else:
            q = QConv(e["codes"], e["scale"], bq, in_spec, None, act, e["format"], stride=layer.stride,
                      padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        y = self.add(t, q, x)
        self.meta["int8_layers"].append(t)
        if signs:
            thr, flip = float_threshold(bn, n_out)
            self.env[n.name] = (self.add(f"{t}_sign", QSignBits(thr, flip), y), Bits(n_out, y_map(layer)))
        else:
            self.env[n.name] = (y, None)

    def binary_layer(self, n: fx.Node, mod: BinaryLayer, signs: bool, bn: SignBatchNorm | None) -> None:
        t = str(n.target)
        layer = mod.layer
        x, dom = self.as_bits(n.args[0])
        e = mod.export()
        codes, alpha = e["codes"], e["scale"].reshape(-1)
        n_out = codes.shape[0]
        bias = None if layer.bias is None else layer.bias.detach()
        flat = isinstance(layer, nn.Linear) and dom.map and dom.flat is not None
        if flat:  # a linear layer on a flattened map of signs: a conv whose kernel is the whole map
            c, h, w = dom.flat  # type: ignore[misc]
            codes = codes.reshape(n_out, c, h, w)
        k = codes[0].numel()
        if signs:
            thr, flip = int_threshold(alpha, bias, bn, k)
            kw: dict[str, Any] = {"out": "bits", "thr": thr, "flip": flip}
        else:
            kw = {"out": "float", "bias": bias, "act": mod.act}
        if codes.dim() == 4:
            geo = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1} if flat else {
                "stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": layer.groups}
            q: nn.Module = QBinaryConv(codes, alpha, pad_value=mod.pad_value or -1, **kw, **geo)
        else:
            q = QBinaryLinear(codes, alpha, **kw)
        y = self.add(t, q, x)
        if flat:
            y = self.g.call_function(torch.flatten, (y, 1))
        self.meta["binary_layers"].append(t)
        out_map = codes.dim() == 4 and not flat
        self.env[n.name] = (y, Bits(n_out, out_map) if signs else None)

    # --- everything else -------------------------------------------------------------------------------
    def float_node(self, n: fx.Node) -> None:
        args = fx.node.map_arg(n.args, self.as_float)
        kwargs = fx.node.map_arg(n.kwargs, self.as_float)
        if n.op == "call_module":
            mod = copy.deepcopy(self.gm.get_submodule(str(n.target)))
            if isinstance(mod, SignBatchNorm):
                mod = _plain_bn(mod, len(self.shapes[n.name]))
            name = str(n.target).replace(".", "_")
            self.root.add_module(name, mod)
            node = self.g.create_node("call_module", name, args, kwargs, n.name)
            self.meta["float_ops"].append(f"{n.name}: {type(mod).__name__}")
        elif n.op == "get_attr":
            raise ValueError(f"constant '{n.target}' in a fake-binary model is not supported")
        else:
            node = self.g.create_node(n.op, n.target, args, kwargs, n.name)
            if n.op == "call_function" and n.target is not operator.getitem:
                self.meta["float_ops"].append(f"{n.name}: {getattr(n.target, '__name__', n.target)}")
        self.env[n.name] = (node, None)

    def node(self, n: fx.Node) -> None:
        mod = _mod(self.gm, n)
        dom = self.env[n.args[0].name][1] if n.args and isinstance(n.args[0], fx.Node) else None
        if n.op == "placeholder":
            self.env[n.name] = (self.g.placeholder(n.name), None)
        elif n.op == "output":
            out = n.args[0]
            self.g.output(fx.node.map_arg(out, self.as_float))
        elif isinstance(mod, Binarizer):
            self.env[n.name] = self.as_bits(n.args[0])
        elif isinstance(mod, FakeQuantizer):
            spec = mod.spec().unsigned()
            if isinstance(dom, QSpec):
                if dom != spec:
                    raise ValueError(f"'{n.name}' requantizes codes, which binary models do not do")
                self.env[n.name] = self.env[n.args[0].name]
            else:
                self.env[n.name] = (self.add(n.name, Quantize(spec), self.as_float(n.args[0])), spec)
        elif isinstance(mod, BinaryLayer):
            self.layer(n, mod)
        elif isinstance(dom, Bits) and (isinstance(mod, (SignBatchNorm, *_SIGN_PRESERVING))):
            self.env[n.name] = self.env[n.args[0].name]  # folded into the threshold / a no-op on signs
        elif isinstance(dom, Bits) and isinstance(mod, nn.MaxPool2d) and dom.map and dom.flat is None \
                and not mod.return_indices:
            pool = QBitMaxPool2d(mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode)
            self.env[n.name] = (self.add(str(n.target), pool, self.env[n.args[0].name][0]), dom)
        elif isinstance(dom, QSpec) and isinstance(mod, nn.MaxPool2d) and not mod.return_indices:
            pool = QMaxPool2d(mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode)
            self.env[n.name] = (self.add(str(n.target), pool, self.env[n.args[0].name][0]), dom)
        elif isinstance(dom, Bits) and n.op == "call_function" and n.target is torch.flatten and dom.map \
                and len(self.shapes[n.args[0].name]) == 4 and dom.flat is None:
            c, h, w = self.shapes[n.args[0].name][1:]
            self.env[n.name] = (self.env[n.args[0].name][0], Bits(dom.channels, True, (c, h, w)))
        else:
            self.float_node(n)


def y_map(layer: nn.Module) -> bool:
    """Whether the layer's output has spatial dimensions (a map, not a vector)."""
    return isinstance(layer, (nn.Conv1d, nn.Conv2d))


def _plain_bn(bn: SignBatchNorm, dim: int) -> nn.Module:
    cls = nn.BatchNorm2d if dim == 4 else nn.BatchNorm1d
    out = cls(bn.num_features, bn.eps)
    out.load_state_dict({k: v for k, v in bn.state_dict().items() if k != "frozen"})
    return out.eval()


def _check_ready(gm: nn.Module, info: dict[str, Any]) -> None:
    bins = {n: m for n, m in gm.named_modules() if isinstance(m, Binarizer)}
    if not info.get("trained") and not any(int(m.seen_steps) > 0 for m in bins.values()):
        raise ValueError("this binary model was never trained: train it (lowbit.binary.train or your own loop in "
                         "training mode) before convert")
    soft = []
    for name, m in bins.items():
        if not bool(m.enabled):
            raise ValueError(f"binarizer '{name}' is off: its stage of gradual freezing never ran, so the model is "
                             "not binary yet")
        if m.delta() > 0:
            soft.append(f"{name} (δ={m.delta():.3g})")
    if soft:
        warnings.warn(f"the model is not yet exactly binary: {', '.join(soft[:4])} still use a soft sign; the "
                      "converted model uses the exact sign and may predict differently", UserWarning, stacklevel=3)


def convert(model: nn.Module) -> fx.GraphModule:
    """The execution form of a fake-binary model made by :func:`lowbit.binary.prepare` and trained (see the
    module docstring). Returns a GraphModule in eval mode whose ``lowbit_meta`` records the method, its
    configuration, the layers on the binary and on the int8 kernels and ``binary_fallback`` (layers the
    binary kernels cannot run, with the reason); ``lowbit.save`` writes it like any lowbit model."""
    from lowbit.qat import convert as qat_convert

    gm = model
    while isinstance(gm, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        gm = gm.module
    info = binary_info(gm)
    if info is None or not isinstance(gm, fx.GraphModule):
        raise ValueError("lowbit.binary.convert takes a model made by lowbit.binary.prepare (this one was not "
                         "prepared as a binary network)")
    _check_ready(gm, info)
    was_training = gm.training
    gm.eval()
    try:
        if info["config"]["bits"][1] != 1:
            out = qat_convert(gm)
            meta = dict(out.lowbit_meta)
        else:
            out, meta = _convert_bnn(gm, info)
    finally:
        gm.train(was_training)
    meta.update(method=info["method"], config=info["config"], binary_fallback=list(info["fallback"]),
                unsupported=list(info["unsupported"]))
    set_preserved(out, "lowbit_meta", meta)
    return out.eval()


def _convert_bnn(gm: fx.GraphModule, info: dict[str, Any]) -> tuple[fx.GraphModule, dict[str, Any]]:
    rec = _Shapes(gm)
    with torch.no_grad():
        rec.run(torch.zeros(info["example_shape"]))
    b = _Builder(gm, rec.shapes, {f["layer"] for f in info["fallback"]})
    with torch.no_grad():
        for n in gm.graph.nodes:
            b.node(n)
    new = fx.GraphModule(b.root, b.g)
    new.graph.eliminate_dead_code()
    new.recompile()
    meta = dict(b.meta, input={"dtype": "float32"}, output={"dtype": "float32"}, float_layers=[])
    return new, meta
