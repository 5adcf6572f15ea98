"""The w46 method (and its w4 / w8 baselines): level pairs, the integer model on the 4.6-bit kernels, the
layer-wise correction stage, packed files, fall-backs and bad input."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import lowbit
from lowbit.evaluate import accuracy
from lowbit.kernels import w46_dispatch
from lowbit.kernels.w46 import PackedW46
from lowbit.methods.w46 import PAIRS, check_pair, parse_pair
from lowbit.nn import QConv, QLinear

pytestmark = pytest.mark.usefixtures("one_thread")


def _layers(gm):
    return [m for m in gm.modules() if isinstance(m, (QConv, QLinear))]


@pytest.fixture(scope="module")
def rounded(digits_cnn):
    """w46 (25, 21) by plain rounding (stage 1 off)."""
    model, splits, _ = digits_cnn
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return lowbit.quantize(model, "w46", calib=splits.calib, correction_steps=0, progress=False)
    finally:
        torch.set_num_threads(old)


def test_pairs():
    assert PAIRS == {"29x19": (29, 19), "25x21": (25, 21), "23x23": (23, 23)}
    assert parse_pair("29x19") == (29, 19) and parse_pair("25,21") == (25, 21) and parse_pair((7, 35)) == (7, 35)
    for good in [(29, 19), (25, 21), (23, 23), (255, 3), (3, 255), (7, 41)]:
        check_pair(*good)
    with pytest.raises(ValueError, match=r"K_x·K_w = 13·10 = 130 .* at most N_x = 25"):
        check_pair(27, 21)
    with pytest.raises(ValueError, match="No N_x >= 3 works with N_w = 257"):
        check_pair(3, 257)
    with pytest.raises(ValueError, match="must be odd"):
        check_pair(25, 20)
    with pytest.raises(ValueError, match="pair must be"):
        parse_pair("25x21x3")
    with pytest.raises(ValueError, match="exceeds 127|breaks K_x"):
        lowbit.quantize(torch.nn.Linear(4, 2), "w46", calib=torch.randn(8, 4), pair="27,21")


def test_rounded_model_layout(rounded):
    """Every layer on the 4.6-bit kernel: weights in [-10, 10], inputs 25 levels, clip = quantile of |W|."""
    meta = rounded.lowbit_meta["w46"]
    assert meta["pair"] == [25, 21] and meta["fallbacks"] == {}
    assert set(meta["kernels"].values()) == {"w46"}
    layers = _layers(rounded)
    assert len(layers) == 6
    for m in layers:
        p = m.packed
        assert isinstance(p, PackedW46) and (p.K_w, p.K_x) == (10, 12)
        assert int(p.codes.abs().max()) == 10
        assert m.in_spec.format.n_levels == 25 and m.in_spec.format.qmin == 0


def test_weight_step_is_quantile_bins(digits_cnn):
    """step = 2a / N_w with a the (1 - 1e-4) quantile of |W| per output channel (BatchNorm folded)."""
    model, splits, _ = digits_cnn
    from lowbit.graph import prepare

    gm = lowbit.quantize(model, "w46", calib=splits.calib, correction_steps=0, progress=False)
    folded = prepare(model, splits.calib.tensors[0][:1]).gm
    w = folded.get_submodule("fc1").layer.weight.detach()  # fc1 + ReLU, fused
    n = w.shape[1]
    a = w.abs().kthvalue(math.ceil((1 - 1e-4) * n), dim=1).values
    fc1 = gm.get_submodule("fc1")
    torch.testing.assert_close(fc1.weight_scale, 2 * a / 21, rtol=0, atol=0)
    want = torch.clamp(torch.round(w / (2 * a / 21)[:, None]), -10, 10).to(torch.int8)
    assert torch.equal(fc1.weight_q, want)


def test_integer_execution_matches_the_reference(rounded, digits_cnn, monkeypatch):
    """The same model on the 4.6-bit kernel, on the int8 kernel (same codes) and on the plain-PyTorch
    reference gives identical outputs; the accuracy stays near the float model's."""
    model, splits, _ = digits_cnn
    x = splits.test.tensors[0][:64]
    outs = {}
    for mode in ("w46", "int8"):
        w46_dispatch.set_dispatch(mode)
        try:
            outs[mode] = rounded(x)
        finally:
            w46_dispatch.set_dispatch(None)
    monkeypatch.setenv("LOWBIT_KERNELS", "torch")
    outs["reference"] = rounded(x)
    assert torch.equal(outs["w46"], outs["int8"]) and torch.equal(outs["w46"], outs["reference"])
    assert accuracy(rounded, splits.test) >= accuracy(model, splits.test) - 2.0


def test_correction_lowers_output_mse(digits_cnn, rounded):
    """Stage 1 (fixed seed) lowers the network output's MSE against the float model compared with plain
    rounding, on the calibration data it learned from and on held-out test data."""
    model, splits, _ = digits_cnn
    corrected = lowbit.quantize(model, "w46", calib=splits.calib, correction_steps=60, seed=0, progress=False)
    rows = corrected.lowbit_meta["w46"]["stages"]["correction"]
    assert len(rows) == 6 and all(r["mse"] <= r["mse_rounding"] for r in rows) and any(r["kept"] for r in rows)
    for x in (splits.calib.tensors[0], splits.test.tensors[0][:300]):
        with torch.no_grad():
            ref = model(x)
            e_round = torch.mean((rounded(x) - ref) ** 2).item()
            e_corr = torch.mean((corrected(x) - ref) ** 2).item()
        assert e_corr < 0.9 * e_round, (e_corr, e_round)


def test_nan_in_correction_is_an_error(digits_cnn):
    model, splits, _ = digits_cnn
    with pytest.raises(FloatingPointError, match=r"layer 'features\.0': the correction stage's loss became"):
        lowbit.quantize(model, "w46", calib=splits.calib, correction_steps=5, correction_lr=1e38, progress=False)


def test_packed_file_and_info(rounded, digits_cnn, tmp_path, capsys):
    model, splits, _ = digits_cnn
    p46 = lowbit.save(rounded, tmp_path / "w46.lowbit")
    s8 = lowbit.save(lowbit.quantize(model, "static", calib=splits.calib), tmp_path / "int8.lowbit")
    assert p46.stat().st_size <= 0.62 * s8.stat().st_size
    loaded = lowbit.load(p46)
    x = splits.test.tensors[0][:32]
    assert torch.equal(loaded(x), rounded(x))
    assert all(isinstance(m.packed, PackedW46) for m in loaded.modules() if isinstance(m, (QConv, QLinear)))
    from lowbit.cli import main

    assert main(["info", str(p46)]) == 0
    out = capsys.readouterr().out
    assert "w46" in out and "radix" in out and "329,504 integer weights: 4.572 bits per weight" in out


def test_first_last_int8_fall_back_listed(digits_cnn):
    """Layers whose levels break the bound run the int8 kernel, each listed with the reason; exact anyway."""
    model, splits, _ = digits_cnn
    gm = lowbit.quantize(model, "w46", calib=splits.calib, correction_steps=0, first_last="int8", progress=False)
    fb = gm.lowbit_meta["w46"]["fallbacks"]
    assert set(fb) == {"features_0", "fc2"}
    assert all("K_x·K_w" in why and "> 127" in why for why in fb.values())
    kinds = gm.lowbit_meta["w46"]["kernels"]
    assert kinds["features_0"] == "int8" and kinds["fc1"] == "w46"
    x = splits.test.tensors[0][:16]
    w46_dispatch.set_dispatch("int8")
    try:
        want = gm(x)
    finally:
        w46_dispatch.set_dispatch(None)
    assert torch.equal(gm(x), want)


def test_baselines_levels(digits_cnn):
    model, splits, _ = digits_cnn
    for name, wlv, alv in (("w4", (-8, 7), 16), ("w8", (-128, 127), 256)):
        gm = lowbit.quantize(model, name, calib=splits.calib, correction_steps=0, progress=False)
        for m in _layers(gm):
            assert (m.packed.format.qmin, m.packed.format.qmax) == wlv and m.packed.kernel == "int8"
            assert m.in_spec.format.n_levels == alv


def test_bad_options(digits_cnn):
    model, splits, _ = digits_cnn
    with pytest.raises(ValueError, match="gradual freezing trains on labelled data"):
        lowbit.quantize(model, "w46", calib=splits.calib, freeze_epochs=0.5)
    with pytest.raises(ValueError, match="sets its own ranges"):
        lowbit.quantize(model, "w46", calib=splits.calib, activation_observer="kl")
    with pytest.raises(ValueError, match="first_last"):
        lowbit.quantize(model, "w8", calib=splits.calib, first_last="edges")


def test_dispatch_rule(monkeypatch):
    """On every path the faster kernel is measured once per problem (and path) and cached; a forced mode
    wins; a bad mode is an error."""
    import time

    calls = {"w46": 0, "int8": 0}

    def slow():
        calls["w46"] += 1
        time.sleep(0.002)

    def fast():
        calls["int8"] += 1

    w46_dispatch.clear()
    assert w46_dispatch.choose(("p", 1), "avx2", 1, slow, fast) == "int8"
    assert w46_dispatch.choose(("p", 1), "vnni", 1, fast, slow) == "w46"
    n = dict(calls)
    assert n["w46"] >= 6 and n["int8"] >= 6
    assert w46_dispatch.choose(("p", 1), "vnni", 1, fast, slow) == "w46" and calls == n  # cached per path
    assert [c["kernel"] for c in w46_dispatch.choices()] == ["int8", "w46"]
    w46_dispatch.set_dispatch("w46")
    try:
        assert w46_dispatch.choose(("p", 1), "vnni", 1, slow, fast) == "w46"
    finally:
        w46_dispatch.set_dispatch(None)
    monkeypatch.setenv("LOWBIT_W46_DISPATCH", "fastest")
    with pytest.raises(ValueError, match="LOWBIT_W46_DISPATCH"):
        w46_dispatch.dispatch_mode()
    w46_dispatch.clear()


def test_study_w46_quick(digits_cnn, tmp_path, capsys):
    """`lowbit study w46 --quick`: every method x seed x stage measured, the claim checked, sizes and speed
    rows written; a second call reuses the results file; a bad pair fails before any work."""
    import json

    from lowbit.cli import main

    model, _, meta = digits_cnn
    ck = tmp_path / "float.pt"
    lowbit.train.save_checkpoint(ck, model, meta)
    out = tmp_path / "res" / "w46.md"
    argv = ["study", "w46", "--quick", "--models", "small_cnn", "--checkpoint", str(ck), "--out", str(out),
            "--no-progress"]
    assert main(argv) == 0
    text = out.read_text()
    assert "lowbit study w46 --quick" in text and "CPU:" in text and "Claim (4.6-bit" in text
    assert all(f"| {m} |" in text for m in ("w46", "w4", "w8")) and "| w46 | avx2 |" in text
    peers = ["torch.ao int8"] + (["ONNX Runtime int8"] if importlib.util.find_spec("onnxruntime") else [])
    assert all(f"| {p} | its own (best ISA) |" in text for p in peers) and "against the int8 peers" in text
    recs = [json.loads(x) for x in (tmp_path / "res" / "w46.jsonl").read_text().splitlines()[1:]]
    assert len(recs) == 6
    by = {(r["id"]["method"], r["id"]["seed"]): r for r in recs}
    for s in (0, 1):
        assert by["w46", s]["bytes"] <= 0.62 * by["w8", s]["bytes"]
        assert 4.5 < by["w46", s]["code_bits_per_weight"] < 4.6 and by["w8", s]["code_bits_per_weight"] == 8.0
        assert by["w8", s]["acc_rounding"] > 90.0 and by["w46", s]["fallbacks"] == []
        assert all(c["mse"] <= c["mse_rounding"] for c in by["w46", s]["correction"])
    before = (tmp_path / "res" / "w46.jsonl").read_text()
    assert main([*argv, "--speed-repeats", "0"]) == 0  # every run is in the results file: nothing is redone
    assert (tmp_path / "res" / "w46.jsonl").read_text() == before and "speed vs w8" not in out.read_text()
    assert "6 runs (6 taken from the results file of an earlier invocation)" in out.read_text()
    sub = tmp_path / "res" / "w8.md"  # a subset of the methods, from the same results file
    assert main([*argv[:-3], "--out", str(sub), "--results", str(tmp_path / "res" / "w46.jsonl"), "--methods", "w8",
                 "--speed-repeats", "0", "--no-progress"]) == 0
    assert "| w8 |" in sub.read_text() and "| w46 |" not in sub.read_text() and "Claim" not in sub.read_text()
    assert main(["study", "w46", "--quick", "--pair", "27,21", "--out", str(out)]) == 2
    assert "K_x·K_w = 13·10 = 130" in capsys.readouterr().err
    assert main(["study", "w46", "--quick", "--methods", "w46,w2", "--out", str(out)]) == 2
    assert "--methods takes a subset of w46,w4,w8" in capsys.readouterr().err


def test_cli_quantize_and_compare_run_gradual_freezing(digits_cnn, tmp_path):
    """`lowbit quantize --method w46` and `lowbit compare --methods w46,...` pass the training split, so the
    gradual-freezing stage runs (and the pair option is parsed); compare's default method list does not."""
    from unittest import mock

    from lowbit import compare as compare_mod
    from lowbit.cli import main

    model, splits, meta = digits_cnn
    ck = tmp_path / "float.pt"
    lowbit.train.save_checkpoint(ck, model, meta)
    out = tmp_path / "q.lowbit"
    assert main(["quantize", "small_cnn", "--checkpoint", str(ck), "--method", "w46", "--option", "pair=29x19",
                 "--option", "correction_steps=0", "--option", "freeze_epochs=0.02", "--option", "progress=false",
                 "--out", str(out)]) == 0
    info = lowbit.load(out).lowbit_meta["w46"]
    assert info["pair"] == [29, 19] and [r["layers_integer"] for r in info["stages"]["freezing"]] == [1, 2, 3, 4, 5]
    seen = {}
    real = compare_mod.quantize

    def spy(model, name, **kw):
        seen[name] = "train" in kw
        return real(model, name, **kw)

    with mock.patch.object(compare_mod, "quantize", spy), mock.patch.object(compare_mod, "available_methods",
                                                                            return_value=["static", "w4"]):
        for methods in (["static", "w4"], None):
            compare_mod.compare(model, splits.calib, lambda m: accuracy(m, splits.test), methods=methods,
                                train=splits.train, configs={"w4": {"correction_steps": 0, "progress": False}},
                                report_dir=None, repeats=1, warmup=0, progress=False)
            assert seen == ({"static": False, "w4": True} if methods else {"static": False, "w4": False})
