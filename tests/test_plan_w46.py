"""4.6-bit models in the plan executor: every 4.6-bit layer runs as a native plan step on the kernel the
dispatch picks (the 4.6-bit kernel, or the int8 kernel on the same codes where it measures faster), with
exactly the integers of the node-by-node graph on every ISA path and forced mode; the plan is compiled
again when the dispatch state changes; the native step checks its arguments."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.kernels import native as nat
from lowbit.kernels import w46_dispatch
from lowbit.runtime import executor_of, plan_status

pytestmark = [pytest.mark.skipif(not nat.available(), reason="lowbit._native is not built"),
              pytest.mark.usefixtures("one_thread")]

_ORDER = ["portable", "avx2", "avx512bw", "vnni"]
_LAYERS = ("conv", "gemm", "w46conv", "w46gemm")
PATHS = [p for p in _ORDER if nat.available() and _ORDER.index(p) <= _ORDER.index(nat.best_isa())]


@pytest.fixture(scope="module")
def w46_models(residual_models, digits_cnn):
    """small_cnn and ResNet-20 (digits) by w46 (25, 21), plain rounding."""
    models, calib = residual_models
    small, splits, _ = digits_cnn
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {name: lowbit.quantize(m, "w46", calib=calib, correction_steps=0, progress=False)
                for name, m in (("small_cnn", small), ("resnet20", models["resnet20"][1]))}
    finally:
        torch.set_num_threads(old)


def _x(digits_cnn, n):
    return digits_cnn[1].test.tensors[0][:n]


def _run_both(q, x):
    """(plan output, its step list, node-by-node output)."""
    with torch.no_grad():
        y = q(x)
        st = plan_status(q)
        assert st["reason"] is None, st["reason"]
        return y, st["steps"], executor_of(q).fallback(x)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", ["auto", "w46", "int8"])
@pytest.mark.parametrize("name", ["small_cnn", "resnet20"])
def test_w46_plans_are_exact(w46_models, digits_cnn, name, path, mode):
    q = w46_models[name]
    x = _x(digits_cnn, 3)
    w46_dispatch.set_dispatch(mode)
    try:
        with nat.isa(path):
            y, steps, ref = _run_both(q, x)
    finally:
        w46_dispatch.set_dispatch(None)
    assert torch.equal(y, ref)
    layers = [s for s in steps if s["kind"] in ("conv", "gemm", "w46conv", "w46gemm")]
    n_layers = sum(1 for m in q.modules() if type(m).__name__ in ("QConv", "QLinear"))
    assert len(layers) == n_layers
    on_w46 = [s for s in layers if s["path"].startswith("4.6-bit")]
    if mode == "w46":
        assert len(on_w46) == n_layers
    elif mode == "int8":
        assert not on_w46 and all(s["path"].startswith("int8") for s in layers)
    if name == "resnet20" and on_w46:  # residual adds stay steps of their own after 4.6-bit convolutions
        assert not any(s["path"].endswith("+ add") for s in on_w46)


def test_w46_unfused_plan_is_exact(w46_models, digits_cnn):
    from lowbit.runtime import build_plan
    from lowbit.runtime.executor import _program

    q = w46_models["resnet20"]
    x = _x(digits_cnn, 2)
    nodes, module = _program(q)
    with torch.no_grad():
        for fuse in (False, True):
            plan = build_plan(nodes, module, x, fuse=fuse)
            assert torch.equal(plan.run(x), executor_of(q).fallback(x))


def test_dispatch_state_change_recompiles(w46_models, digits_cnn):
    """A plan made under one dispatch mode is not reused under another (its layers chose their kernels)."""
    q = w46_models["small_cnn"]
    x = _x(digits_cnn, 1)
    try:
        w46_dispatch.set_dispatch("int8")
        _, steps_int8, _ = _run_both(q, x)
        w46_dispatch.set_dispatch("w46")
        y, steps_w46, ref = _run_both(q, x)
    finally:
        w46_dispatch.set_dispatch(None)
    layers = ("conv", "gemm", "w46conv", "w46gemm")
    assert all(s["path"].startswith("int8") for s in steps_int8 if s["kind"] in layers)
    assert all(s["path"].startswith("4.6-bit") for s in steps_w46 if s["kind"] in layers), steps_w46
    assert torch.equal(y, ref)


def test_w46_file_round_trip_plans(w46_models, digits_cnn, tmp_path):
    q = w46_models["resnet20"]
    r = lowbit.load(lowbit.save(q, tmp_path / "r.lowbit"))
    x = _x(digits_cnn, 2)
    w46_dispatch.set_dispatch("w46")
    try:
        y, steps, ref = _run_both(r, x)
        with torch.no_grad():
            assert torch.equal(y, q(x))
    finally:
        w46_dispatch.set_dispatch(None)
    assert torch.equal(y, ref) and any(s["kind"] == "w46conv" for s in steps)


def test_w46_timings_name_the_path(w46_models, digits_cnn):
    q = w46_models["small_cnn"]
    t: dict = {}
    w46_dispatch.set_dispatch("w46")
    try:
        with torch.no_grad():
            executor_of(q).run(_x(digits_cnn, 1), timings=t)
    finally:
        w46_dispatch.set_dispatch(None)
    w46 = [v for v in t.values() if v["kind"] in ("w46conv", "w46gemm")]
    assert w46 and all(v["path"].endswith(f"({nat._C.w46_path()})") and v["seconds"] > 0 for v in w46)


def test_native_w46_steps_check_arguments():
    P = nat._C.Plan
    w = torch.ones(8, 2 * 3 * 3, dtype=torch.int8)  # 8 channels, C=2, 3x3
    packed = nat._C.w46_pack(w.data_ptr(), 8, 18, 12, 10, 1)
    bias = torch.zeros(8, dtype=torch.int32)
    conv = dict(in_shape=(1, 2, 4, 4), x_zp=0, w=packed, kernel=(3, 3), stride=(1, 1), padding=(1, 1),
                dilation=(1, 1), groups=1, bias=bias.data_ptr(), kind=0, p0=0, p1=0, out_zp=0, qmin=0, qmax=0,
                keep=None)
    P([32, 512], 32, 32).w46_conv(0, 1, **conv)  # fits: 1x4x4x8 int32 = 512 bytes
    with pytest.raises(ValueError, match="w46 conv output"):
        P([32, 256], 32, 32).w46_conv(0, 1, **conv)
    with pytest.raises(ValueError, match="do not match"):
        P([48, 512], 32, 32).w46_conv(0, 1, **{**conv, "in_shape": (1, 3, 4, 4)})
    with pytest.raises(ValueError, match="two different buffers"):
        P([32, 512], 32, 32).w46_conv(0, 0, **conv)
    with pytest.raises(ValueError, match="zero point"):
        P([32, 512], 32, 32).w46_conv(0, 1, **{**conv, "x_zp": 25})
    lin = packed_lin = nat._C.w46_pack(w.data_ptr(), 8, 18, 12, 10, 1)
    gemm = dict(m=2, x_zp=0, w=packed_lin, bias=bias.data_ptr(), kind=0, p0=0, p1=0, out_zp=0, qmin=0, qmax=0,
                keep=None)
    P([36, 64], 36, 64).w46_gemm(0, 1, **gemm)
    with pytest.raises(ValueError, match="w46 gemm input"):
        P([35, 64], 36, 64).w46_gemm(0, 1, **gemm)
    assert lin is packed_lin


@pytest.mark.parametrize("path", PATHS)
def test_auto_chooses_on_the_plan(w46_models, digits_cnn, path):
    """auto mode: the plan's 4.6-bit layers get their kernels from timing whole plans (all int8, all
    4.6-bit, the per-layer mix), on every path; the choice is reported and the result exact."""
    q = w46_models["resnet20"]
    with nat.isa(path):
        y, steps, ref = _run_both(q, _x(digits_cnn, 2))
        choice = plan_status(q)["w46_choice"]
    assert torch.equal(y, ref)
    assert choice["plan"] in choice["us"] and {"int8", "w46"} <= set(choice["us"])
    n_layers = sum(1 for m in q.modules() if type(m).__name__ in ("QConv", "QLinear"))
    assert len(choice["layers"]) == len(choice["layer_us"]) == n_layers
    want = {"int8": "int8", "w46": "4.6-bit"}
    if choice["plan"] != "per layer":
        assert all(s["path"].startswith(want[choice["plan"]]) for s in steps if s["kind"] in _LAYERS)
    else:
        by = {s["name"]: s["path"] for s in steps}
        assert all(by[k].startswith(want[v]) for k, v in choice["layers"].items())
    w46_dispatch.set_dispatch("w46")
    try:
        with nat.isa(path):
            _run_both(q, _x(digits_cnn, 2))
            assert plan_status(q)["w46_choice"] is None  # a forced kernel: no timing
    finally:
        w46_dispatch.set_dispatch(None)


def test_per_layer_choice_counts_the_unfused_add(w46_models, digits_cnn, monkeypatch):
    """A layer goes to the 4.6-bit kernel only if its step plus the add (and clamp) steps the int8 plan
    fused into it take less than the fused int8 step."""
    from lowbit.runtime import build_plan, w46_choice
    from lowbit.runtime.executor import _program

    q = w46_models["resnet20"]
    x = _x(digits_cnn, 1)
    nodes, module = _program(q)
    with torch.no_grad():
        a = build_plan(nodes, module, x, w46_routes="int8")
        b = build_plan(nodes, module, x, w46_routes="w46")
    fused = next(s for s in a.steps if s.path.endswith("+ add"))
    plain = next(s for s in a.steps if s.kind == "conv" and not s.fused)
    extra = set(fused.fused)
    times = {id(a): {s.name: 10e-6 for s in a.steps},
             id(b): {s.name: (3e-6 if s.name in extra else 8e-6) for s in b.steps}}
    monkeypatch.setattr(w46_choice, "_step_times", lambda plan, x: times[id(plan)])
    routes, costs = w46_choice._per_layer(a, b, x)
    assert routes[plain.name] == "w46" and costs[plain.name] == {"int8": 10.0, "w46": 8.0}
    # 8 µs + 3 µs for the add (its clamp is fused into the add's step in the 4.6-bit plan) > 10 µs
    assert routes[fused.name] == "int8" and costs[fused.name]["w46"] >= 11.0


@pytest.mark.parametrize("faster,kept", [(0.03, "int8"), (0.10, "w46")])
def test_w46_plan_must_beat_int8_by_the_margin(w46_models, digits_cnn, monkeypatch, faster, kept):
    from lowbit.runtime import build_plan, w46_choice
    from lowbit.runtime.executor import _program

    q = w46_models["small_cnn"]
    x = _x(digits_cnn, 1)
    monkeypatch.setattr(w46_choice.w46_dispatch, "_measure",
                        lambda c: {k: (1.0 - faster if k == "w46" else 1.0) for k in c})
    nodes, module = _program(q)
    with torch.no_grad():
        plan = w46_choice.compile_plan(nodes, module, x)
        assert torch.equal(plan.run(x), build_plan(nodes, module, x, w46_routes="int8").run(x))
    assert plan.w46_choice["plan"] == kept
    paths = [s.path for s in plan.steps if s.kind in _LAYERS]
    assert all(p.startswith("int8" if kept == "int8" else "4.6-bit") for p in paths)


def test_invalid_dispatch_variable_fails_only_4bit_models(w46_models, digits_cnn, residual_models, monkeypatch):
    """LOWBIT_W46_DISPATCH concerns 4.6-bit layers: an invalid value is an error for a model that has them
    and does not stop an int8 model from running (as a plan)."""
    x = _x(digits_cnn, 7)  # a batch no other test uses: both models compile a plan under the variable
    static, _ = residual_models[0]["resnet20"]
    q = w46_models["small_cnn"]
    monkeypatch.setenv("LOWBIT_W46_DISPATCH", "bogus")
    with torch.no_grad():
        static(x)
        assert plan_status(static)["reason"] is None
        with pytest.raises(ValueError, match="LOWBIT_W46_DISPATCH='bogus'"):
            q(x)
