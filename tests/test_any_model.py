"""Issue 13: any model — graph-free dynamic / weight_only / float16 on transformers, recurrent nets and
models with control flow; static with float islands through torch.export; ties; bad input."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.io import ModelFileError
from lowbit.methods.module_swap import NoQuantizableLayerError
from lowbit.nn import DynamicQLinear, DynamicQMultiheadAttention, DynamicQRNN, QLinear, WeightOnly

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bert():
    """A 2-layer, hidden-64 BERT from a config (random weights) and a batch of token ids."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=300, max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (4, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    return model, cfg, (ids, mask)


def _hidden(out):
    return out["last_hidden_state"]


def _min_cos(a, b):
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).min())


# ------------------------------------------------------------------------------ reference arithmetic

def _ref_tensor_q(x):
    """uint8 codes of x with one (scale, zero point) from its range (independent of lowbit's code)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if hi == lo:  # all zero (a recurrent layer's first state): every code is the zero point
        return torch.zeros(x.shape, dtype=torch.int64), 1.0
    s = float(torch.tensor((hi - lo) / 255.0, dtype=torch.float32))
    z = min(255, max(0, round(-lo / s)))
    return torch.clamp(torch.round(x / s) + z, 0, 255).to(torch.int64) - z, s


def _ref_dynamic_linear(x, w_q, w_s, b, per_token):
    x2 = x.reshape(-1, x.shape[-1])
    if per_token:
        s = (x2.abs().amax(1, keepdim=True).double() / 127).float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.clamp(torch.round(x2 / s), -127, 127).to(torch.int64)
    else:
        q, s = _ref_tensor_q(x2)
    acc = q @ w_q.to(torch.int64).t()  # exact integers
    y = acc.double() * (torch.as_tensor(s, dtype=torch.float64) * w_s.double())
    if b is not None:
        y = y + b.double()
    return y.reshape(*x.shape[:-1], -1)


def _ref_int8_rows(w):
    s = (w.abs().amax(1).double() / 127).float()
    return torch.clamp(torch.round(w / s[:, None]), -127, 127).to(torch.int8), s


@pytest.mark.parametrize("per_token", [False, True])
def test_dynamic_linear_matches_integer_reference(per_token):
    """A dynamic linear layer is the integer product of the reference codes, dequantized (float rounding
    only: relative 1e-5)."""
    torch.manual_seed(3)
    w = torch.randn(24, 40)
    w_q, w_s = _ref_int8_rows(w)
    b = torch.randn(24)
    m = DynamicQLinear(w_q, w_s, b, None, per_token)
    x = torch.randn(3, 7, 40) * torch.logspace(-2, 1, 7)[None, :, None]  # rows of very different ranges
    want = _ref_dynamic_linear(x, w_q, w_s, b, per_token)
    got = m(x)
    assert got.shape == (3, 7, 24)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # per token keeps small rows accurate where one scale per tensor cannot
    exact = x @ w.t() + b
    err = (got - exact).abs().amax(-1)[:, 0] / exact.abs().amax(-1)[:, 0]
    assert (float(err.max()) < 0.05) == per_token


def test_input_read_by_several_layers_is_quantized_once(monkeypatch):
    """q, k, v projections of one tensor quantize it once; an in-place change of the tensor is seen."""
    import lowbit.nn.dynamic_act as da

    torch.manual_seed(2)
    layers = [DynamicQLinear(*_ref_int8_rows(torch.randn(8, 16)), None) for _ in range(3)]
    calls = []
    real = da.quantize_codes
    monkeypatch.setattr(da, "quantize_codes", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(5, 16)
    ys = [m(x) for m in layers]
    assert len(calls) == 1
    for m, y in zip(layers, ys, strict=True):
        torch.testing.assert_close(y, m(x.clone()))
    x.mul_(-2)
    torch.testing.assert_close(layers[0](x), layers[0](x.clone()))
    assert len(calls) == 6
    with torch.inference_mode():  # inference tensors (no version counter) are quantized each time
        xi = torch.randn(5, 16)
        y0 = layers[0](xi)
        xi.mul_(3)
        torch.testing.assert_close(layers[0](xi), layers[0](xi.clone()))
        assert not torch.equal(y0, layers[0](xi))


def _ref_rnn(mode, x, params, hidden, layers, bidirectional, per_token):
    """Step-by-step LSTM/GRU with every product by the reference dynamic linear ([T, B, I] input)."""
    dirs = 2 if bidirectional else 1
    inp, hs = x, []
    for layer in range(layers):
        outs = []
        for sfx in ("", "_reverse")[:dirs]:
            wi, bi = params[f"weight_ih_l{layer}{sfx}"], params[f"bias_ih_l{layer}{sfx}"]
            wh, bh = params[f"weight_hh_l{layer}{sfx}"], params[f"bias_hh_l{layer}{sfx}"]
            gi = _ref_dynamic_linear(inp, *wi, bi, per_token).float()
            h = torch.zeros(x.shape[1], hidden)
            c = torch.zeros_like(h)
            seq = [None] * x.shape[0]
            for t in (range(x.shape[0] - 1, -1, -1) if sfx else range(x.shape[0])):
                gh = _ref_dynamic_linear(h, *wh, bh, per_token).float()
                if mode == "LSTM":
                    i, f, g, o = (gi[t] + gh).chunk(4, -1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                else:
                    (ir, iz, inn), (hr, hz, hn) = gi[t].chunk(3, -1), gh.chunk(3, -1)
                    r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
                    n = torch.tanh(inn + r * hn)
                    h = (1 - z) * n + z * h
                seq[t] = h
            outs.append(torch.stack(seq))
            hs.append(h)
        inp = torch.cat(outs, -1)
    return inp, torch.stack(hs)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_recurrent_layers_match_reference(mode):
    """int8 LSTM/GRU (2 layers, bidirectional, batch_first): the torch.nn equations with each weight product
    the integer reference; close to the float layer."""
    torch.manual_seed(4)
    rnn = getattr(nn, mode)(6, 10, num_layers=2, batch_first=True, bidirectional=True).eval()
    x = torch.randn(3, 9, 6)
    params = {}
    for name, p in rnn.named_parameters():
        params[name] = _ref_int8_rows(p.detach()) if name.startswith("weight") else p.detach()
    q = DynamicQRNN.from_float(rnn, lambda w: _ref_int8_rows(w))
    out, state = q(x)
    want_out, want_h = _ref_rnn(mode, x.transpose(0, 1), params, 10, 2, True, False)
    torch.testing.assert_close(out, want_out.transpose(0, 1), rtol=1e-4, atol=1e-5)
    h = state[0] if mode == "LSTM" else state
    torch.testing.assert_close(h, want_h, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        ref, _ = rnn(x)
    assert float((out - ref).abs().max()) < 0.02 * float(ref.abs().max())
    # unbatched input and a given initial state are taken as torch takes them
    h0 = torch.randn(4, 10)
    st = (h0, torch.zeros(4, 10)) if mode == "LSTM" else h0
    o1, _ = q(x[0], st)
    o2, _ = q(x[:1], tuple(s.unsqueeze(1) for s in st) if mode == "LSTM" else h0.unsqueeze(1))
    torch.testing.assert_close(o1, o2[0])


def test_multihead_attention_masks_and_weights():
    torch.manual_seed(5)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    q = DynamicQMultiheadAttention.from_float(mha, lambda w: _ref_int8_rows(w))
    x, mem = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1, 3:] = True
    causal = torch.triu(torch.full((7, 7), float("-inf")), 1)
    with torch.no_grad():
        for args, kw in (((x, x, x), {"attn_mask": causal}), ((x, mem, mem), {"key_padding_mask": kpm}),
                         ((x, mem, mem), {"key_padding_mask": kpm, "average_attn_weights": False})):
            want, want_w = mha(*args, **kw)
            got, got_w = q(*args, **kw)
            assert got.shape == want.shape and got_w.shape == want_w.shape
            assert _min_cos(got, want) > 0.999
            torch.testing.assert_close(got_w.sum(-1), torch.ones_like(got_w.sum(-1)))
        assert float(got_w[1, ..., 3:].abs().max()) == 0.0  # padded keys get no weight
        assert q(x, x, x, need_weights=False)[1] is None


def test_dynamic_bert_any_module(bert):
    """dynamic on a Hugging Face BertModel: every Linear and Embedding replaced without tracing, last hidden
    state within cosine 0.99 of float on every token (per tensor and per token)."""
    model, _, (ids, mask) = bert
    with torch.no_grad():
        ref = _hidden(model(ids, mask))
    for per_token in (False, True):
        q = lowbit.quantize(model, "dynamic", example_input=(ids[:1], mask[:1]), per_token=per_token)
        assert not any(type(m) in (nn.Linear, nn.Embedding) for m in q.modules())
        assert sum(isinstance(m, DynamicQLinear) for m in q.modules()) == 13
        assert q.lowbit_meta["float_layers"] == [] and len(q.lowbit_meta["quantized_layers"]) == 16
        with torch.no_grad():
            assert _min_cos(_hidden(q(ids, mask)), ref) > 0.99
    assert type(model.encoder.layer[0].attention.self.query) is nn.Linear  # the user's model is untouched


def _rounded_copy(model, cast):
    """The float model with every weight matrix replaced by ``cast(weight)`` (reference)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.copy_(cast(m.weight))
    return ref


def test_weight_only_and_float16_are_rounded_weights(bert):
    """weight_only is the float model with int8-rounded weights (per row), float16 with float16-rounded
    ones: the same outputs up to float rounding."""
    model, _, (ids, mask) = bert

    def int8(w):
        q, s = _ref_int8_rows(w)
        return q.float() * s[:, None]

    for method, cast in (("weight_only", int8), ("float16", lambda w: w.half().float())):
        q = lowbit.quantize(model, method, example_input=(ids[:1], mask[:1]))
        assert sum(isinstance(m, (WeightOnly, lowbit.nn.F16Layer)) for m in q.modules()) == 16
        with torch.no_grad():
            torch.testing.assert_close(_hidden(q(ids, mask)), _hidden(_rounded_copy(model, cast)(ids, mask)),
                                       rtol=1e-4, atol=1e-4)


class TiedLM(nn.Module):
    """Input embedding tied to the output layer (as language models do), and one layer at two paths."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(200, 64)
        self.mid = nn.Linear(64, 64)
        self.again = self.mid
        self.head = nn.Linear(64, 200, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.again(self.mid(self.emb(ids)))))


def _weight_tensor(m):
    return m.weight_q if hasattr(m, "weight_q") else (m.weight if isinstance(m, lowbit.nn.F16Layer) else m.p0_q
                                                      if hasattr(m, "p0_q") else m.p0)


@pytest.mark.parametrize("method", ["dynamic", "weight_only", "float16"])
def test_tied_weights_quantized_once(method, tmp_path):
    torch.manual_seed(6)
    model = TiedLM().eval()
    ids = torch.randint(0, 200, (2, 5))
    q = lowbit.quantize(model, method, example_input=ids)
    assert q.mid is q.again
    emb, head = _weight_tensor(q.emb), _weight_tensor(q.head)
    assert emb.data_ptr() == head.data_ptr()  # one quantized table, read by both
    path = lowbit.save(q, tmp_path / "t.lowbit")
    header = lowbit.io.read_header(path)
    assert header["tensor_aliases"]  # stored once
    r = lowbit.load(path)
    with torch.no_grad():
        torch.testing.assert_close(r(ids), q(ids))
    untied = TiedLM().eval()
    untied.head.weight = nn.Parameter(model.emb.weight.detach().clone())
    size_untied = lowbit.save(lowbit.quantize(untied, method, example_input=ids), tmp_path / "u.lowbit").stat()
    assert path.stat().st_size < size_untied.st_size - 200 * 64 * (2 if method == "float16" else 1) * 0.9


def test_tie_with_a_float_module_keeps_the_layer_float():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)
            self.norm.weight = self.fc.bias  # one parameter, two modules
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            return self.out(self.norm(self.fc(x)))

    with pytest.warns(UserWarning, match="'fc' stays float.*shared with 'norm'"):
        q = lowbit.quantize(Shared().eval(), "dynamic", example_input=torch.randn(2, 8))
    assert type(q.fc) is nn.Linear and isinstance(q.out, DynamicQLinear)
    assert q.norm.weight is q.fc.bias
    assert "norm" in q.lowbit_meta["float_reasons"]["fc"]


def test_model_without_quantizable_layers():
    model = nn.Sequential(nn.LayerNorm(8), nn.ReLU()).eval()
    x = torch.randn(2, 8)
    for method in ("dynamic", "weight_only", "float16", "static"):
        with pytest.raises(NoQuantizableLayerError, match="allow_float=True"):
            lowbit.quantize(model, method, calib=x, example_input=x)
    q = lowbit.quantize(model, "dynamic", example_input=x, allow_float=True)
    assert q.lowbit_meta["quantized_layers"] == []
    torch.testing.assert_close(q(x), model(x))


class ControlFlow(nn.Module):
    """Python control flow on tensor values: neither torch.fx nor torch.export can capture it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.lstm = nn.Linear(6, 6), nn.Linear(6, 6), nn.LSTM(6, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        if h.mean() > 0:
            h = torch.relu(self.b(h))
        for _ in range(2):
            h = h + self.b(h)
        y, _ = self.lstm(h)
        return self.head(y[:, -1])


def test_control_flow_model_weights_only_file(tmp_path):
    torch.manual_seed(7)
    model = ControlFlow().eval()
    x = torch.randn(3, 5, 6)
    q = lowbit.quantize(model, "dynamic", example_input=x)
    with pytest.raises(ValueError, match="control flow on tensor values"):
        lowbit.quantize(model, "static", calib=x)
    with pytest.warns(UserWarning, match="weights-only file"):
        path = lowbit.save(q, tmp_path / "cf.lowbit")
    with pytest.raises(ModelFileError, match="weights-only file.*model="):
        lowbit.load(path)
    r = lowbit.load(path, model=ControlFlow())
    with torch.no_grad():
        torch.testing.assert_close(r(x), q(x))
        torch.testing.assert_close(r(-x), q(-x))  # the other branch too: it is the user's own forward
    assert isinstance(r.lstm, DynamicQRNN) and r.lowbit_meta["method"] == "dynamic"

    class Wider(ControlFlow):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 4)

    with pytest.raises(ModelFileError, match="'head'.*parameters"):
        lowbit.load(path, model=Wider())
    with pytest.raises(ModelFileError, match="whole model as a graph"):
        lowbit.load(lowbit.save(lowbit.quantize(nn.Sequential(nn.Linear(6, 2)), "dynamic", example_input=x[0]),
                                tmp_path / "g.lowbit"), model=ControlFlow())


def test_captured_bert_file_runs_any_size(bert, tmp_path):
    """A graph-free model saves as a captured graph that runs without the model's code, at other batch sizes
    and lengths, and refuses input of the wrong dtype with the reason."""
    model, _, (ids, mask) = bert
    q = lowbit.quantize(model, "dynamic", example_input=(ids[:1], mask[:1]))
    r = lowbit.load(lowbit.save(q, tmp_path / "b.lowbit"))
    assert r.lowbit_meta["graph"] == "captured"
    with torch.no_grad():
        for b, t in ((4, 16), (3, 9)):
            torch.testing.assert_close(_hidden(r(ids[:b, :t], mask[:b, :t])), _hidden(q(ids[:b, :t], mask[:b, :t])))
        with pytest.raises(TypeError, match="input 0 must be int64"):
            r(ids.float(), mask)


def test_static_transformer_float_islands(bert, tmp_path):
    """static on a transformer through torch.export: linear layers on the int8 kernels, what has no integer
    form (embedding look-ups, layer norm, attention, GELU ...) float islands listed in the meta;
    full_integer refuses, naming them."""
    _, cfg, (ids, mask) = bert
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**{**cfg.to_dict(), "num_hidden_layers": 1})).eval()
    q = lowbit.quantize(model, "static", calib=[(ids, mask)], example_input=(ids[:1], mask[:1]), progress=False)
    assert sum(isinstance(m, QLinear) for m in q.modules()) == 7
    islands = "\n".join(q.lowbit_meta["float_ops"])
    for op in ("embedding", "layer_norm", "scaled_dot_product_attention", "gelu"):
        assert op in islands
    with torch.no_grad():
        ref = _hidden(model(ids, mask))
        assert _min_cos(_hidden(q(ids, mask)), ref) > 0.99
    r = lowbit.load(lowbit.save(q, tmp_path / "s.lowbit"))
    with torch.no_grad():
        torch.testing.assert_close(_hidden(r(ids, mask)), _hidden(q(ids, mask)))
    with pytest.raises(lowbit.methods.integer_graph.UnsupportedForIntegerError, match="'input_ids'.*layer_norm"):
        lowbit.quantize(model, "full_integer", calib=[(ids, mask)], example_input=(ids[:1], mask[:1]),
                        progress=False)


def test_file_sizes_against_float():
    """int8 and float16 storage: weight_only and dynamic files about a quarter, float16 about half of the
    float file (a model whose weights dominate its file)."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Embedding(1000, 128), nn.Linear(128, 512), nn.GELU(), nn.Linear(512, 128)).eval()
    ids = torch.randint(0, 1000, (2, 8))
    with torch.no_grad():
        floats = sum(p.numel() for p in model.parameters()) * 4
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        sizes = {m: lowbit.save(lowbit.quantize(model, m, example_input=ids), Path(d) / f"{m}.lowbit").stat().st_size
                 for m in ("weight_only", "float16", "dynamic")}
    assert sizes["weight_only"] <= 0.27 * floats and sizes["dynamic"] <= 0.27 * floats
    assert sizes["float16"] <= 0.52 * floats
    assert math.isclose(sizes["float16"] / floats, 0.5, abs_tol=0.02)


def test_gpt2_decoder_and_transformer_encoder():
    """A decoder with Hugging Face's Conv1D layers (GPT-2) and torch's own TransformerEncoder (fast path off
    once its layers are replaced) quantize without tracing."""
    torch.manual_seed(9)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=32)
    gpt = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 10))
    q = lowbit.quantize(gpt, "dynamic", example_input=ids)
    assert not any(type(m).__name__ == "Conv1D" for m in q.modules())
    with torch.no_grad():
        assert _min_cos(q(ids).logits, gpt(ids).logits) > 0.99
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2).eval()
    x = torch.randn(2, 6, 32)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[0, 4:] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qe = lowbit.quantize(enc, "dynamic", example_input=x)
        with torch.no_grad():
            got, want = qe(x, src_key_padding_mask=kpm), enc(x, src_key_padding_mask=kpm)
    assert isinstance(qe.layers[0].self_attn, DynamicQMultiheadAttention)
    assert _min_cos(got[~kpm], want[~kpm]) > 0.99


METRIC_MODULE = '''
import torch
import torch.nn.functional as F
import transformers


def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=100, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def batch():
    ids = torch.randint(0, 100, (6, 12), generator=torch.Generator().manual_seed(1))
    return ids, torch.ones_like(ids)


def cosine(model):
    ids, mask = batch()
    with torch.no_grad():
        ref = bert()(ids, mask)["last_hidden_state"]
        out = model(ids, mask)["last_hidden_state"]
    return {"cosine": float(F.cosine_similarity(out, ref, dim=-1).mean())}
'''


def test_compare_and_eval_with_your_metric(tmp_path, monkeypatch, capsys):
    """compare and eval on a transformer scored by the user's function (cosine similarity to float)."""
    from lowbit.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "mymetric.py").write_text(METRIC_MODULE)
    import mymetric

    model = mymetric.bert()
    ids, mask = mymetric.batch()
    res = lowbit.compare(model, [(ids, mask)], lambda m: 100 * mymetric.cosine(m)["cosine"],
                         methods=["dynamic", "float16"], example_input=(ids[:1], mask[:1]), repeats=2,
                         report_dir=tmp_path / "report", save_chosen=tmp_path / "chosen.lowbit", progress=False)
    rows = {r["method"]: r for r in res.rows}
    assert set(rows) == {"float", "dynamic", "float16"} and rows["float"]["accuracy"] == pytest.approx(100)
    assert rows["dynamic"]["accuracy"] > 99 and rows["float16"]["size_bytes"] < rows["float"]["size_bytes"]
    assert (tmp_path / "report" / "index.html").exists()
    capsys.readouterr()
    assert main(["eval", "chosen.lowbit", "--metric", "mymetric:cosine", "--batch-size", "2", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "latency" in out and "batch 2" in out
    assert float(out.split("cosine ")[1].split(",")[0]) > 0.99


class _Flat(nn.Module):
    """Flattens [B, 2, 4] to [B, 8]: a [B, 4, 2] input would flatten just as well, to the wrong features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.reshape(x.shape[0], -1))))


@pytest.mark.parametrize("method", ["dynamic", "static", "full_integer"])
def test_pt2_with_dynamic_shapes(method, tmp_path):
    """A .pt2 exported with a dynamic batch: any batch runs; the sizes the archive fixed are checked on
    entry in the float graph, the quantized one and the file (the codes' dtype for full integer)."""
    from lowbit.graph import load_model

    torch.manual_seed(0)
    model = _Flat().eval()
    ep = torch.export.export(model, (torch.randn(4, 2, 4),), dynamic_shapes=({0: torch.export.Dim("b", max=64)},))
    torch.export.save(ep, tmp_path / "m.pt2")
    g = load_model(str(tmp_path / "m.pt2"))
    calib = torch.randn(32, 2, 4)
    q = lowbit.quantize(g, method, calib=calib, io_dtype="int8") if method == "full_integer" else \
        lowbit.quantize(g, method, calib=calib)
    lowbit.save(q, tmp_path / "m.lowbit")
    x = torch.randn(5, 2, 4)
    if method == "full_integer":
        s, z = q.lowbit_meta["input"]["scale"], q.lowbit_meta["input"]["zero_point"]
        x = torch.clamp(torch.round(x / s) + z, -128, 127).to(torch.int8)
    for m in (g, q, lowbit.load(tmp_path / "m.lowbit")):
        if m is g and method == "full_integer":
            continue
        assert m(x).shape == (5, 3)
        with pytest.raises(ValueError, match=r"captured for \[\*, 2, 4\]"):
            m(x.reshape(5, 4, 2))
    torch.testing.assert_close(q(x), lowbit.load(tmp_path / "m.lowbit")(x), rtol=0, atol=0)
    if method != "full_integer":
        torch.testing.assert_close(g(x), model(x))
