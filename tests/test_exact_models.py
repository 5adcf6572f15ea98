"""Quantized models against the independent specification (tests/_spec.py), bit for bit.

- every integer module of a quantized model (int8 layers, residual adds, clamps, pools, quantize /
  dequantize, dynamic layers) gives exactly the specification's output on the inputs it receives, under
  the torch backend and under every native dispatch path this CPU runs; the whole-model outputs of all
  backends are identical;
- what the methods store is what the specification derives from the float model: per-channel weight
  codes and scales, int32 biases, and output scales / zero points from the calibration ranges.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import _spec as S
import lowbit
from _spec_modules import check_layers
from lowbit import kernels
from lowbit.evaluate import model_input
from lowbit.graph import Fused, prepare

try:
    from lowbit.kernels import native

    NATIVE = native.available()
except ImportError:  # pragma: no cover - depends on the build
    native, NATIVE = None, False

_ORDER = {"portable": 0, "neon": 1, "avx2": 2, "avx512bw": 3, "vnni": 4}


def _backends() -> list[str]:
    out = ["torch"]
    if NATIVE:
        best = native.best_isa()
        runnable = [p for p in ("avx2", "vnni") if best != "neon" and _ORDER[p] <= _ORDER[best]]
        out += ["portable", *runnable]
    return out


def _run(q: nn.Module, x: torch.Tensor, backend: str) -> tuple[torch.Tensor, int]:
    if backend == "torch":
        kernels.set_backend("torch")
        try:
            return check_layers(q, x)
        finally:
            kernels.set_backend(None)
    with native.isa(backend) as active:
        assert native.int8_isa() == backend and active in (backend, "avx512bw", "vnni")
        return check_layers(q, x)


@pytest.fixture(scope="module")
def digits_models(digits_cnn, digits_quantized):
    model, splits, _ = digits_cnn
    return digits_quantized, model, splits.calib.tensors[0], splits.test.tensors[0][:16]


@pytest.mark.parametrize("mode", ["static", "full_integer", "full_integer_int8", "dynamic"])
def test_digits_layers_exact_on_every_backend(digits_models, mode):
    models, _, _, x = digits_models
    q = models[mode]
    outs = {}
    for b in _backends():
        outs[b], n = _run(q, model_input(q, x), b)
        assert n >= 5, f"only {n} integer modules checked"
    first = outs["torch"]
    for b, y in outs.items():
        assert torch.equal(y, first), f"{b} output differs from the torch backend's"


@pytest.mark.parametrize("name", ["resnet20", "mobilenet"])
def test_residual_depthwise_layers_exact_on_every_backend(residual_models, digits_models, name):
    models, _ = residual_models
    q, _ = models[name]
    x = digits_models[3][:8]
    kinds = {type(m).__name__ for m in q.modules()}
    assert ("QAdd" in kinds) == (name == "resnet20") and "QConv" in kinds
    outs = {b: _run(q, x, b)[0] for b in _backends()}
    for b, y in outs.items():
        assert torch.equal(y, outs["torch"]), b


def test_residual_model_file_roundtrip(residual_models, digits_models, tmp_path):
    """The residual adds' file attributes (scales; multipliers derived at load) rebuild the same integers."""
    q, _ = residual_models[0]["resnet20"]
    x = digits_models[3][:8]
    r = lowbit.load(lowbit.save(q, tmp_path / "r.lowbit"))
    with torch.no_grad():
        assert torch.equal(r(x), q(x))


def test_conv1d_model_exact(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Conv1d(8, 4, 3, dilation=2),
                      nn.Flatten(), nn.Linear(16, 5)).eval()
    x = torch.randn(32, 3, 16)
    for mode in ("static", "dynamic"):
        q = lowbit.quantize(m, mode, calib=x)
        outs = {b: _run(q, x, b)[0] for b in _backends()}
        for b, y in outs.items():
            assert torch.equal(y, outs["torch"]), (mode, b)


# ---------------------------------------------------------------------------- what the methods store


def _float_layers(model: nn.Module, calib: torch.Tensor) -> tuple[dict[str, nn.Module], dict[str, tuple]]:
    """Layers of the prepared float graph (BN folded, activations fused) by integer-module name, and the
    (min, max) of every node's output over the calibration data."""
    gm = prepare(model, calib[:1]).gm
    ranges: dict[str, tuple[float, float]] = {}

    class Rec(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                ranges[n.name] = (float(out.min()), float(out.max()))
            return out

    with torch.no_grad():
        Rec(gm).run(calib)
    layers = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            inner = mod.layer if isinstance(mod, Fused) else mod
            if isinstance(inner, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                layers[n.target.replace(".", "_")] = (inner, n.name)
    return layers, ranges


def _check_weights(mod: nn.Module, layer: nn.Module, in_scale: float | None) -> None:
    """Per output channel: s_n = max|w_n| / 127, codes = round_half_even(w / s_n) in [-127, 127]; int32 bias
    = round_half_even(b / (s_in s_n))."""
    w = layer.weight.detach().numpy().astype(np.float32)
    w2 = w.reshape(w.shape[0], -1)
    scales = np.array([S.qparams(r.min(), r.max(), -127, 127, symmetric=True, signed=True)[0] for r in w2])
    codes = S.quantize(w2, scales[:, None], 0, -127, 127)
    assert np.array_equal(mod.weight_scale.numpy(), scales), "weight scales are not max|w_n| / 127 per channel"
    assert np.array_equal(mod.weight_q.reshape(w.shape[0], -1).numpy().astype(np.int64), codes)
    if in_scale is not None and layer.bias is not None:
        b = np.rint(layer.bias.detach().numpy().astype(np.float64) / (scales.astype(np.float64) * in_scale))
        assert np.array_equal(mod.bias_q.numpy().astype(np.int64), np.clip(b, S.INT32_MIN, S.INT32_MAX))


@pytest.mark.parametrize("which", ["small_cnn", "resnet20"])
def test_static_parameters_follow_calibration(digits_models, residual_models, which):
    """Weights per channel, and every layer's and residual add's output (scale, zero point) from the min / max
    of its float output over the calibration data (uint8, asymmetric, zero included)."""
    if which == "small_cnn":
        models, model, calib, _ = digits_models
        q = models["static"]
    else:
        models, calib = residual_models
        q, model = models["resnet20"]
    layers, ranges = _float_layers(model, calib)
    n_checked = 0
    for name, mod in q.named_modules():
        kind = type(mod).__name__
        if kind in ("QConv", "QLinear"):
            layer, node = layers[name]
            s, z = S.qparams(*ranges[node], 0, 255)
            assert (np.float32(mod.out_scale), mod.out_zp) == (s, z), f"{name}: output qparams"
            _check_weights(mod, layer, mod.in_scale)
            n_checked += 1
        elif kind == "QAdd":
            s, z = S.qparams(*ranges[name], 0, 255)
            assert (np.float32(mod.out[0]), mod.out[1]) == (s, z), f"{name}: add output qparams"
            n_checked += 1
    assert n_checked >= 4


def test_dynamic_weights_per_channel(digits_models):
    models, model, calib, _ = digits_models
    layers, _ = _float_layers(model, calib)
    n = 0
    for name, mod in models["dynamic"].named_modules():
        if type(mod).__name__ in ("DynamicQConv", "DynamicQLinear"):
            _check_weights(mod, layers[name.replace('.', '_')][0], None)
            n += 1
    assert n >= 5
