"""``lowbit bm`` (quick form), ``lowbit info FILE`` operation counts, BM models in ``compare``."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit
import lowbit.bm as bm
from lowbit.cli import main


@pytest.fixture(autouse=True, scope="module")
def _torch_single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_lowbit_bm_quick_and_info(tmp_path, capsys):
    out, report, js = tmp_path / "bm.lowbit", tmp_path / "bm.md", tmp_path / "bm.json"
    rc = main(["bm", "small_cnn", "--quick", "--layers", "fc1", "--code-bits", "16", "--out", str(out),
               "--report", str(report), "--json", str(js), "--runs-dir", str(tmp_path / "runs"), "--no-progress",
               "--threads", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "seed 0: float" in text and "| mean ± std |" in text
    rec = json.loads(js.read_text())["records"][0]
    assert rec["layers"] == ["fc1"] and rec["integer"]["16"]["ops"]["lookup"] > 0
    md = report.read_text()
    assert "### small_cnn on digits, layers: fc1" in md and "lowbit bm small_cnn" in md and "CPU:" in md
    # a second run of the same model replaces its section instead of appending another
    from lowbit.bm.cli import write_report

    key = "small_cnn:digits:fc1"
    write_report(report, f"<!-- lowbit-bm:{key} -->\nNEW\n<!-- /lowbit-bm:{key} -->", key)
    assert report.read_text().count(f"<!-- lowbit-bm:{key} -->") == 1 and "NEW" in report.read_text()
    q = lowbit.load(out)
    assert q.lowbit_meta["method"] == "bm" and q.lowbit_meta["input_shape"] == [1, 8, 8]
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    line = next(ln for ln in info.splitlines() if ln.startswith("fc1 "))
    assert line.split()[1] == "QBMLinear" and line.split()[2] == "0"  # no multiplication in the BM layer


def test_lowbit_bm_seeds_share_a_checkpoint(tmp_path, capsys):
    """``--checkpoint`` with several seeds: one float model (trained once, then reused), BM seeds vary."""
    ck, js, md = tmp_path / "float.pt", tmp_path / "bm.json", tmp_path / "bm.md"
    rc = main(["bm", "small_cnn", "--quick", "--layers", "fc2", "--code-bits", "8", "--seeds", "3,4",
               "--checkpoint", str(ck), "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "bm.lowbit"),
               "--json", str(js), "--report", str(md), "--no-progress", "--threads", "1"])
    assert rc == 0 and ck.exists() and not (tmp_path / "runs").exists()
    recs = json.loads(js.read_text())["records"]
    assert [r["seed"] for r in recs] == [3, 4] and [r["float_seed"] for r in recs] == [3, 3]
    assert recs[0]["float_acc"] == recs[1]["float_acc"]
    assert "Float model: one checkpoint (seed 3) for every seed" in md.read_text()
    capsys.readouterr()


def test_lowbit_bm_bad_options(capsys):
    assert main(["bm", "small_cnn", "--quick", "--code-bits", "12"]) == 2
    assert "--code-bits" in capsys.readouterr().err
    assert main(["bm", "small_cnn", "--quick", "--layers", "nope"]) == 2
    assert "no convertible layer matches 'nope'" in capsys.readouterr().err
    assert main(["info", "--input-shape", "1,8", "/nonexistent.lowbit"]) == 2


def test_bm_model_in_compare(digits_cnn, tmp_path):
    from lowbit.compare import compare
    from lowbit.evaluate import accuracy

    model, splits, _ = digits_cnn
    q = bm.quantize_bm(bm.convert(model, ["fc1"]), splits.calib.tensors[0])
    res = compare(model, splits.calib, lambda m: accuracy(m, splits.test), methods=["float16"],
                  models={"bm": q}, repeats=3, warmup=1, report_dir=tmp_path / "rep", progress=False)
    rows = {r["method"]: r for r in res.rows}
    assert set(rows) == {"float", "float16", "bm"}
    assert rows["bm"]["mul"] < rows["float16"]["mul"] and rows["bm"]["max"] > 500_000
    assert rows["bm"]["accuracy"] > 90
    assert " mul" in res.table().splitlines()[0]
    with pytest.raises(ValueError, match="both as a method and as a ready model"):
        compare(model, splits.calib, lambda m: 0.0, methods=["static"], models={"static": q},
                report_dir=None, progress=False)
