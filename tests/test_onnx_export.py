"""Issue 13: ONNX QDQ export with lowbit's own scales and zero points, checked in ONNX Runtime."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

import lowbit
from lowbit.evaluate import model_input
from lowbit.export import OnnxExportError, compare_onnx, export_onnx
from lowbit.nn import LowbitModule

pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("method", ["static", "full_integer"])
def test_classifier_agrees_with_lowbit(method, digits_cnn, tmp_path, one_thread):
    """The digits CNN quantized by lowbit, saved, exported: ONNX Runtime predicts the same class as lowbit's
    integer execution on >= 99% of the test set; the graph is QDQ with int8 weights (not folded to float)."""
    model, splits, _ = digits_cnn
    q = lowbit.quantize(model, method, calib=splits.calib, progress=False)
    path = lowbit.save(q, tmp_path / "m.lowbit")
    out = export_onnx(path, tmp_path / "m.onnx", optimize=False)
    g = onnx.load(str(out)).graph
    ops = {n.op_type for n in g.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [i for i in g.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]
    assert len(int8_weights) == sum(isinstance(m, (lowbit.nn.QConv, lowbit.nn.QLinear)) for m in q.modules())
    x = splits.test.tensors[0]
    loaded = lowbit.load(path)
    res = compare_onnx(loaded, out, model_input(loaded, x))
    assert res["argmax_agree"] >= 0.99
    if method == "full_integer":  # uint8 input and output codes, as the model takes and returns them
        assert {i.type.tensor_type.elem_type for i in [*g.input, *g.output]} == {onnx.TensorProto.UINT8}
        assert res["max_abs"] <= 4  # a few output codes (requantized in float by ORT, in Q31 by lowbit)


def test_dynamic_transformer_agrees(tmp_path, one_thread):
    """dynamic (DynamicQuantizeLinear per tensor) on a tiny BERT: the ONNX graph reproduces lowbit's output
    to 1e-4 of its range; the CLI writes the same and checks it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=100, max_position_embeddings=32)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 100, (3, 12))
    mask = torch.ones_like(ids)
    q = lowbit.quantize(model, "dynamic", example_input=(ids[:1], mask[:1]))
    path = lowbit.save(q, tmp_path / "b.lowbit")
    from lowbit.cli import main

    assert main(["export", str(path), "--onnx", str(tmp_path / "b.onnx")]) == 0
    ops = {n.op_type for n in onnx.load(str(tmp_path / "b.onnx")).graph.node}
    assert "DynamicQuantizeLinear" in ops
    res = compare_onnx(lowbit.load(path), tmp_path / "b.onnx", (ids, mask))
    assert res["max_abs"] <= 1e-4 * res["scale"]
    assert main(["export", str(path), "--onnx", str(path)]) == 2  # the input file is never overwritten


def test_layer_without_onnx_form_is_named(tmp_path):
    """A layer on lowbit's 4.6-bit (or binary, BM) kernels, or any lowbit module without a QDQ form, is an
    error naming it; nothing is written and the model is left as it was."""
    from lowbit.formats import BinaryFormat, odd_levels
    from lowbit.kernels import pack_weights

    class Sign(LowbitModule):  # stands for BM arithmetic: no ONNX operator computes it
        def forward(self, x):
            return torch.sign(x)

    x = torch.randn(2, 4)
    q = lowbit.quantize(nn.Sequential(nn.Linear(4, 4), nn.Identity()), "dynamic", example_input=x)
    q[1] = Sign()
    with pytest.raises(OnnxExportError, match=r"layer '1' \(Sign\) has no ONNX QDQ equivalent"):
        export_onnx(q, tmp_path / "x.onnx", example_input=x, optimize=False)
    assert not (tmp_path / "x.onnx").exists()
    assert isinstance(q[1], Sign)
    fmt = odd_levels(21)
    codes = torch.tensor(fmt.levels)[torch.randint(0, len(fmt.levels), (4, 4))].to(torch.int8)
    q[1] = lowbit.nn.QLinear(pack_weights(codes, fmt, "w46", K_x=12), torch.ones(4), None, (0.1, 12), (0.1, 12))
    with pytest.raises(OnnxExportError, match=r"layer '1' \(QLinear\).*w46 kernels"):
        export_onnx(q, tmp_path / "x.onnx", example_input=x, optimize=False)
    signs = torch.where(torch.rand(4, 64) > 0.5, 1, -1).to(torch.int8)  # a binary layer (±1 weights, packed bits)
    q[1] = lowbit.nn.DynamicQLinear(pack_weights(signs, BinaryFormat()), torch.ones(4), None)
    with pytest.raises(OnnxExportError, match=r"layer '1' \(DynamicQLinear\).*binary kernels"):
        export_onnx(q, tmp_path / "x.onnx", example_input=x, optimize=False)
    assert not (tmp_path / "x.onnx").exists()


def test_qat_model_deploys_on_onnx_runtime(digits_cnn, tmp_path, one_thread):
    """A model trained by lowbit's QAT (LSQ, 4-bit weights and activations) exports with its learned steps
    as the QDQ scales (4-bit codes kept in range) and runs the same in ONNX Runtime."""
    import torch.nn.functional as F

    model, splits, _ = digits_cnn
    xs, ys = splits.train.tensors
    qm = lowbit.qat.prepare(model, "lsq", calib=splits.calib.tensors[0][:128], bits="4,4")
    opt = torch.optim.Adam(qm.parameters(), 1e-4)
    for i in (0, 64):
        loss = F.cross_entropy(qm(xs[i:i + 64]), ys[i:i + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    q = lowbit.load(lowbit.save(lowbit.qat.convert(qm), tmp_path / "lsq.lowbit"))
    x = model_input(q, splits.test.tensors[0])
    out = export_onnx(q, tmp_path / "lsq.onnx", example_input=x[:2], optimize=False)
    res = compare_onnx(q, out, x)
    assert res["argmax_agree"] >= 0.99 and res["max_abs"] <= 1e-3 * res["scale"]
