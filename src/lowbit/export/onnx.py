"""ONNX QDQ export: a lowbit model as an ONNX graph with lowbit's own scales and zero points.

Every lowbit layer is replaced, for the export only, by a twin of plain PyTorch ops and the QDQ ops of
:mod:`lowbit.export.qdq`, then ``torch.onnx.export`` (opset 18) writes the graph:

* static / full-integer layers (``QLinear``, ``QConv``): ``DequantizeLinear`` of the uint8 input codes, of
  the int8 weights (per output channel, axis 0) and of the int32 bias (scale ``s_in·s_w``), MatMul/Gemm
  or Conv, the fused ReLU/ReLU6, ``QuantizeLinear`` to the output codes — the QDQ pattern ONNX Runtime
  fuses into integer kernels; residual adds, pooling and clamps on codes likewise between DQ and Q;
  model entry/exit ``Quantize``/``Dequantize`` are ``QuantizeLinear``/``DequantizeLinear`` (a full-integer
  model keeps its uint8/int8 input and output);
* dynamic layers: ``DynamicQuantizeLinear`` of the input (per tensor; per-token layers quantize each row
  with a computed scale), ``DequantizeLinear`` of the weights, the float product;
* weight-only and float16 layers: int8 weights behind ``DequantizeLinear`` (float16 weights behind a
  Cast), then the float operation.

Layers ONNX has no operator for (binary, 4.6-bit and BM arithmetic, or any lowbit module without a twin
here) are an :class:`OnnxExportError` naming the layer. Rounding differs in places (ONNX Runtime
requantizes in float, lowbit in Q31 integers; recurrent layers unroll for the example's sequence
length), so the export is checked against lowbit's own execution (:func:`compare_onnx`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import files
from lowbit.nn import (
    CheckInput,
    CheckShape,
    Dequantize,
    DynamicQConv,
    DynamicQLinear,
    DynamicQMultiheadAttention,
    DynamicQRNN,
    F16Layer,
    IOConvert,
    LowbitModule,
    QAdd,
    QAvgPool2d,
    QClamp,
    QConv,
    QLinear,
    QLookup,
    QMaxPool2d,
    Quantize,
    WeightOnly,
)

from .qdq import dequantize, dynamic_quantize, quantize, translations

__all__ = ["OnnxExportError", "compare_onnx", "export_onnx"]

OPSET = 18


class OnnxExportError(ValueError):
    """A lowbit model (or one of its layers, named) cannot be written as an ONNX QDQ graph."""


def _f32(v: Any) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float32).clone()


def _zp(v: Any, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    return torch.as_tensor(v).to(dtype).clone()


class _QDQ(nn.Module):
    """Quantize (``to_codes``) or dequantize with a per-tensor (scale, zero point); ``codes``: the code range
    when narrower than the type's (the real values are clamped to it first: the same codes)."""

    def __init__(self, scale: float, zero_point: int, to_codes: bool, dtype: torch.dtype = torch.uint8,
                 codes: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.to_codes = to_codes
        self.register_buffer("scale", _f32(scale))
        self.register_buffer("zero_point", _zp(zero_point, dtype))
        self.bounds = None if codes is None else ((codes[0] - zero_point) * scale, (codes[1] - zero_point) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.to_codes:
            if self.bounds is not None:
                x = torch.clamp(x, *self.bounds)
            return quantize(x, self.scale, self.zero_point, 0)
        return dequantize(x, self.scale, self.zero_point, 0)


def _spec_qdq(spec: Any, to_codes: bool) -> _QDQ:
    """Q/DQ of a per-tensor activation spec (unsigned 8-bit codes, possibly of a narrower range)."""
    s, z = spec.per_tensor_params
    fmt = spec.format
    narrow = (fmt.qmin, fmt.qmax) if (fmt.qmin, fmt.qmax) != (0, 255) else None
    return _QDQ(s, z, to_codes, torch.uint8, narrow)


class _Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _CodesOp(nn.Module):
    """An op on codes run on their real values: DQ(scale, zp) -> ``fn`` -> Q(scale, zp)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], scale: float = 1.0, zero_point: int = 0,
                 in_dtype: torch.dtype = torch.uint8, out: tuple[float, int, torch.dtype] | None = None) -> None:
        super().__init__()
        self.fn = fn
        self.dq = _QDQ(scale, zero_point, False, in_dtype)
        s, z, dt = out or (scale, zero_point, in_dtype)
        self.q = _QDQ(s, z, True, dt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(self.fn(self.dq(x)))


class _Add(nn.Module):
    def __init__(self, m: QAdd) -> None:
        super().__init__()
        self.a, self.b = _QDQ(*m.a, False), _QDQ(*m.b, False)
        q = (m.qmin, m.qmax) if (m.qmin, m.qmax) != (0, 255) else None
        self.out = _QDQ(*m.out, True, torch.uint8, q)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.out(self.a(x) + self.b(y))


def _act(y: torch.Tensor, act: str | None) -> torch.Tensor:
    if act == "relu":
        return torch.relu(y)
    if act == "relu6":
        return torch.clamp(y, 0.0, 6.0)
    return y


class _IntWeights(nn.Module):
    """int8 weights per output channel behind DequantizeLinear."""

    def _weights(self, weight_q: torch.Tensor, weight_scale: torch.Tensor) -> None:
        self.register_buffer("w_q", weight_q.clone())
        self.register_buffer("w_scale", weight_scale.to(torch.float32).clone())
        self.register_buffer("w_zp", torch.zeros(weight_q.shape[0], dtype=torch.int8))

    def weight(self) -> torch.Tensor:
        return dequantize(self.w_q, self.w_scale, self.w_zp, 0)

    def _op(self, x: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        w = self.weight()
        if self.kind == "linear":
            return F.linear(x, w, b)
        if self.kind == "conv1d":
            return F.conv2d(x.unsqueeze(2), w, b, **self.geometry).squeeze(2)
        return F.conv2d(x, w, b, **self.geometry)


class _Static(_IntWeights):
    def __init__(self, m: QLinear | QConv) -> None:
        super().__init__()
        self.kind = "linear" if isinstance(m, QLinear) else ("conv1d" if m.conv1d else "conv2d")
        self.geometry = {} if isinstance(m, QLinear) else dict(m.geometry)
        self._weights(m.weight_q, m.weight_scale)
        self.register_buffer("b_q", m.bias_q.clone())
        self.register_buffer("b_scale", (m.weight_scale.to(torch.float64) * m.in_scale).to(torch.float32))
        self.register_buffer("b_zp", torch.zeros_like(m.bias_q))
        self.inp, self.act = _spec_qdq(m.in_spec, False), m.act
        self.out = None if m.out_spec is None else _spec_qdq(m.out_spec, True)  # None: float output
        self.register_buffer("snap", None if getattr(m, "snap", None) is None else m.snap.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = dequantize(self.b_q, self.b_scale, self.b_zp, 0)
        y = _act(self._op(self.inp(x), b), self.act)
        if self.out is None:
            return y
        y = self.out(y)
        return y if self.snap is None else self.snap[y.long()]


def _dynamic_input(x: torch.Tensor, per_token: bool) -> torch.Tensor:
    """x as the dynamic layers see it: quantized per tensor (DynamicQuantizeLinear) or per row, dequantized."""
    if not per_token:
        q, s, z = dynamic_quantize(x)
        return dequantize(q, s, z, 0)
    x2 = x.reshape(-1, x.shape[-1])
    amax = x2.abs().amax(1)
    s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    z = torch.zeros_like(s, dtype=torch.int8)
    return dequantize(quantize(x2, s, z, 0), s, z, 0).reshape(x.shape)


class _Dynamic(_IntWeights):
    def __init__(self, m: DynamicQLinear | DynamicQConv) -> None:
        super().__init__()
        self.kind = "linear" if isinstance(m, DynamicQLinear) else ("conv1d" if m.conv1d else "conv2d")
        self.geometry = {} if isinstance(m, DynamicQLinear) else dict(m.geometry)
        self.per_token = bool(getattr(m, "per_token", False))
        self._weights(m.weight_q, m.weight_scale)
        self.register_buffer("bias", None if m.bias is None else m.bias.clone())
        self.act = m.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _act(self._op(_dynamic_input(x, self.per_token), self.bias), self.act)


def _dynamic_product(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                     per_token: bool) -> torch.Tensor:
    w = dequantize(w_q, w_scale, torch.zeros(w_q.shape[0], dtype=torch.int8), 0)
    return F.linear(_dynamic_input(x, per_token), w, bias)


class _RNN(DynamicQRNN):
    """DynamicQRNN with its products as QDQ ops (the time loop unrolls at export)."""

    def _proj(self, x: torch.Tensor, name: str, bias: str) -> torch.Tensor:
        b = getattr(self, bias) if self.bias else None
        return _dynamic_product(x, getattr(self, f"{name}_q"), getattr(self, f"{name}_scale"), b, self.per_token)


class _MHA(DynamicQMultiheadAttention):
    def _lin(self, x: torch.Tensor, which: str) -> torch.Tensor:
        e = self.embed_dim
        if which in ("in", "out"):
            b = getattr(self, f"{which}_bias", None)
            return _dynamic_product(x, getattr(self, f"{which}_q"), getattr(self, f"{which}_scale"), b,
                                    self.per_token)
        i = "qkv".index(which)
        rows = slice(i * e, (i + 1) * e)
        b = self.in_bias[rows] if self.bias else None
        return _dynamic_product(x, self.in_q[rows], self.in_scale[rows], b, self.per_token)


class _WeightOnly(WeightOnly):
    def _param(self, buf: str, q: bool) -> torch.Tensor:
        if not q:
            return getattr(self, buf).to(torch.float32)
        codes, scale = getattr(self, f"{buf}_q"), getattr(self, f"{buf}_scale")
        return dequantize(codes, scale, torch.zeros(codes.shape[0], dtype=torch.int8), 0)


def _swap_class(m: nn.Module, cls: type) -> nn.Module:
    t = copy.copy(m)  # shares the tensors; only the class (the computation) differs
    t.__class__ = cls
    return t


def _pool(m: QAvgPool2d) -> Callable[[torch.Tensor], torch.Tensor]:
    if m.output_size is not None:
        return lambda x: F.adaptive_avg_pool2d(x, m.output_size)
    return lambda x: F.avg_pool2d(x, m.kernel_size, m.stride, m.padding, count_include_pad=True)


def _twin(m: nn.Module) -> nn.Module | str:
    """The exportable twin of a lowbit module, or why it has none."""
    if isinstance(m, (Quantize, Dequantize)) and not m.spec.format.uniform:
        return f"its codes lie on a non-uniform level set ({m.spec.format}), which QuantizeLinear cannot produce"
    if isinstance(m, Dequantize):
        return _spec_qdq(m.spec, False)
    if isinstance(m, Quantize):
        return _spec_qdq(m.spec, True)
    if isinstance(m, (QLinear, QConv, DynamicQLinear, DynamicQConv)) and m.packed.kernel != "int8":
        return f"its weights run on lowbit's {m.packed.kernel} kernels, whose arithmetic ONNX operators cannot express"
    if isinstance(m, QLookup):
        return m  # a table look-up: Gather
    if isinstance(m, (CheckInput, CheckShape)):
        return _Identity()
    if isinstance(m, IOConvert):
        if m.to == "int8":
            return _CodesOp(lambda x: x, 1.0, 128, torch.uint8, (1.0, 0, torch.int8))
        return _CodesOp(lambda x: x, 1.0, 0, torch.int8, (1.0, 128, torch.uint8))
    if isinstance(m, QClamp):
        return _CodesOp(lambda x, lo=m.lo, hi=m.hi: torch.clamp(x, float(lo), float(hi)))
    if isinstance(m, QMaxPool2d):
        g = m.geometry
        return _CodesOp(lambda x: F.max_pool2d(x, g.kernel, g.stride, g.padding, g.dilation, g.ceil_mode))
    if isinstance(m, QAvgPool2d):
        return _CodesOp(_pool(m), 1.0, m.zero_point)
    if isinstance(m, QAdd):
        return _Add(m)
    if isinstance(m, (QLinear, QConv)):
        return _Static(m)
    if isinstance(m, (DynamicQLinear, DynamicQConv)):
        return _Dynamic(m)
    if type(m) is DynamicQRNN:
        return _swap_class(m, _RNN)
    if type(m) is DynamicQMultiheadAttention:
        return _swap_class(m, _MHA)
    if type(m) is WeightOnly:
        return _swap_class(m, _WeightOnly)
    if isinstance(m, F16Layer):
        return m  # float16 weights: a Cast, then the float op
    return ("ONNX operators cannot express its arithmetic (binary, 4.6-bit and BM layers run on lowbit's own "
            "kernels only)")


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


@contextlib.contextmanager
def _twins(model: nn.Module) -> Iterator[None]:
    """Every lowbit module of ``model`` replaced by its twin while active (restored after)."""
    found: list[tuple[str, nn.Module]] = []
    for path, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, LowbitModule) and not any(path.startswith(p + ".") for p, _ in found):
            found.append((path, m))
    twins: dict[int, nn.Module] = {}
    for path, m in found:
        if id(m) not in twins:
            t = _twin(m)
            if isinstance(t, str):
                raise OnnxExportError(f"layer '{path}' ({type(m).__name__}) has no ONNX QDQ equivalent: {t}; export "
                                      "a model quantized by static, full_integer, dynamic, weight_only or float16 "
                                      "with 8-bit weights instead")
            twins[id(m)] = t
    try:
        for path, m in found:
            _set(model, path, twins[id(m)])
        yield
    finally:
        for path, m in found:
            _set(model, path, m)


def example_from_meta(meta: dict[str, Any]) -> tuple[torch.Tensor, ...] | None:
    """Inputs like the example a model was quantized with (``meta["example_inputs"]``: dtype, shape, range)."""
    recs = meta.get("example_inputs")
    if not isinstance(recs, list) or not recs:
        return None
    gen = torch.Generator().manual_seed(0)
    out = []
    for r in recs:
        dtype = getattr(torch, str(r.get("dtype")), None)
        shape = r.get("shape")
        if not isinstance(dtype, torch.dtype) or not isinstance(shape, list):
            return None
        lo, hi = float(r.get("min", 0.0)), float(r.get("max", 1.0))
        if dtype.is_floating_point:
            t = torch.rand(shape, generator=gen) * (hi - lo) + lo
            out.append(t.to(dtype))
        else:
            out.append(torch.randint(int(lo), int(hi) + 1, shape, generator=gen).to(dtype))
    return tuple(out)


def _inputs(model: nn.Module, example: Any) -> tuple[torch.Tensor, ...]:
    from lowbit.evaluate import model_input

    if example is None:
        ex = getattr(model, "lowbit_example", None)
        example = ex if ex is not None else example_from_meta(getattr(model, "lowbit_meta", {}))
        if example is None:
            raise OnnxExportError("no example input: pass example_input= (one input batch, in the form the model "
                                  "takes) to export_onnx, or --shape to lowbit export")
        example = model_input(model, example, as_tuple=True)  # the recorded example is float: codes if need be
    xs = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    return tuple(torch.cat([x, x]) if x.dim() and x.shape[0] == 1 else x for x in xs)


def export_onnx(model: nn.Module | str | os.PathLike[str], out: str | os.PathLike[str], *,
                example_input: Any = None, inputs: tuple[str | os.PathLike[str], ...] = (),
                optimize: bool = True) -> Path:
    """Write ``model`` (a lowbit model, or the path of a lowbit file) as an ONNX QDQ graph to ``out``.

    ``example_input``: one input batch in the form the model takes (for a full-integer model: its input
    codes); by default the one the model was quantized with (kept in its meta). Every size except those
    the model fixes stays dynamic. ``optimize``: let the exporter fold and clean the graph (the QDQ nodes
    stay; False exports faster). Raises :class:`OnnxExportError` for a layer ONNX cannot express.
    """
    import lowbit

    if isinstance(model, (str, os.PathLike)):
        inputs = (*inputs, model)
        model = lowbit.load(model)
    files.check_output(out, inputs=inputs)
    model = model.eval()
    xs = _inputs(model, example_input)
    auto = torch.export.Dim.AUTO
    dyn = tuple({d: auto for d in range(x.dim())} for x in xs)
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise OnnxExportError("ONNX export needs the onnx and onnxscript packages: pip install 'lowbit[peers]'") \
            from None
    with _twins(model), _quiet(), torch.no_grad():
        try:
            prog = torch.onnx.export(model, xs, dynamo=True, opset_version=OPSET, dynamic_shapes=(dyn,)
                                     if _varargs(model) else dyn, custom_translation_table=translations(),
                                     verbose=False, optimize=optimize)
        except Exception as e:
            cause = e
            while cause.__cause__ is not None:
                cause = cause.__cause__
            text = str(cause).strip().splitlines()
            raise OnnxExportError(f"torch.onnx.export failed: {type(cause).__name__}: {text[0] if text else ''}") \
                from e
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d) / "m.onnx"
        prog.save(str(tmp))
        return files.write_bytes(out, tmp.read_bytes(), inputs=inputs)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.onnx's progress lines and warnings (about optional packages) stay out of the console."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _varargs(model: nn.Module) -> bool:
    import inspect

    params = inspect.signature(model.forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)


def compare_onnx(model: nn.Module, onnx_path: str | os.PathLike[str], inputs: Any, threads: int = 1
                 ) -> dict[str, float]:
    """Run ``inputs`` through the ONNX file (ONNX Runtime) and through lowbit; the largest absolute output
    difference (``max_abs``), the largest output magnitude (``scale``) and, for 2-D outputs, the share of
    rows with the same argmax (``argmax_agree``)."""
    import onnxruntime as ort
    from torch.utils import _pytree as pytree

    xs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs, strict=True)}
    got = [torch.from_numpy(o) for o in sess.run(None, feeds)]
    with torch.no_grad():
        want = [t for t in pytree.tree_leaves(model(*xs)) if isinstance(t, torch.Tensor)]
    if len(got) != len(want):
        raise OnnxExportError(f"the ONNX graph returns {len(got)} outputs, the model {len(want)}")
    res = {"max_abs": 0.0, "scale": 0.0, "argmax_agree": 1.0}
    for g, w in zip(got, want, strict=True):
        g64, w64 = g.to(torch.float64), w.to(torch.float64)
        res["max_abs"] = max(res["max_abs"], float((g64 - w64).abs().max()) if w.numel() else 0.0)
        res["scale"] = max(res["scale"], float(w64.abs().max()) if w.numel() else 0.0)
        if w.dim() == 2 and w.shape[1] > 1:
            res["argmax_agree"] = min(res["argmax_agree"], float((g.argmax(1) == w.argmax(1)).double().mean()))
    return res
