"""The model-level executor (lowbit.runtime): a converted model run as a native plan gives exactly the
integers of its node-by-node graph, for every planned shape, thread count, file round trip and fusion;
what it cannot plan runs the graph and says why; the native plan checks its arguments."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.kernels import native as nat
from lowbit.runtime import build_plan, executor_of, plan_status, set_plan
from lowbit.runtime.executor import _program

pytestmark = pytest.mark.skipif(not nat.available(), reason="lowbit._native is not built")


def _graph(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The node-by-node forward (the reference)."""
    with torch.no_grad():
        return executor_of(model).fallback(x)


def _planned(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        y = model(x)
    st = plan_status(model)
    assert st["reason"] is None, st["reason"]
    assert list(x.shape) in st["planned"]
    return y


def _check_exact(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = _planned(model, x)
    ref = _graph(model, x)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert torch.equal(y, ref)
    return y


def _digits(splits, n: int) -> torch.Tensor:
    return splits.test.tensors[0][:n]


@pytest.mark.parametrize("name", ["resnet20", "mobilenet"])
@pytest.mark.parametrize("batch", [1, 5])
def test_residual_nets_exact(residual_models, digits_cnn, name, batch, one_thread):
    models, _ = residual_models
    q, _ = models[name]
    _check_exact(q, _digits(digits_cnn[1], batch))


def test_fusions_applied(residual_models, digits_cnn):
    """resnet20: every residual add (and the ReLU after it) is fused into a convolution's epilogue;
    mobilenet: depthwise convolutions are planned. Unfused plans give the same integers."""
    models, _ = residual_models
    x = _digits(digits_cnn[1], 2)
    q, _ = models["resnet20"]
    _planned(q, x)
    steps = plan_status(q)["steps"]
    kinds = [s["kind"] for s in steps]
    assert "add" not in kinds and "clamp" not in kinds
    fused = [s for s in steps if s["path"].endswith("+ add")]
    n_adds = sum(1 for n in q.graph.nodes if n.op == "call_module" and type(q.get_submodule(n.target)).__name__
                 == "QAdd")
    assert len(fused) == n_adds > 0
    assert all(len(s["fused"]) == 2 for s in fused)  # the add and its ReLU
    nodes, module = _program(q)
    with torch.no_grad():
        unfused = build_plan(nodes, module, x, fuse=False)
        assert any(s.kind == "add" for s in unfused.steps) and any(s.kind == "clamp" for s in unfused.steps)
        assert torch.equal(unfused.run(x), _graph(q, x))
    qm, _ = models["mobilenet"]
    _planned(qm, x)
    assert any("depthwise" in s["path"] for s in plan_status(qm)["steps"])


@pytest.mark.parametrize("mode", ["static", "full_integer", "full_integer_int8"])
def test_small_cnn_exact(digits_quantized, digits_cnn, mode, one_thread):
    """small_cnn (max-pool, flatten of a 4x4 map, two linear layers) in float and integer I/O."""
    q = digits_quantized[mode]
    x = _digits(digits_cnn[1], 7)
    if mode != "static":
        spec = q.lowbit_meta["input"]
        x = torch.clamp(torch.round(x / spec["scale"]) + spec["zero_point"], -128 if "int8" in mode else 0,
                        127 if "int8" in mode else 255).to(torch.int8 if "int8" in mode else torch.uint8)
    _check_exact(q, x)
    assert any(s["kind"] == "pool" for s in plan_status(q)["steps"])


def test_shape_change_replans_and_threads(residual_models, digits_cnn):
    models, _ = residual_models
    q, _ = models["resnet20"]
    xs = [_digits(digits_cnn[1], 1), _digits(digits_cnn[1], 3), torch.randn(2, 1, 12, 12)]
    for n in (1, 2):
        with nat.threads(n):
            for x in xs:
                _check_exact(q, x)
    assert {tuple(s) for s in plan_status(q)["planned"]} >= {tuple(x.shape) for x in xs}


def test_loaded_file_runs_plan(residual_models, digits_cnn, tmp_path):
    models, _ = residual_models
    q, _ = models["mobilenet"]
    path = tmp_path / "m.lowbit"
    lowbit.save(q, path)
    loaded = lowbit.load(path)
    x = _digits(digits_cnn[1], 4)
    y = _check_exact(loaded, x)
    assert torch.equal(y, _graph(q, x))


def test_off_switches(residual_models, digits_cnn, monkeypatch):
    models, _ = residual_models
    q, _ = models["resnet20"]
    x = _digits(digits_cnn[1], 2)
    monkeypatch.setenv("LOWBIT_PLAN", "0")
    with torch.no_grad():
        q(x)
    assert "LOWBIT_PLAN=0" in plan_status(q)["reason"]
    monkeypatch.setenv("LOWBIT_PLAN", "yes")
    with pytest.raises(ValueError, match="LOWBIT_PLAN"):
        q(x)
    monkeypatch.delenv("LOWBIT_PLAN")
    set_plan(q, False)
    try:
        with torch.no_grad():
            q(x)
        assert "set_plan" in plan_status(q)["reason"]
    finally:
        set_plan(q, True)
    monkeypatch.setenv("LOWBIT_KERNELS", "torch")
    with torch.no_grad():
        q(x)
    assert "native kernels are off" in plan_status(q)["reason"]


def test_copies_keep_the_executor(residual_models, digits_cnn):
    models, _ = residual_models
    q, _ = models["mobilenet"]
    x = _digits(digits_cnn[1], 2)
    c = copy.deepcopy(q)
    assert executor_of(c) is not None and executor_of(c).model is c
    assert torch.equal(_planned(c, x), _graph(q, x))


class _WithSigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.sigmoid(self.conv(x)), 1))


def test_unplannable_runs_graph_and_says_why():
    torch.manual_seed(0)
    m = _WithSigmoid().eval()
    calib = torch.randn(16, 1, 8, 8)
    q = lowbit.quantize(m, "static", calib=calib, progress=False)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        y = q(x)
    st = plan_status(q)
    assert st["planned"] == [] and "sigmoid" in st["reason"]
    assert torch.equal(y, _graph(q, x))


def test_timings(residual_models, digits_cnn):
    models, _ = residual_models
    q, _ = models["resnet20"]
    x = _digits(digits_cnn[1], 1)
    t: dict = {}
    with torch.no_grad():
        y = executor_of(q).run(x, timings=t)
        executor_of(q).run(x, timings=t)
    assert torch.equal(y, _graph(q, x))
    convs = {k: v for k, v in t.items() if v["kind"] == "conv"}
    assert len(convs) == sum(1 for n in q.graph.nodes if n.op == "call_module"
                             and type(q.get_submodule(n.target)).__name__ == "QConv")
    assert all(v["calls"] == 2 and v["seconds"] > 0 and "int8 conv" in v["path"] for v in convs.values())


def test_quantize_step_rounds_like_torch():
    """The input quantize of the plan: round half to even, clamp, NCHW -> NHWC, same bytes as QSpec."""
    from lowbit.formats.affine import UINT8_ACT
    from lowbit.formats.qspec import QSpec

    spec = QSpec.per_tensor(UINT8_ACT, 0.1, 7)
    x = torch.cat([(torch.arange(-300, 300) + 0.5) * 0.1, torch.randn(600) * 20,
                   torch.tensor([float("inf"), -float("inf"), 0.0, -0.0] + [0.05] * 596)]).reshape(2, 3, 15, 20)
    p = nat._C.Plan([x.numel()], x.numel() * 4, x.numel())
    p.convert(-1, 0, 0, 2, 3, 300, 1, 1, 0.1, 7, 0, 255, 0)  # quantize into buffer 0 (NHWC)
    p.convert(0, -2, 2, 2, 3, 300, 2, 1, 1.0, 0, 0, 255, 0)  # copy out as NCHW
    out = torch.empty(x.shape, dtype=torch.uint8)
    p.run(x.data_ptr(), x.numel() * 4, out.data_ptr(), out.numel())
    assert torch.equal(out, spec.quantize(x).to(torch.uint8))


def test_native_plan_checks_arguments():
    P = nat._C.Plan
    with pytest.raises(ValueError, match="needs 64 bytes"):
        P([16], 64, 64).convert(-1, 0, 2, 1, 64, 1, 0, 1, 1.0, 0, 0, 255, 0)
    with pytest.raises(ValueError, match="caller's input has"):
        P([64], 32, 64).convert(-1, 0, 2, 1, 64, 1, 0, 1, 1.0, 0, 0, 255, 0)
    with pytest.raises(ValueError, match="operands must be the plan's buffers"):
        P([64, 64], 64, 64).add(-1, 0, 1, 64, 1, 1, 1, 0, 0, 0, 0, 255)
    with pytest.raises(ValueError, match="add shift"):
        P([64, 64, 64], 64, 64).add(0, 1, 2, 64, 1, 1, 0, 0, 0, 0, 0, 255)
    with pytest.raises(ValueError, match="no buffer"):
        P([64], 64, 64).clamp(0, 3, 64, 0, 255)
    with pytest.raises(ValueError, match="pool output"):
        P([64, 4], 64, 64).pool(0, 1, (1, 4, 4, 4), (2, 2), (2, 2, 2, 2, 0, 0, 1, 1), True, 0, 0, False)
    p = P([64, 64], 64, 64)
    p.convert(-1, 0, 2, 1, 64, 1, 0, 1, 1.0, 0, 0, 255, 0)
    x = torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="plan input has 32 bytes"):
        p.run(x.data_ptr(), 32, x.data_ptr(), 64)


def test_forward_hooks_run_the_graph(residual_models, digits_cnn):
    """Hooks on a module of the graph see their calls: the call runs node by node while they are set."""
    models, _ = residual_models
    q, _ = models["resnet20"]
    x = _digits(digits_cnn[1], 1)
    seen = []
    conv = next(m for m in q.modules() if type(m).__name__ == "QConv")
    h = conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        with torch.no_grad():
            y = q(x)
    finally:
        h.remove()
    assert len(seen) == 1 and "forward hooks" in plan_status(q)["reason"]
    assert torch.equal(y, _planned(q, x))


def test_plan_runs_with_torch_single_threaded(residual_models, digits_cnn, monkeypatch):
    """Like the node-by-node path (tests/test_threads.py): inside the plan torch has 1 thread and lowbit's
    pool the user's count."""
    from lowbit.runtime.plan import CompiledPlan

    models, _ = residual_models
    q, _ = models["resnet20"]
    seen = []
    real = CompiledPlan.run

    def spy(self, *a, **k):
        seen.append((torch.get_num_threads(), nat.num_threads()))
        return real(self, *a, **k)

    monkeypatch.setattr(CompiledPlan, "run", spy)
    old = torch.get_num_threads()
    torch.set_num_threads(3)
    nat.set_num_threads(None)
    try:
        with torch.no_grad():
            q(_digits(digits_cnn[1], 1))
        assert seen == [(1, 3)] and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(old)
        nat.set_num_threads(None)
