"""Iterative adaptation to quantization noise (``adapt``): stages and views, one adaptation step lowers the
error against the float network, frozen layers stay frozen, the window is respected, determinism, the
integer result and its file, bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.cli import main
from lowbit.graph import prepare
from lowbit.methods.adapt import Adapt, AdaptConfig, Adapter
from lowbit.models import build
from lowbit.nn import QConv, QLinear
from lowbit.qat.stages import staged_view

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"weight_observer": "minmax", "activation_observer": "minmax", "progress": False}


def _adapter(model, x, **kw):
    cfg = AdaptConfig(**{**FAST, **kw})
    prepared = prepare(model, x[:1])
    qm = Adapt(cfg).fake_quant(prepared, [x])
    return Adapter(qm, prepared.gm, [x], cfg), prepared.gm


def _snapshot(ad):
    return {name: [p.detach().clone() for p in ps] for name, ps in ad.units}


def _changed(before, after):
    return {n for n in before if not all(torch.equal(a, b) for a, b in zip(before[n], after[n], strict=True))}


def test_views_and_stages_of_a_residual_network():
    torch.manual_seed(0)
    model = build("resnet20", 1, 10, 8).eval()
    x = torch.randn(48, 1, 8, 8)
    ad, teacher = _adapter(model, x, steps=0)
    st = ad.st
    with torch.no_grad():
        assert torch.equal(staged_view(ad.qm, set(), set())(x), teacher(x))  # nothing quantized: the float net
        full = staged_view(ad.qm, set(st.layers), set(st.acts))(x)
        assert torch.equal(full, ad.qm.eval()(x))  # everything quantized: the fake-quant model
    index = {name: i for i, name in enumerate(st.layers)}
    nodes = {n.name: n for n in ad.qm.graph.nodes}
    for a in st.acts:  # a quantizer belongs to the last quantized layer upstream of it (the input: layer 0)
        ups, todo = [], [nodes[a]]
        while todo:
            n = todo.pop()
            if n.op == "call_module" and str(n.target) in index:
                ups.append(index[str(n.target)])
            todo.extend(n.all_input_nodes)
        assert st.stage[a] == max(ups, default=0)
    assert sum(st.stage[a] == 0 for a in st.acts) == 2  # the model input and the stem's output
    assert any(n.op == "call_function" and "add" in str(n.target) for n in ad.qm.graph.nodes)
    log = ad.run()
    assert [r["layer"] for r in log] == st.layers


def test_one_step_lowers_the_error_and_trains_only_the_window(digits_cnn):
    model, splits, _ = digits_cnn
    x = splits.calib.tensors[0]
    ad, teacher = _adapter(model, x, bits=(4, 4), window=1, steps=1, batch_size=len(x), lr=1e-4, safeguard=False)
    with torch.no_grad():
        target = teacher(x)
    ad.quantize(0)
    ad.quantize(1)
    before = _snapshot(ad)
    with torch.no_grad():
        e0 = F.mse_loss(ad.view(1)(x), target).item()
    assert ad.adapt(1)["trained"] == [ad.layers[2]]
    with torch.no_grad():
        e1 = F.mse_loss(ad.view(1)(x), target).item()
    assert e1 < e0
    assert _changed(before, _snapshot(ad)) == {ad.layers[2]}
    assert not any(p.requires_grad for p in ad.qm.parameters())  # trainable only while adapt() trains


def _feature_error(ad, teacher, i, name, x):
    """Squared error of the float conv/linear inside ``name`` (layers 0..i quantized) against the teacher's."""
    from lowbit.methods.base import layer_of

    got = {}
    hs = [ad.qm.get_submodule(name).layer.register_forward_hook(lambda _m, _a, y: got.setdefault("s", y)),
          layer_of(teacher.get_submodule(name))[0].register_forward_hook(lambda _m, _a, y: got.setdefault("t", y))]
    with torch.no_grad():
        ad.view(i)(x)
        teacher(x)
    for h in hs:
        h.remove()
    return F.mse_loss(got["s"], got["t"]).item()


def test_feature_term_trains_the_window_towards_the_teachers_features(digits_cnn):
    model, splits, _ = digits_cnn
    x = splits.calib.tensors[0]
    outs = {}
    for fw in (0.0, 100.0):
        ad, teacher = _adapter(model, x, bits=(4, 4), window=1, steps=3, batch_size=len(x), lr=1e-4, feature_weight=fw,
                               safeguard=False)
        ad.quantize(0)
        name = ad.layers[1]
        e0 = _feature_error(ad, teacher, 0, name, x)
        assert ad.adapt(0)["trained"] == [name]
        outs[fw] = (e0, _feature_error(ad, teacher, 0, name, x))
        inner = ad.qm.get_submodule(name).layer
        assert not inner._forward_hooks  # the feature hooks are gone after training
    assert outs[100.0][1] < outs[100.0][0]  # the feature error falls when it is in the loss
    assert outs[100.0][1] < outs[0.0][1]  # and falls further than on the output error alone


def test_frozen_layers_stay_frozen(digits_cnn):
    model, splits, _ = digits_cnn
    x = splits.calib.tensors[0]
    ad, _ = _adapter(model, x, bits=(4, 4), window=2, steps=2, safeguard=False)
    names = [u for u, _ in ad.units]
    frozen: dict[str, list[torch.Tensor]] = {}
    steps = {}
    for i, layer in enumerate(ad.layers):
        ad.quantize(i)
        q = ad.qm.get_submodule(layer).weight_quantizer
        steps[layer] = q.step.step.clone()
        frozen[layer] = [p.detach().clone() for p in ad.units[names.index(layer)][1]]
        before = _snapshot(ad)
        trained = ad.adapt(i)["trained"]
        assert trained == names[names.index(layer) + 1:][:2]
        changed = _changed(before, _snapshot(ad))
        assert changed == set(trained)  # the window and nothing else
    ad.close()
    for layer in ad.layers:  # every layer kept the weights and step it had when it was quantized
        now = [p.detach() for p in ad.units[names.index(layer)][1]]
        assert all(torch.equal(a, b) for a, b in zip(frozen[layer], now, strict=True)), layer
        assert torch.equal(ad.qm.get_submodule(layer).weight_quantizer.step.step, steps[layer])
    assert all(p.requires_grad for p in ad.qm.parameters())  # restored


def test_safeguard_reverts_adaptations_that_hurt_to_the_ptq_model(digits_cnn):
    model, splits, _ = digits_cnn
    x, xt = splits.calib.tensors[0], splits.test.tensors[0]
    kw = {**FAST, "bits": (4, 4), "batch_size": 32, "seed": 1}
    ptq = lowbit.quantize(model, "adapt", calib=x, steps=0, **kw)
    with torch.no_grad():
        want = ptq(xt)
    for lr, why in ((10.0, None), (1e30, "diverged")):  # every adaptation hurts; the loss overflows at 1e30
        bad = lowbit.quantize(model, "adapt", calib=x, steps=3, lr=lr, **kw)
        meta = bad.lowbit_meta["adapt"]
        rows = [r for r in meta["layers"] if r["trained"]]
        assert len(rows) == 5 and meta["reverted"] == [r["layer"] for r in rows]
        assert all(not r["kept"] and r["mse_adapted"] == r["mse_quantized"] for r in rows)
        assert why is None or all(r["stopped"] == why for r in rows)
        with torch.no_grad():
            assert torch.equal(bad(xt), want)  # exactly the sequentially calibrated (PTQ) model
    unguarded = lowbit.quantize(model, "adapt", calib=x, steps=3, lr=10.0, safeguard=False, **kw)
    assert unguarded.lowbit_meta["adapt"]["reverted"] == []
    with torch.no_grad():
        assert not torch.equal(unguarded(xt), want)
    with pytest.raises(FloatingPointError, match="loss became"):
        lowbit.quantize(model, "adapt", calib=x, steps=3, lr=1e30, safeguard=False, **kw)


def test_safeguard_keeps_what_helps_judged_on_held_out_samples(digits_cnn):
    model, splits, _ = digits_cnn
    x = splits.calib.tensors[0]
    ad, teacher = _adapter(model, x, bits=(4, 4), steps=40, lr=1e-4, batch_size=32, patience=2, check_every=5)
    n_held = len(ad.held_target)
    assert n_held == round(0.125 * len(x)) and len(ad.target) == len(x) - n_held
    rows = {tuple(r.tolist()) for r in ad.train_xs[0].flatten(1)}
    assert not any(tuple(r.tolist()) in rows for r in ad.held_xs[0].flatten(1))  # held out of training
    with torch.no_grad():
        held_target = teacher(ad.held_xs[0])
    kept = 0
    for i in range(len(ad.layers) - 1):
        ad.quantize(i)
        before = _snapshot(ad)
        with torch.no_grad():
            e0 = F.mse_loss(ad.view(i)(ad.held_xs[0]), held_target).item()
        row = ad.adapt(i)
        with torch.no_grad():
            e1 = F.mse_loss(ad.view(i)(ad.held_xs[0]), held_target).item()
        assert row["mse_quantized"] == pytest.approx(e0, rel=1e-5) and row["mse_adapted"] == pytest.approx(e1, rel=1e-5)
        if row["kept"]:
            kept += 1
            assert e1 < e0 and _changed(before, _snapshot(ad)) == set(row["trained"])
        else:
            assert e1 == e0 and not _changed(before, _snapshot(ad))
        assert row["steps"] == 40 or (row["stopped"] == "patience" and row["steps"] % 5 == 0)
    assert kept >= 1
    ad.close()


def test_deterministic_under_a_seed(digits_cnn):
    model, splits, _ = digits_cnn
    x = splits.calib.tensors[0]
    outs = []
    for seed in (3, 3, 4):
        q = lowbit.quantize(model, "adapt", calib=x, steps=4, batch_size=32, seed=seed, **FAST)
        with torch.no_grad():
            outs.append(q(splits.test.tensors[0]))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_integer_result_file_and_cli(digits_cnn, tmp_path, capsys):
    from lowbit.evaluate import accuracy
    from lowbit.train import save_checkpoint

    model, splits, meta = digits_cnn
    x = splits.calib.tensors[0]
    float_acc = accuracy(model, splits.test)
    sizes = {}
    for bits in (4, 8):
        q = lowbit.quantize(model, "adapt", calib=x, bits=(bits, bits), steps=3, batch_size=32, **FAST)
        layers = [m for m in q.modules() if isinstance(m, (QConv, QLinear))]
        assert len(layers) == 6 and all(m.packed.format.n_levels == 2**bits for m in layers[1:-1])
        assert q.lowbit_meta["method"] == "adapt" and q.lowbit_meta["adapt"]["wall_time_s"] > 0
        assert len(q.lowbit_meta["adapt"]["layers"]) == 6
        assert accuracy(q, splits.test) >= float_acc - (1.0 if bits == 8 else 5.0)
        sizes[bits] = lowbit.save(q, tmp_path / f"w{bits}.lowbit").stat().st_size
    assert sizes[4] < 0.75 * sizes[8]  # the 4-bit weights are stored packed
    ck = tmp_path / "cnn.pt"
    save_checkpoint(ck, model, meta)
    out = tmp_path / "cli.lowbit"
    assert main(["quantize", "small_cnn", "--checkpoint", str(ck), "--method", "adapt", "--option", "bits=6,6",
                 "--option", "window=2", "--option", "steps=2", "--option", "progress=false",
                 "--out", str(out)]) == 0
    assert "adapt: test accuracy" in capsys.readouterr().out
    loaded = lowbit.load(out)
    assert loaded.lowbit_meta["config"]["window"] == 2 and loaded.lowbit_meta["adapt"]["steps"] == 2


def test_bad_input(digits_cnn):
    model, splits, _ = digits_cnn
    x = splits.calib.tensors[0]
    for bits in ((9, 4), (4, 1), "1"):
        with pytest.raises(ValueError, match=r"2\.\.8"):
            lowbit.quantize(model, "adapt", calib=x, bits=bits)
    for window in (0, "some", True):
        with pytest.raises(ValueError, match="window"):
            AdaptConfig(window=window)
    assert AdaptConfig(window="all").window is None
    with pytest.raises(ValueError, match="initializer"):
        AdaptConfig(act_init="golden")
    for bad in ({"holdout": 0}, {"holdout": 1.0}, {"patience": 0}, {"check_every": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            AdaptConfig(**bad)
    with pytest.raises(ValueError, match="leaves 0 held out"):
        lowbit.quantize(model, "adapt", calib=x[:3], steps=1, holdout=0.1, **FAST)
    with pytest.warns(UserWarning, match=r"over the 35 calibration samples it trains on \(5 more held out\).*overfit"):
        lowbit.quantize(model, "adapt", calib=x[:40], steps=30, batch_size=16, **FAST)
    torch.manual_seed(0)
    one = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    head = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    head[3].requires_grad_(False)
    xf = x.reshape(len(x), 1, 8, 8)
    for net in (one, head):
        with pytest.raises(ValueError, match="no layer after the first one .* has trainable parameters"):
            lowbit.quantize(net, "adapt", calib=xf, **FAST)
        lowbit.quantize(net, "adapt", calib=xf, steps=0, **FAST)  # sequential calibration needs no training
    assert head[3].weight.requires_grad is False


def test_study_adapt_quick(digits_cnn, tmp_path, capsys):
    import json

    from lowbit.study.kinds.adapt import _time_to
    from lowbit.train import save_checkpoint

    model, splits, meta = digits_cnn
    ck = tmp_path / "float.pt"
    save_checkpoint(ck, model, meta)
    out = tmp_path / "res" / "adapt.md"
    argv = ["study", "adapt", "--quick", "--checkpoint", str(ck), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    text = out.read_text()
    methods = ["ptq", "correct", "adapt_1", "adapt_2", "lsq_equal", "lsq_long"]
    assert "lowbit study adapt --quick" in text and "CPU:" in text and "## W4A4" in text
    assert all(f"| {m} |" in text for m in methods) and "- adapt_1: recovers" in text and "reverted " in text
    recs = [json.loads(x) for x in (tmp_path / "res" / "adapt.jsonl").read_text().splitlines()[1:]]
    by = {r["id"]["method"]: r for r in recs}
    assert sorted(by) == sorted(methods) and all(r["acc"] > 90 and r["time_s"] > 0 for r in recs)
    assert by["ptq"]["observer"] in ("minmax", "mse") and by["correct"]["observer"] == "mse"
    assert [row["steps"] for row in by["adapt_1"]["layers"]] == [5] * 5 + [0]  # the last layer has no window
    assert by["lsq_equal"]["epochs"] == pytest.approx(5 * 5 * 32 / len(splits.train))
    times = [t for _e, _a, t in by["lsq_long"]["curve"]]
    assert len(times) == 3 and times == sorted(times)
    curve = [[0.0, 90.0, 0.0], [0.1, 93.0, 1.0], [0.2, 92.0, 2.0], [0.3, 94.0, 3.0]]
    assert _time_to(curve, 93.0) == 1.0 and _time_to(curve, 93.0, for_good=True) == 3.0
    assert _time_to(curve, 95.0) is None and _time_to(curve, 95.0, for_good=True) is None
    assert (tmp_path / "res" / "adapt-w4a4-lsq.png").stat().st_size > 1000
    before = (tmp_path / "res" / "adapt.jsonl").read_text()
    assert main(argv) == 0 and (tmp_path / "res" / "adapt.jsonl").read_text() == before  # nothing runs again
    for bad, msg in ((["--windows", "all,0"], "--windows"), (["--qat-long", "3,3"], "not in --bits"),
                     (["--qat-equal", "4,4", "2,2"], "--qat-equal bit widths [(2, 2)]"),
                     (["--bits", "9,9"], "2..8"), (["--observers", "mse,best"], "unknown observer")):
        assert main(["study", "adapt", "--out", str(tmp_path / "bad.md"), *bad]) == 2
        assert msg in capsys.readouterr().err


def test_compare_reports_the_time_to_quantize(digits_cnn):
    model, splits, _ = digits_cnn
    res = lowbit.compare(model, splits.calib, lambda m: lowbit.evaluate.accuracy(m, splits.test),
                         methods=["static", "adapt"], repeats=1, report_dir=None, progress=False,
                         configs={"adapt": AdaptConfig(steps=3, **FAST)})
    rows = {r["method"]: r for r in res.rows}
    assert rows["float"]["quantize_s"] is None and rows["static"]["quantize_s"] >= 0
    wall = res.models["adapt"].lowbit_meta["adapt"]["wall_time_s"]
    assert wall <= rows["adapt"]["quantize_s"] + 0.01
    assert "quantize_s" in res.table().splitlines()[0]
