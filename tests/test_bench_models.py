"""``lowbit bench models`` on its quick configuration (resnet20 @32, every implementation, 1 thread)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from lowbit.bench.models import DEFAULT_IMPLS, run
from lowbit.bench.nets import NETS, make_net
from lowbit.cli import main


def test_bench_models_quick(tmp_path, capsys):
    out = tmp_path / "models.json"
    before = torch.get_num_threads()
    records = run(quick=True, threads=[1], json_path=str(out))
    assert torch.get_num_threads() == before
    assert json.loads(out.read_text()) == records
    impls = {r["impl"] for r in records}
    expected = set(DEFAULT_IMPLS)
    if not (importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx")):
        expected -= {"ort_fp32", "ort_int8"}  # pragma: no cover - optional peer
    assert expected <= impls
    by = {r["impl"]: r for r in records}
    for r in records:
        assert {"model", "impl", "threads", "median_ms", "rel_l2", "spread", "cpu"} <= set(r)
        assert r["model"] == "resnet20" and r["threads"] == 1 and r["median_ms"] > 0
    # output agreement: exact for the float model itself, float-level for ONNX Runtime fp32, a few
    # percent for the int8 models (random weights, BatchNorm re-estimated so outputs depend on the input)
    assert by["torch_fp32"]["rel_l2"] == 0.0
    if "ort_fp32" in by:
        assert by["ort_fp32"]["rel_l2"] < 1e-4
    for impl in ("lowbit_static", "lowbit_dynamic", "torch_ao_int8", "ort_int8"):
        if impl in by:
            assert 1e-4 < by[impl]["rel_l2"] < 0.2, (impl, by[impl]["rel_l2"])
    table = capsys.readouterr().out
    assert "lowbit_static vs the faster int8 peer" in table and "logical CPUs" in table


def test_bench_models_w46_pipeline(capsys):
    """``--impls lowbit_w8,lowbit_w46``: the w46 pipeline's 8-bit and 4.6-bit models (plain rounding) are
    timed beside the peers, their outputs agree with fp32 to their quantization, the table gives their ratio."""
    records = run(quick=True, impls=["torch_fp32", "lowbit_w8", "lowbit_w46"], threads=[1])
    by = {r["impl"]: r for r in records}
    assert set(by) == {"torch_fp32", "lowbit_w8", "lowbit_w46"}
    assert 1e-4 < by["lowbit_w8"]["rel_l2"] < by["lowbit_w46"]["rel_l2"] < 0.3, by
    assert by["lowbit_w46"]["median_ms"] > 0
    assert "lowbit_w46 vs lowbit_w8:" in capsys.readouterr().out


def test_bench_nets_depend_on_their_input():
    """BatchNorm re-estimation: the logits of the random-weight nets change with the input."""
    for name in NETS:  # all at 32x32 (the ImageNet nets pool adaptively), to keep this quick
        model, size = make_net(name, size=32, bn_batch_size=4)
        with torch.no_grad():
            a, b = model(torch.randn(1, 3, size, size)), model(torch.randn(1, 3, size, size))
        assert (a - b).norm() / a.norm() > 0.05, name
        assert not any(math.isnan(float(v)) for v in a.flatten()[:5])


@pytest.mark.parametrize("argv,word", [(["--models", "resnet99"], "resnet99"), (["--threads", "0"], "threads"),
                                       (["--impls", "tflite"], "tflite")])
def test_bench_models_bad_arguments(argv, word, capsys):
    """Refused before any model is built, naming the bad value."""
    assert main(["bench", "models", *argv]) != 0
    assert word in capsys.readouterr().err


def test_isa_caps_are_reported(monkeypatch):
    """The instruction-set caps in effect are named (they change what the peers' figures mean)."""
    from lowbit.bench.models import PEER_ISA_SWITCHES, isa_caps

    for k in ("LOWBIT_ISA", *PEER_ISA_SWITCHES):
        monkeypatch.delenv(k, raising=False)
    assert isa_caps() == ""
    monkeypatch.setenv("LOWBIT_ISA", "avx2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    caps = isa_caps()
    assert "LOWBIT_ISA=avx2" in caps and "ONEDNN_MAX_CPU_ISA=AVX2" in caps and "ONNX Runtime" in caps
