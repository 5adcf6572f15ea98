"""``lowbit profile``: the per-layer times and the glue add up to the whole-model time, the kernel path
column is what dispatch ran, and bad input is refused before any timing."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit.cli import main
from lowbit.modelfile import ModelFileError

native = pytest.importorskip("lowbit.kernels.native")
if not native.available():  # pragma: no cover - depends on the build
    pytest.skip("native kernels not built", allow_module_level=True)

from lowbit import profile  # noqa: E402
from lowbit.profile import roofline  # noqa: E402


class _Net(nn.Module):
    """Every int8 driver: 3x3 im2col GEMM, 1x1 GEMM, depthwise; a residual add, a pool and a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.conv = nn.Conv2d(32, 32, 3, padding=1)
        self.pw = nn.Conv2d(32, 32, 1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        y = self.dw(torch.relu(self.pw(torch.relu(self.conv(s)))))
        y = torch.relu(y + s)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


#: expected int8 driver per layer, from its geometry alone
DRIVER = {"stem": "conv-im2col", "conv": "conv-im2col", "pw": "conv-1x1", "dw": "depthwise", "fc": "gemm"}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 64, 64)
    q = lowbit.quantize(_Net().eval(), "static", x)
    path = tmp_path_factory.mktemp("profile") / "net.lowbit"
    lowbit.save(q, path)
    return path


def _sums_to_total(run):
    """The profile, once its parts (layers + glue) are within 10% of the plain whole-model median. A loaded
    machine can preempt either side for a whole time slice, so up to three tries."""
    for _ in range(3):
        p = run()
        if abs(p.parts_ms - p.total_ms) <= 0.10 * p.total_ms:
            return p
    raise AssertionError(f"layers + glue {p.parts_ms:.3f} ms vs whole model {p.total_ms:.3f} ms")


def _paths(p: profile.ModelProfile) -> dict[str, str]:
    return {r.name: r.path for r in p.layers if r.name in DRIVER}


def test_layers_and_glue_add_up_to_the_whole_model(model_file, monkeypatch):
    # The parts come from instrumented forwards (layers and the gaps between them, each on its own
    # clock), the whole from plain ones: a layer counted twice or missed breaks the 10%.
    monkeypatch.setenv("LOWBIT_PLAN", "0")  # node by node, timed by hooks (the plan: the test below)
    p = _sums_to_total(lambda: profile.profile_file(model_file, threads=1, repeats=15))
    assert p.mode == "node-by-node"
    assert p.input_shape == [1, 3, 64, 64]  # recorded in the file
    names = {r.name for r in p.layers}
    assert set(DRIVER) <= names
    for r in p.layers:
        assert 0 <= r.kernel_ms <= r.ms
        if r.name in DRIVER:
            assert r.macs > 0 and r.gmacs and r.bound_ms > 0 and r.limit in ("compute", "memory")
    stem = next(r for r in p.layers if r.name == "stem")
    assert stem.macs == 64 * 64 * 32 * 3 * 9
    assert 0 < p.kernel_ms < p.parts_ms and p.peak_gmacs > 0 and p.copy_gbs > 0


@pytest.mark.parametrize("isa", ["portable", "avx2", "vnni"])
def test_kernel_path_is_what_dispatch_ran(model_file, isa, monkeypatch):
    if native._ISA_ORDER.index(isa) > native._ISA_ORDER.index(native.best_isa()):
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv("LOWBIT_PLAN", "0")  # node by node (a model-level plan has its own kernel names)
    model, x = profile.load_for_profile(model_file)
    with native.isa(isa):
        p = profile.profile_model(model, x, repeats=1, warmup=0)
    assert p.isa == isa
    paths = _paths(p)
    want = {n: f"{isa} {d}" for n, d in DRIVER.items()}
    assert paths == want, paths


def test_a_planned_model_is_timed_by_its_plan(model_file):
    """A model that runs as a native plan (lowbit.runtime) is timed step by step by the plan; its steps and
    the glue add up to the plain forward; a node folded into a step says which."""
    runtime = pytest.importorskip("lowbit.runtime")
    model, x = profile.load_for_profile(model_file)
    if runtime.executor_of(model) is None or runtime.executor_of(model).plan_for((x,), {}) is None:
        pytest.skip("this model does not run as a plan here")
    p = _sums_to_total(lambda: profile.profile_model(model, x, repeats=15))
    assert p.mode == "plan"
    rows = {r.name: r for r in p.layers}
    assert all(rows[n].ms > 0 and p.isa in rows[n].path for n in ("stem", "conv", "pw", "dw"))
    assert rows["stem"].macs == 64 * 64 * 32 * 3 * 9


def test_bad_input_is_refused_before_timing(model_file, tmp_path, monkeypatch):
    def no_timing(threads):
        raise AssertionError("timing started")

    monkeypatch.setattr(roofline, "_measure", no_timing)
    with pytest.raises(FileNotFoundError, match="no such file"):
        profile.profile_file(tmp_path / "missing.lowbit")
    junk = tmp_path / "junk.lowbit"
    junk.write_bytes(b"not a model" * 100)
    with pytest.raises(ModelFileError):
        profile.profile_file(junk)
    with pytest.raises(ValueError, match=r"does not accept an input of shape \[1, 64, 64\]"):
        profile.profile_file(model_file, input_shape="1,64,64")
    with pytest.raises(ValueError, match="comma-separated"):
        profile.profile_file(model_file, input_shape="3x64x64")
    for bad in ("3,0,32", "-3,32,32", "3,-1,32"):
        with pytest.raises(ValueError, match=r"sizes >= 1 \(C,H,W\), got '" + bad + "'"):
            profile.profile_file(model_file, input_shape=bad)
    with pytest.raises(ValueError, match="comma-separated"):
        profile.profile_file(model_file, input_shape="")


def test_bad_lowbit_plan_is_refused_before_any_command(model_file, monkeypatch, capsys):
    monkeypatch.setenv("LOWBIT_PLAN", "maybe")
    assert main(["info", str(model_file)]) != 0
    err = capsys.readouterr()
    assert "LOWBIT_PLAN='maybe'" in err.err and err.out == ""


def test_cli_table_json_and_report(model_file, tmp_path, capsys):
    out_json, rep = tmp_path / "p.json", tmp_path / "rep"
    assert main(["profile", str(model_file), "--repeats", "2", "--json", str(out_json), "--report", str(rep),
                 "--input-shape", "3,32,32"]) == 0
    text = capsys.readouterr().out
    assert "kernel path" in text and "x bound" in text and "glue between layers" in text
    d = json.loads(out_json.read_text())
    assert d["input_shape"] == [1, 3, 32, 32] and {r["name"] for r in d["layers"]} >= set(DRIVER)
    assert (rep / "profile.png").read_bytes()[:4] == b"\x89PNG"
    assert "| stem |" in (rep / "profile.md").read_text()
    assert main(["profile", str(tmp_path / "nope.lowbit")]) != 0
