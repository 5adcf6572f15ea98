"""Compile a converted integer model into a plan: one checked list of native kernel calls.

:func:`build_plan` walks the model's node list (a torch.fx graph made by ``lowbit.quantize``, or the
node list of a loaded file) for one input shape and dtype and turns every node into a step on NHWC
buffers: the input quantize (float NCHW -> uint8 NHWC, in one pass), integer convolutions (GEMM,
grouped, depthwise), linear layers, residual adds, clamps (ReLU / ReLU6 on codes), max / average /
adaptive pooling, flatten (free, or one relayout when the map is larger than 1x1), dequantize and the
final copy into the caller's NCHW output. Then it fuses:

* a clamp into the add or convolution that produces its input (when it is that value's only use):
  ``clamp(clamp(v, a, b), c, d) == clamp(v, max(a, c), min(b, d))`` when the ranges overlap;
* a residual add into the epilogue of the convolution producing one of its operands (that value's only
  use, its requantized uint8 codes, the add's zero point for it; the other operand computed earlier):
  the kernel's fused add is bit-exact with the convolution followed by the add.

Intermediate values get buffers by liveness (a buffer is reused once its last reader has run; an
output never shares a buffer with an input of its step). :class:`lowbit._native.Plan` owns the buffers
and checks every step's arguments when it is added (the same checks as the single-call bindings) and
its operands against the buffer sizes. A node the plan cannot run raises :class:`Unplannable` with the
reason; the model then runs its node-by-node path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _m

from lowbit.kernels import PackedInt8, w46_dispatch, w46_plan
from lowbit.kernels import native as nat
from lowbit.kernels.epilogue import EPI_KIND
from lowbit.kernels.w46 import PackedW46, _epi_args
from lowbit.modelfile.values import Ref
from lowbit.nn import (
    CheckInput,
    CheckShape,
    Dequantize,
    IOConvert,
    QAdd,
    QAvgPool2d,
    QClamp,
    QConv,
    QLinear,
    QMaxPool2d,
    Quantize,
)
from lowbit.nn.base import pair

__all__ = ["Unplannable", "CompiledPlan", "build_plan"]

EXT_IN, EXT_OUT = -1, -2
_CVT = {"quant": 0, "dequant": 1, "copy": 2}
_ESIZE = {torch.uint8: 1, torch.int8: 1, torch.float32: 4, torch.int32: 4}
_FLATTEN = ("torch:flatten", "flatten")


class Unplannable(Exception):
    """A node (or input) the plan cannot run; the message is the reason."""


@dataclass(eq=False)
class Storage:
    """Bytes of one buffer-resident value (several values share one when flatten is free)."""

    nbytes: int
    buffer: int = -3


@dataclass
class Value:
    """A graph value: logical (NCHW) shape, dtype, where it lives (None: the caller's input) and whether
    its memory is channels-last (4-D values in the plan's buffers are)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    store: Storage | None
    nhwc: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Step:
    kind: str  # convert, conv, gemm, w46conv, w46gemm, add, clamp, pool
    name: str  # the node (module path) the step runs
    ins: list[Value]
    out: Value
    args: dict[str, Any]
    path: str = ""
    fused: list[str] = field(default_factory=list)


def _nchw_dims(shape: Sequence[int]) -> tuple[int, int, int]:
    """(b, c, hw) of a value for the [b, c, hw] <-> [b, hw, c] relayouts."""
    if len(shape) == 4:
        return shape[0], shape[1], shape[2] * shape[3]
    if len(shape) == 2:
        return shape[0], shape[1], 1
    n = 1
    for s in shape:
        n *= s
    return 1, n, 1


#: How a plan's 4.6-bit layers pick their kernel: None (lowbit.kernels.w46_dispatch, per layer, on the
#: node-by-node call), ``"w46"`` / ``"int8"`` for all of them, or a kernel by layer (the others: None's rule).
Routes = str | dict[str, str] | None


class _Builder:
    def __init__(self, nodes: Sequence[Any], module: Callable[[str], nn.Module], x: torch.Tensor,
                 routes: Routes = None) -> None:
        self.nodes = nodes
        self.module = module
        self.x = x
        self.routes = routes
        self.steps: list[Step] = []
        self.modules: dict[str, nn.Module] = {}  # every module the graph calls (for the hook check)
        self.vals: dict[int, Value] = {}
        self.output: Value | None = None
        self.w46 = False  # a 4.6-bit layer chose its kernel: the plan holds for this dispatch state only

    # ------------------------------------------------------------------------------ helpers
    def new(self, shape: tuple[int, ...], dtype: torch.dtype, nhwc: bool) -> Value:
        n = 1
        for s in shape:
            n *= s
        return Value(tuple(int(s) for s in shape), dtype, Storage(n * _ESIZE[dtype]), nhwc and len(shape) == 4)

    def arg(self, node: Any, i: int = 0) -> Value:
        a = node.args[i] if i < len(node.args) else None
        if not isinstance(a, Ref) or a.index not in self.vals:
            raise Unplannable(f"node '{node.name}': argument {i} is not a value the plan computes")
        return self.vals[a.index]

    def codes(self, node: Any, v: Value, dims: int | None = 4) -> Value:
        """``v`` as uint8 codes in the plan's buffers (the caller's uint8 input is copied in once)."""
        if v.dtype != torch.uint8:
            raise Unplannable(f"node '{node.name}': takes {v.dtype} values, not uint8 codes")
        if dims is not None and len(v.shape) != dims:
            raise Unplannable(f"node '{node.name}': takes a {dims}-D value, got shape {list(v.shape)}")
        if v.store is not None:
            return v
        out = self.new(v.shape, torch.uint8, True)
        self.convert(node.name, v, out, "copy", layout=1 if len(v.shape) == 4 else 0)
        return out

    def convert(self, name: str, src: Value, dst: Value, op: str, layout: int, scale: float = 1.0, zp: int = 0,
                lo: int = 0, hi: int = 255, xor: int = 0) -> None:
        b, c, hw = _nchw_dims(src.shape)
        esize = _ESIZE[src.dtype] if op == "copy" else 1
        self.steps.append(Step("convert", name, [src], dst, dict(
            op=_CVT[op], b=b, c=c, hw=hw, layout=layout, esize=esize, scale=scale, zp=zp, lo=lo, hi=hi,
            xor_mask=xor), path=f"{op}{' relayout' if layout else ''}"))

    # ------------------------------------------------------------------------------ the walk
    def build(self) -> list[Step]:
        n_inputs = sum(1 for n in self.nodes if n.op == "placeholder")
        if n_inputs != 1:
            raise Unplannable(f"the model takes {n_inputs} inputs (the plan runs one-input models)")
        for i, node in enumerate(self.nodes):
            op = node.op
            if op == "placeholder":
                self.vals[i] = Value(tuple(int(s) for s in self.x.shape), self.x.dtype, None)
            elif op == "output":
                self.finish(node)
            elif op == "call_module":
                self.modules[node.target] = self.module(node.target)
                self.vals[i] = self.call_module(node, self.modules[node.target])
            elif op in ("call_function", "call_method") and node.target in _FLATTEN:
                self.vals[i] = self.flatten(node)
            else:
                raise Unplannable(f"node '{node.name}': {op} {node.target} has no plan step")
        return self.steps

    def call_module(self, node: Any, mod: nn.Module) -> Value:
        t = type(mod)
        if t in (CheckShape, CheckInput):
            v = self.arg(node)
            if v.store is not None:
                raise Unplannable(f"node '{node.name}': an input check inside the graph")
            mod(self.x)  # the check itself, once per planned shape and dtype (its error, as the graph raises it)
            return v
        handler = _MODULE_STEPS.get(t)
        if handler is None:
            if isinstance(mod, nn.Flatten):
                return self.flatten(node, mod.start_dim, mod.end_dim)
            raise Unplannable(f"node '{node.name}': module {t.__name__} has no plan step")
        return handler(self, node, mod)

    def quantize(self, node: Any, mod: Quantize) -> Value:
        v = self.arg(node)
        fmt = mod.spec.format
        if v.store is not None or v.dtype != torch.float32:
            raise Unplannable(f"node '{node.name}': quantizes a {v.dtype} value that is not the model's float input")
        if not fmt.uniform or fmt.qmin < 0 or fmt.qmax > 255:
            raise Unplannable(f"node '{node.name}': quantizes to {fmt} (a non-uniform or wide level set)")
        if len(v.shape) not in (2, 4):
            raise Unplannable(f"node '{node.name}': quantizes a {len(v.shape)}-D input")
        out = self.new(v.shape, torch.uint8, True)
        self.convert(node.target, v, out, "quant", layout=1 if len(v.shape) == 4 else 0, scale=float(mod.scale),
                     zp=int(mod.zero_point), lo=int(fmt.qmin), hi=int(fmt.qmax))
        return out

    def dequantize(self, node: Any, mod: Dequantize) -> Value:
        v = self.codes(node, self.arg(node), None)
        out = Value(v.shape, torch.float32, Storage(v.numel * 4), v.nhwc)
        self.convert(node.target, v, out, "dequant", layout=0, scale=float(mod.scale), zp=int(mod.zero_point))
        return out

    def io_convert(self, node: Any, mod: IOConvert) -> Value:
        v = self.arg(node)
        want = torch.int8 if mod.to == "uint8" else torch.uint8
        if v.dtype != want:
            raise Unplannable(f"node '{node.name}': converts a {v.dtype} value")
        dtype = torch.uint8 if mod.to == "uint8" else torch.int8
        ext = v.store is None and len(v.shape) == 4
        out = self.new(v.shape, dtype, v.nhwc or ext)
        self.convert(node.target, v, out, "copy", layout=1 if ext else 0, xor=0x80)
        return out

    def w46_route(self, node: Any, mod: QConv | QLinear, kind: str, v: Value, geo: tuple[Any, ...]) -> str:
        """``"w46"`` or ``"int8"``: the kernel :mod:`lowbit.kernels.w46_dispatch` picks for this layer and input
        shape (measured on a dummy input of that shape once per process, as the node-by-node path would)."""
        assert isinstance(mod.packed, PackedW46)
        self.w46 = True
        fixed = self.routes.get(node.target) if isinstance(self.routes, dict) else self.routes
        if fixed is None and w46_dispatch.dispatch_mode() != "auto":
            fixed = w46_dispatch.dispatch_mode()  # forced: nothing to measure
        if fixed is not None:
            return fixed
        x = torch.full(v.shape, int(mod.in_zp), dtype=torch.uint8)
        if kind == "conv":
            x = x.contiguous(memory_format=torch.channels_last)
        return w46_plan.route(mod.packed, kind, x, mod.bias_q, mod.epilogue, int(mod.in_zp), geo)

    def conv(self, node: Any, mod: QConv) -> Value:
        p = mod.packed
        if mod.conv1d or mod.snap is not None:
            what = "a 1-D convolution" if mod.conv1d else "non-uniform output codes"
            raise Unplannable(f"node '{node.name}': {what}")
        groups = int(mod.geometry["groups"])
        native = p.native("conv", groups) if isinstance(p, PackedW46) else getattr(p, "native", None)
        if not isinstance(p, (PackedInt8, PackedW46)) or native is None:
            raise Unplannable(f"node '{node.name}': weights of the {p.kernel} kernels")
        v = self.codes(node, self.arg(node))
        g = mod.geometry
        n, cg, kh, kw = (int(s) for s in p.weight.shape)
        b, c, h, w = v.shape
        if c != cg * groups:
            raise Unplannable(f"node '{node.name}': input has {c} channels, the layer expects {cg * groups}")
        (sh, sw), (ph, pw), (dh, dw) = pair(g["stride"]), pair(g["padding"]), pair(g["dilation"])
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if ho < 1 or wo < 1:
            raise ValueError(f"{node.target}: output would be empty: input {h}x{w}, kernel {kh}x{kw}")
        if isinstance(p, PackedW46):
            geo = ((sh, sw), (ph, pw), (dh, dw), groups)
            if self.w46_route(node, mod, "conv", v, geo) == "w46":
                return self.w46_conv(node, mod, p, v, (b, n, ho, wo), geo)
            p = p.as_int8()
        ws, wdw = nat._conv_weights(p, groups)
        epi = mod.epilogue
        kind, odt, m0, rs, ozp, qmin, qmax, sc, fb = nat._epilogue(epi, n)
        out = self.new((b, n, ho, wo), odt, True)
        keep = (p, epi, getattr(epi, "_lb_per_channel", None), mod.bias_q, wdw)
        args = dict(in_shape=(b, c, h, w), x_zp=int(mod.in_zp), weights=list(ws),
                    dw_weight=0 if wdw is None else wdw.data_ptr(), n=n, kernel=(kh, kw), stride=(sh, sw),
                    padding=(ph, pw), dilation=(dh, dw), groups=groups, bias=mod.bias_q.data_ptr(), kind=kind,
                    m0=m0, rshift=rs, out_zp=ozp, qmin=qmin, qmax=qmax, scale=sc, fbias=fb, keep=keep)
        what = "depthwise" if wdw is not None else ("1x1" if kh == kw == 1 and sh == sw == 1 else f"{kh}x{kw}")
        self.steps.append(Step("conv", node.target, [v], out, args, path=f"int8 conv {what}"))
        return out

    def w46_conv(self, node: Any, mod: QConv, p: PackedW46, v: Value, out_shape: tuple[int, int, int, int],
                 geo: tuple[Any, ...]) -> Value:
        stride, padding, dilation, groups = geo
        n, _, kh, kw = (int(s) for s in p.weight.shape)
        kind, p0, p1, ozp, qmin, qmax, odt, keep = _epi_args(mod.epilogue, n)
        out = self.new(out_shape, odt, True)
        args = dict(in_shape=tuple(v.shape), x_zp=int(mod.in_zp), w=p.native("conv", groups), kernel=(kh, kw),
                    stride=stride, padding=padding, dilation=dilation, groups=groups, bias=mod.bias_q.data_ptr(),
                    kind=kind, p0=p0, p1=p1, out_zp=ozp, qmin=qmin, qmax=qmax, keep=(p, mod.bias_q, keep))
        what = "depthwise" if groups > 1 and groups == v.shape[1] else f"{kh}x{kw}"
        self.steps.append(Step("w46conv", node.target, [v], out, args, path=f"4.6-bit conv {what}"))
        return out

    def w46_linear(self, node: Any, mod: QLinear, p: PackedW46, v: Value) -> Value:
        m, n = v.shape[0], int(p.weight.shape[0])
        kind, p0, p1, ozp, qmin, qmax, odt, keep = _epi_args(mod.epilogue, n)
        out = self.new((m, n), odt, False)
        args = dict(m=m, x_zp=int(mod.in_zp), w=p.native("linear", 1), bias=mod.bias_q.data_ptr(), kind=kind, p0=p0,
                    p1=p1, out_zp=ozp, qmin=qmin, qmax=qmax, keep=(p, mod.bias_q, keep))
        self.steps.append(Step("w46gemm", node.target, [v], out, args, path="4.6-bit gemm"))
        return out

    def linear(self, node: Any, mod: QLinear) -> Value:
        p = mod.packed
        if isinstance(p, PackedW46) and p.native("linear", 1) is not None and mod.snap is None:
            v = self.codes(node, self.arg(node), 2)
            if v.shape[1] != p.weight.shape[1]:
                raise Unplannable(f"node '{node.name}': input has {v.shape[1]} features, the layer expects "
                                  f"{p.weight.shape[1]}")
            if self.w46_route(node, mod, "linear", v, ()) == "w46":
                return self.w46_linear(node, mod, p, v)
            p = p.as_int8()
        if not isinstance(p, PackedInt8) or not isinstance(p.native, nat._C.Int8Weights) or mod.snap is not None:
            raise Unplannable(f"node '{node.name}': a linear layer off the int8 GEMM kernels")
        v = self.codes(node, self.arg(node), 2)
        m, k = v.shape
        if k != p.native.k:
            raise Unplannable(f"node '{node.name}': input has {k} features, the layer expects {p.native.k}")
        n = int(p.native.n)
        kind, odt, m0, rs, ozp, qmin, qmax, sc, fb = nat._epilogue(mod.epilogue, n)
        out = self.new((m, n), odt, False)
        keep = (p, mod.epilogue, getattr(mod.epilogue, "_lb_per_channel", None), mod.bias_q)
        args = dict(m=m, k=k, x_zp=int(mod.in_zp), w=p.native, bias=mod.bias_q.data_ptr(), kind=kind, m0=m0,
                    rshift=rs, out_zp=ozp, qmin=qmin, qmax=qmax, scale=sc, fbias=fb, handle=p.native, keep=keep)
        self.steps.append(Step("gemm", node.target, [v], out, args, path="int8 gemm"))
        return out

    def add(self, node: Any, mod: QAdd) -> Value:
        a = self.codes(node, self.arg(node, 0), None)
        b = self.codes(node, self.arg(node, 1), None)
        if a.shape != b.shape or a.nhwc != b.nhwc:
            raise Unplannable(f"node '{node.name}': adds values of shapes {list(a.shape)} and {list(b.shape)}")
        out = self.new(a.shape, torch.uint8, a.nhwc)
        args = dict(n=a.numel, m_a=int(mod.m_a), m_b=int(mod.m_b), rshift=int(mod.rshift), a_zp=int(mod.a[1]),
                    b_zp=int(mod.b[1]), out_zp=int(mod.out[1]), lo=int(mod.lo), hi=int(mod.hi))
        self.steps.append(Step("add", node.target, [a, b], out, args, path="uint8 add"))
        return out

    def clamp(self, node: Any, mod: QClamp) -> Value:
        v = self.codes(node, self.arg(node), None)
        out = Value(v.shape, torch.uint8, Storage(v.numel), v.nhwc)
        self.steps.append(Step("clamp", node.target, [v], out, dict(n=v.numel, lo=mod.lo, hi=mod.hi), path="clamp"))
        return out

    def pool(self, node: Any, mod: QMaxPool2d | QAvgPool2d) -> Value:
        v = self.codes(node, self.arg(node))
        b, c, h, w = v.shape
        if isinstance(mod, QMaxPool2d):
            g = mod.geometry
            ho, wo = g.output_size(h, w)
            geom = (*g.kernel, *g.stride, *g.padding, *g.dilation)
            fixed, op, zp, ceil, what = True, 0, 0, g.ceil_mode, "max"
        elif mod.output_size is not None:
            ho, wo = mod.output_size
            if not (1 <= ho <= h and 1 <= wo <= w):
                raise Unplannable(f"node '{node.name}': adaptive pooling of {h}x{w} to {ho}x{wo}")
            geom, fixed, op, zp, ceil, what = (1, 1, 1, 1, 0, 0, 1, 1), False, 1, 0, False, "adaptive avg"
        else:
            (kh, kw), (sh, sw), (ph, pw) = mod.kernel_size, mod.stride, mod.padding
            ho, wo = nat._pool_out(h, kh, sh, ph, 1, False), nat._pool_out(w, kw, sw, pw, 1, False)
            geom, fixed, op, zp, ceil, what = (kh, kw, sh, sw, ph, pw, 1, 1), True, 1, mod.zero_point, False, "avg"
        if min(ho, wo) < 1:
            raise Unplannable(f"node '{node.name}': empty pooling output")
        out = self.new((b, c, ho, wo), torch.uint8, True)
        args = dict(in_shape=(b, c, h, w), out_hw=(ho, wo), geometry=geom, fixed=fixed, op=op, zp=int(zp),
                    ceil_mode=bool(ceil))
        self.steps.append(Step("pool", node.target, [v], out, args, path=f"{what} pool"))
        return out

    def flatten(self, node: Any, start: Any = None, end: Any = -1) -> Value:
        v = self.arg(node)
        if start is None:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        if start != 1 or end not in (-1, len(v.shape) - 1) or len(v.shape) < 2 or v.store is None:
            raise Unplannable(f"node '{node.name}': flatten({start}, {end}) of a {len(v.shape)}-D value")
        flat = (v.shape[0], v.numel // max(v.shape[0], 1))
        if not v.nhwc or len(v.shape) != 4 or v.shape[2] * v.shape[3] == 1 or v.shape[1] == 1:
            return Value(flat, v.dtype, v.store, False)  # the same bytes in the same order: free
        out = Value(flat, v.dtype, Storage(v.numel * _ESIZE[v.dtype]), False)
        self.convert(node.name, v, out, "copy", layout=2)
        return out

    def finish(self, node: Any) -> None:
        v = self.arg(node)
        if v.store is None:
            raise Unplannable("the model returns its input")
        out = Value(v.shape, v.dtype, None)
        relayout = v.nhwc and len(v.shape) == 4
        self.convert("output", v, out, "copy", layout=2 if relayout else 0)
        self.output = out


_MODULE_STEPS: dict[type, Callable[[_Builder, Any, Any], Value]] = {
    Quantize: _Builder.quantize,
    Dequantize: _Builder.dequantize,
    IOConvert: _Builder.io_convert,
    QConv: _Builder.conv,
    QLinear: _Builder.linear,
    QAdd: _Builder.add,
    QClamp: _Builder.clamp,
    QMaxPool2d: _Builder.pool,
    QAvgPool2d: _Builder.pool,
}


# ---------------------------------------------------------------------------------- fusion


def _readers(steps: list[Step]) -> dict[int, int]:
    """id(storage) -> how many step operands read it."""
    count: dict[int, int] = {}
    for s in steps:
        for v in s.ins:
            if v.store is not None:
                count[id(v.store)] = count.get(id(v.store), 0) + 1
    return count


def _fuse_clamps(steps: list[Step]) -> list[Step]:
    readers = _readers(steps)
    producer: dict[int, Step] = {}
    out: list[Step] = []
    for s in steps:
        src = producer.get(id(s.ins[0].store)) if s.kind == "clamp" else None
        if (src is not None and src.kind in ("add", "conv") and readers[id(s.ins[0].store)] == 1
                and src.out.store is s.ins[0].store):
            lo_key, hi_key = ("qmin", "qmax") if src.kind == "conv" else ("lo", "hi")
            lo, hi = max(src.args[lo_key], s.args["lo"]), min(src.args[hi_key], s.args["hi"])
            if lo <= hi and (src.kind == "add" or src.args["kind"] == EPI_KIND["requant_u8"]):
                src.args[lo_key], src.args[hi_key] = lo, hi
                src.out = s.out
                src.fused.append(s.name)
                producer[id(s.out.store)] = src
                continue
        if s.out.store is not None:
            producer[id(s.out.store)] = s
        out.append(s)
    return out


def _fuse_adds(steps: list[Step]) -> list[Step]:
    readers = _readers(steps)
    where: dict[int, int] = {}  # id(storage) -> index of its producing step in steps
    for i, s in enumerate(steps):
        if s.out.store is not None:
            where[id(s.out.store)] = i
    fused_into: dict[int, Step] = {}
    drop: set[int] = set()
    for i, s in enumerate(steps):
        if s.kind != "add":
            continue
        best = None
        for k, v in enumerate(s.ins):
            j = where.get(id(v.store))
            other = s.ins[1 - k]
            conv = steps[j] if j is not None else None
            if (conv is None or conv.kind != "conv" or j in fused_into or readers[id(v.store)] != 1
                    or conv.args["kind"] != EPI_KIND["requant_u8"] or conv.out.store is not v.store
                    or other.store is v.store or where.get(id(other.store), -1) >= j):
                continue
            zp = s.args["a_zp" if k == 0 else "b_zp"]
            if conv.args["out_zp"] != zp or (best is not None and j < best[0]):
                continue
            best = (j, k)
        if best is None:
            continue
        j, k = best
        conv, a = steps[j], s.args
        conv.args.update(
            res=s.ins[1 - k], add_m_a=a["m_a"] if k == 0 else a["m_b"], add_m_b=a["m_b"] if k == 0 else a["m_a"],
            add_rshift=a["rshift"], add_r_zp=a["b_zp"] if k == 0 else a["a_zp"], add_out_zp=a["out_zp"],
            add_lo=a["lo"], add_hi=a["hi"])
        conv.ins.append(s.ins[1 - k])
        conv.out = s.out
        conv.fused += [s.name, *s.fused]
        conv.path += " + add"
        fused_into[j] = s
        drop.add(i)
    return [s for i, s in enumerate(steps) if i not in drop]


# ---------------------------------------------------------------------------------- buffers


def _assign_buffers(steps: list[Step]) -> list[int]:
    """Give every storage a buffer by liveness; returns the buffer sizes."""
    last: dict[int, int] = {}
    for i, s in enumerate(steps):
        for v in s.ins:
            if v.store is not None:
                last[id(v.store)] = i
    sizes: list[int] = []
    free: list[int] = []
    live: dict[int, Storage] = {}
    for i, s in enumerate(steps):
        st = s.out.store
        if st is not None and st.buffer < 0:
            fits = [b for b in free if sizes[b] >= st.nbytes]
            if fits:
                b = min(fits, key=lambda k: sizes[k])
            elif free:
                b = max(free, key=lambda k: sizes[k])
                sizes[b] = st.nbytes
            else:
                b = len(sizes)
                sizes.append(st.nbytes)
            if b in free:
                free.remove(b)
            st.buffer = b
            live[id(st)] = st
            last.setdefault(id(st), i)  # never read: free right away
        for key in [k for k, v in live.items() if last[k] <= i]:
            free.append(live.pop(key).buffer)
    return sizes


def _buf(v: Value) -> int:
    return EXT_IN if v.store is None else v.store.buffer


# ---------------------------------------------------------------------------------- the plan


class CompiledPlan:
    """A native plan for one input shape and dtype, with what the Python side needs to call it."""

    def __init__(self, native: Any, steps: list[Step], in_shape: tuple[int, ...], in_dtype: torch.dtype,
                 out_shape: tuple[int, ...], out_dtype: torch.dtype, modules: dict[str, nn.Module]) -> None:
        self.native = native
        self.steps = steps
        self.modules = modules
        self.in_shape, self.in_dtype = in_shape, in_dtype
        self.out_shape, self.out_dtype = out_shape, out_dtype
        self.in_bytes = _numel(in_shape) * in_dtype.itemsize
        self.out_bytes = _numel(out_shape) * out_dtype.itemsize
        #: the 4.6-bit dispatch state (kernel path, threads, mode) its 4.6-bit layers chose their kernels
        #: under, None without such layers: the executor compiles again when the state changes
        self.dispatch_state: tuple[Any, ...] | None = None
        #: how the 4.6-bit layers' kernels were chosen on the plan (:mod:`lowbit.runtime.w46_choice`), or None
        self.w46_choice: dict[str, Any] | None = None

    def run(self, x: torch.Tensor, timings: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.empty(self.out_shape, dtype=self.out_dtype)
        self.native.run(x.data_ptr(), self.in_bytes, out.data_ptr(), self.out_bytes,
                        0 if timings is None else timings.data_ptr())
        return out

    def hooked(self) -> str | None:
        """The first module with forward hooks (they observe module calls, which a plan does not make)."""
        if _global_hooks():
            return "<global forward hooks>"
        for name, m in self.modules.items():
            if m._forward_hooks or m._forward_pre_hooks:
                return name
        return None

    def describe(self) -> list[dict[str, Any]]:
        """One entry per step: name, kind, kernel path, fused nodes."""
        return [{"name": s.name, "kind": s.kind, "path": s.path, "fused": list(s.fused)} for s in self.steps]


def _global_hooks() -> bool:
    return bool(_m._global_forward_hooks or _m._global_forward_pre_hooks)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def build_plan(nodes: Sequence[Any], module: Callable[[str], nn.Module], x: torch.Tensor, fuse: bool = True,
               w46_routes: Routes = None) -> CompiledPlan:
    """The plan of ``nodes`` (:class:`lowbit.modelfile.program.Node` list) for inputs shaped like ``x``.

    ``module(path)`` returns a called module. ``w46_routes``: the kernel of the 4.6-bit layers
    (:data:`Routes`). Raises :class:`Unplannable` (the reason) when some node has no plan step; errors the
    model itself would raise for this input (a failed input check, a window larger than the map)
    propagate."""
    b = _Builder(nodes, module, x, w46_routes)
    steps = b.build()
    if fuse:
        steps = _fuse_adds(_fuse_clamps(steps))
    sizes = _assign_buffers(steps)
    out = b.output
    assert out is not None
    plan = nat._C.Plan(sizes, _numel(x.shape) * x.dtype.itemsize, out.numel * _ESIZE[out.dtype])
    for s in steps:
        _emit(plan, s)
    cp = CompiledPlan(plan, steps, tuple(x.shape), x.dtype, out.shape, out.dtype, b.modules)
    cp.dispatch_state = w46_plan.quick_state(nat._C) if b.w46 else None
    return cp


def _emit(plan: Any, s: Step) -> None:
    a = dict(s.args)
    if s.kind == "convert":
        plan.convert(_buf(s.ins[0]), EXT_OUT if s.out.store is None else s.out.store.buffer, **a)
    elif s.kind == "conv":
        res = a.pop("res", None)
        add = {k: a.pop(k, d) for k, d in (("add_m_a", 1), ("add_m_b", 1), ("add_rshift", 1), ("add_r_zp", 0),
                                           ("add_out_zp", 0), ("add_lo", 0), ("add_hi", 255))}
        plan.conv(_buf(s.ins[0]), _buf(s.out), -3 if res is None else _buf(res), **a, **add)
    elif s.kind == "gemm":
        plan.gemm(_buf(s.ins[0]), _buf(s.out), **a)
    elif s.kind == "w46conv":
        plan.w46_conv(_buf(s.ins[0]), _buf(s.out), **a)
    elif s.kind == "w46gemm":
        plan.w46_gemm(_buf(s.ins[0]), _buf(s.out), **a)
    elif s.kind == "add":
        plan.add(_buf(s.ins[0]), _buf(s.ins[1]), _buf(s.out), **a)
    elif s.kind == "clamp":
        plan.clamp(_buf(s.ins[0]), _buf(s.out), **a)
    elif s.kind == "pool":
        plan.pool(_buf(s.ins[0]), _buf(s.out), **a)
    else:  # pragma: no cover - the builder makes no other kinds
        raise AssertionError(s.kind)

