"""``lowbit bench kernels`` (lowbit.bench.kernels.run) on its quick configuration."""

from __future__ import annotations

import importlib.util
import json
import time

import torch

from lowbit.bench.kernels import QUICK_CASES, run

KEYS = {"case", "impl", "path", "threads", "median_ms", "gops"}


def test_bench_quick(tmp_path, capsys):
    out = tmp_path / "bench.json"
    t0 = time.perf_counter()
    threads_before = torch.get_num_threads()
    records = run(threads=1, json_path=str(out), quick=True)
    assert time.perf_counter() - t0 < 20
    assert torch.get_num_threads() == threads_before
    on_disk = json.loads(out.read_text())
    assert on_disk == records
    assert {r["case"] for r in records} == {c.name for c in QUICK_CASES}
    for r in records:
        assert KEYS <= set(r)
        assert r["threads"] == 1 and r["median_ms"] > 0 and r["gops"] > 0
        assert isinstance(r["path"], str)
    impls = {r["impl"] for r in records}
    expected = {"torch_fp32", "torch_int_mm", "torch_ao_int8"}
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        expected.add("onnxruntime_int8")
    try:
        from lowbit import _native  # noqa: F401

        expected |= {"lowbit_int8", "lowbit_w46", "lowbit_binary"}
    except ImportError:  # pragma: no cover - depends on the build
        pass
    assert expected <= impls
    for case in QUICK_CASES:  # every implementation on every case
        assert expected <= {r["impl"] for r in records if r["case"] == case.name}
    lowbit_paths = {r["path"] for r in records if r["impl"].startswith("lowbit_")}
    assert "portable" in lowbit_paths or not lowbit_paths
    assert all(r["path"] == "" for r in records if not r["impl"].startswith("lowbit_"))
    table = capsys.readouterr().out
    assert "lowbit_w46" in table and "median ms" in table


def test_bench_paths_filter():
    records = run(threads=1, quick=True, paths=["portable"])
    assert {r["path"] for r in records if r["impl"].startswith("lowbit_")} <= {"portable"}
