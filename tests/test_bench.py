"""``lowbit bench kernels`` (lowbit.bench.kernels.run) on its quick configuration.

Benchmarks are not timed tests: nothing here asserts a duration; the records must be complete and
consistent, and every lowbit path this CPU runs must be measured. The test skips only when the native
module is really absent.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from lowbit.bench.kernels import QUICK_CASES, run

native = pytest.importorskip("lowbit.kernels.native")
if not native.available():  # pragma: no cover - depends on the build
    pytest.skip("lowbit._native is not built: the benchmark compares its kernels", allow_module_level=True)

KEYS = {"case", "impl", "path", "threads", "median_ms", "gops", "repeats", "kernel", "vs_torch_fp32", "vs_torch_int8",
        "vs_lowbit_int8"}
_RANK = {"portable": 0, "avx2": 2, "avx512bw": 3, "vnni": 4}


def test_bench_quick(tmp_path, capsys):
    out = tmp_path / "bench.json"
    threads_before = torch.get_num_threads()
    native_before = (native.num_threads(), native.isa_cap())
    records = run(threads=1, json_path=str(out), quick=True)
    assert torch.get_num_threads() == threads_before
    assert (native.num_threads(), native.isa_cap()) == native_before  # restored
    assert json.loads(out.read_text()) == records
    assert {r["case"] for r in records} == {c.name for c in QUICK_CASES}
    for r in records:
        assert KEYS <= set(r)
        assert r["threads"] == 1 and r["repeats"] >= 1
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0
        case = next(c for c in QUICK_CASES if c.name == r["case"])
        assert r["gops"] == pytest.approx(case.ops / (r["median_ms"] * 1e-3) / 1e9, rel=1e-9)
    expected = {"torch_fp32", "torch_int_mm", "torch_ao_int8", "lowbit_int8", "lowbit_w46", "lowbit_binary"}
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        expected.add("onnxruntime_int8")
    for case in QUICK_CASES:  # every implementation on every case
        assert expected <= {r["impl"] for r in records if r["case"] == case.name}
    best = native.best_isa()
    runnable = {p for p in _RANK if best != "neon" and _RANK[p] <= _RANK.get(best, 0)} | {"portable"}
    for fam in ("lowbit_int8", "lowbit_w46", "lowbit_binary"):
        paths = {r["path"] for r in records if r["impl"] == fam}
        assert "portable" in paths and paths <= runnable, (fam, paths)
        kernels = [r["kernel"] for r in records if r["impl"] == fam and r["case"] == QUICK_CASES[0].name]
        assert len(kernels) == len(set(kernels)), (fam, kernels)  # a cap running the same kernel is not repeated
    assert all(r["path"] == "" for r in records if not r["impl"].startswith("lowbit_"))
    table = capsys.readouterr().out
    assert "lowbit_w46" in table and "median ms" in table


def test_bench_paths_filter():
    records = run(threads=1, quick=True, paths=["portable"])
    lb = [r for r in records if r["impl"].startswith("lowbit_")]
    assert lb and {r["path"] for r in lb} == {"portable"}
    with pytest.raises(ValueError, match="unknown dispatch path"):
        run(threads=1, quick=True, paths=["sse9"])


def test_bench_lowbit_int8_ratio_and_impls_filter():
    """``vs_lowbit_int8``: each lowbit row against the int8 kernel its own cap runs (the BM target's ratio)."""
    want = ["lowbit_int8", "lowbit_bm8", "lowbit_bm16", "torch_fp32"]
    records = run(threads=1, quick=True, impls=want)
    assert {r["impl"] for r in records} == set(want)
    for case in QUICK_CASES:
        rows = [r for r in records if r["case"] == case.name]
        int8 = {r["kernel"]: r["median_ms"] for r in rows if r["impl"] == "lowbit_int8"}
        for r in rows:
            if not r["path"]:
                assert r["vs_lowbit_int8"] is None
                continue
            with native.isa(r["path"]):  # the int8 kernel this row's cap runs (its own row may be a higher path's)
                ref = native.int8_isa()
            assert r["vs_lowbit_int8"] == pytest.approx(int8[ref] / r["median_ms"], rel=1e-9)
        assert {r["path"] for r in rows if r["impl"] == "lowbit_bm16"} >= {"portable"}
    with pytest.raises(ValueError, match="unknown implementation"):
        run(threads=1, quick=True, impls=["lowbit_bm32"])


def test_bench_honours_the_isa_cap():
    """Under ``LOWBIT_ISA=avx2`` (here: the process cap) no row runs above AVX2, and the cap is kept."""
    before = native.isa_cap()
    native.set_isa("avx2")
    try:
        records = run(threads=1, quick=True, impls=["lowbit_int8", "lowbit_bm8"])
        assert native.isa_cap() == "avx2"
        paths = {r["path"] for r in records}
        assert "portable" in paths and paths <= {"portable", "avx2"}
        if _RANK.get(native.best_isa(), 0) >= _RANK["avx2"]:
            assert "avx2" in paths
    finally:
        native.set_isa(before)
