"""The lowbit command end to end on digits, and its errors (non-zero exit, one clear line)."""

import json
import re
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.evaluate import FloatIO

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture()
def ckpt(digits_cnn, tmp_path, monkeypatch):
    """A checkpoint of the trained digits CNN in a temp dir; cwd moved there too."""
    from lowbit.train import save_checkpoint

    model, _, meta = digits_cnn
    path = tmp_path / "cnn.pt"
    save_checkpoint(path, model, meta)
    monkeypatch.chdir(tmp_path)
    return path


def _accuracy(model, splits) -> float:
    """Top-1 accuracy in percent, counted here: the saved model on the test split, inputs quantized as its
    meta says (the integer arithmetic itself is checked in tests/test_exact_models.py)."""
    x, y = splits.test.tensors
    with torch.no_grad():
        pred = FloatIO(model)(x).argmax(-1)
    return 100.0 * int((pred == y).sum()) / len(y)


def _printed_accuracy(text: str, after: str) -> float:
    m = re.search(re.escape(after) + r"\s*([0-9.]+)%", text)
    assert m, text
    return float(m.group(1))


@pytest.fixture(scope="module")
def digits_splits():
    from lowbit.data import load_dataset

    return load_dataset("digits")  # what the CLI loads by default


def test_quantize_then_eval(ckpt, tmp_path, capsys, digits_cnn, digits_splits):
    out = tmp_path / "q.lowbit"
    rc = main(["quantize", "small_cnn", "--checkpoint", str(ckpt), "--method", "full_integer",
               "--option", "io_dtype=int8", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "input  int8" in text
    q = lowbit.load(out)
    assert q.lowbit_meta["input"]["dtype"] == "int8"
    acc = _accuracy(q, digits_splits)
    assert _printed_accuracy(text, "full_integer: test accuracy") == round(acc, 2)
    assert abs(acc - _accuracy(digits_cnn[0], digits_splits)) <= 0.5  # the quality bar of issue 2
    assert main(["eval", str(out), "--repeats", "3"]) == 0
    text = capsys.readouterr().out
    assert "method full_integer" in text and _printed_accuracy(text, "test accuracy") == round(acc, 2)


def test_compare_writes_report_and_chosen_model(ckpt, tmp_path, capsys, digits_cnn, digits_splits):
    rc = main(["compare", "small_cnn", "--checkpoint", str(ckpt), "--methods", "dynamic,static,float16",
               "--repeats", "3", "--report-dir", str(tmp_path / "rep"), "--out", str(tmp_path / "best.lowbit")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "chosen:" in out
    data = json.loads((tmp_path / "rep" / "results.json").read_text())
    methods = [r["method"] for r in data["results"]]
    assert methods == ["float", "dynamic", "static", "float16"]
    assert data["chosen"] in methods[1:]
    for name in ("results.csv", "pareto.png", "index.html"):
        assert (tmp_path / "rep" / name).stat().st_size > 0
    best = lowbit.load(tmp_path / "best.lowbit")
    assert best.lowbit_meta["method"] == data["chosen"]
    acc = {r["method"]: r["accuracy"] for r in data["results"]}
    assert acc["float"] == pytest.approx(_accuracy(digits_cnn[0], digits_splits), abs=1e-9)
    assert acc[data["chosen"]] == pytest.approx(_accuracy(best, digits_splits), abs=1e-9)
    for method, bar in (("dynamic", 1.5), ("static", 0.5), ("float16", 0.1)):  # points below float
        assert acc["float"] - acc[method] <= bar, (method, acc)
    sizes = {r["method"]: r["size_bytes"] for r in data["results"]}
    assert sizes["static"] <= 0.27 * sizes["float"] and sizes["float16"] <= 0.51 * sizes["float"]
    for r in data["results"]:
        assert r["latency_ms"] > 0


def test_select_seed_study(capsys):
    assert main(["select", str(EXAMPLES / "seed_study.csv")]) == 0
    out = capsys.readouterr().out
    assert "chosen: U4" in out
    for v in ("0.39", "19.31", "19.44", "-0.50"):
        assert v in out


@pytest.mark.parametrize("argv,needle", [
    (["quantize", "small_cnn", "--method", "int3", "--out", "x.lowbit"], "unknown method"),
    (["compare", "small_cnn", "--lambdas=-1,1,1"], "non-negative"),
    (["compare", "small_cnn", "--lambdas", "0,0,0"], "not all zero"),
    (["compare", "small_cnn", "--methods", "static,bogus"], "unknown method"),
    (["quantize", "no_such_model", "--method", "static", "--out", "x.lowbit"], "unknown model"),
    (["quantize", "small_cnn", "--data", "imagenet9", "--method", "static", "--out", "x.lowbit"], "imagenet9"),
    (["eval", "missing.lowbit"], "no model file"),
])
def test_errors_exit_nonzero(ckpt, argv, needle, capsys):
    if argv[0] in ("quantize", "compare") and argv[1] == "small_cnn":
        argv = [*argv, "--checkpoint", str(ckpt)]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0
    assert needle in err
    assert "Traceback" not in err


def test_select_missing_columns(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("method,size_bytes\nfloat,100\n")
    assert main(["select", str(bad)]) != 0
    assert "latency_ms" in capsys.readouterr().err


def test_corrupt_model_file_exit(tmp_path, capsys):
    p = tmp_path / "bad.lowbit"
    p.write_bytes(b"garbage" * 10)
    assert main(["eval", str(p)]) != 0
    assert "not a valid lowbit model" in capsys.readouterr().err


def test_methods_and_info(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for m in ("dynamic", "static", "full_integer", "float16"):
        assert m in out
    assert main(["info"]) == 0
    assert "int8 backend" in capsys.readouterr().out
