"""Issue 13: files of captured graphs (allow-listed ATen ops, lowbit leaves) and weights-only files hold to
the model-file standard: every corruption or hostile field is a ModelFileError, nothing runs from the file."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.io import ModelFileError
from lowbit.modelfile.container import read, to_bytes


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.rnn = nn.GRU(8, 8, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, ids):
        y, _ = self.rnn(self.emb(ids))
        return torch.softmax(self.out(y), -1)


def _read(path):
    return read(path)


def _write(path, header, tensors):
    path.write_bytes(to_bytes(header, tensors))
    return path


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    torch.manual_seed(0)
    ids = torch.randint(0, 30, (2, 6))
    q = lowbit.quantize(Tagger().eval(), "dynamic", example_input=ids)
    path = lowbit.save(q, tmp_path_factory.mktemp("cap") / "t.lowbit")
    return q, ids, *_read(path)


def _aten_node(h):
    return next(n for n in h["nodes"] if n["op"] == "call_function" and n["target"].startswith("aten:"))


def _not_allowed_op(h, t):
    _aten_node(h)["target"] = "aten:empty.memory_format"  # uninitialized memory: not in the allow-list


def _mutating_op(h, t):
    _aten_node(h)["target"] = "aten:add_.Tensor"


def _foreign_namespace(h, t):
    _aten_node(h)["target"] = "torch.ops.aten:softmax.int"


def _cuda_device(h, t):
    n = _aten_node(h)
    n["kwargs"] = {"device": {"__device__": "cuda"}}


def _sparse_layout(h, t):
    _aten_node(h)["kwargs"] = {"layout": {"__layout__": "sparse_coo"}}


def _alias_to_nothing(h, t):
    h["tensor_aliases"] = {"::ghost": "out::missing"}


def _alias_over_tensor(h, t):
    name = next(iter(t))
    h["tensor_aliases"] = {name: next(k for k in t if k != name)}


def _aliases_not_object(h, t):
    h["tensor_aliases"] = ["a", "b"]


def _unknown_kind(h, t):
    h["kind"] = "pickle"


def _shape_check_dtype(h, t):
    h["modules"]["input_check_0"]["attrs"]["dtype"] = "object"


def _weight_only_foreign_class(h, t):
    h["modules"]["emb"]["attrs"]["module"] = "Bilinear"


def _weight_only_wrong_shape(h, t):
    h["modules"]["emb"]["attrs"]["args"]["num_embeddings"] = 31


def _rnn_huge_layers(h, t):
    h["modules"]["rnn"]["attrs"]["num_layers"] = 10**7


def _rnn_mode(h, t):
    h["modules"]["rnn"]["attrs"]["mode"] = "__import__"


HOSTILE = [_not_allowed_op, _mutating_op, _foreign_namespace, _cuda_device, _sparse_layout, _alias_to_nothing,
           _alias_over_tensor, _aliases_not_object, _unknown_kind, _shape_check_dtype, _weight_only_foreign_class,
           _weight_only_wrong_shape, _rnn_huge_layers, _rnn_mode]


@pytest.mark.parametrize("damage", HOSTILE, ids=[f.__name__.lstrip("_") for f in HOSTILE])
def test_hostile_captured_file(damage, captured, tmp_path):
    _, _, header, tensors = captured
    h, t = copy.deepcopy(header), dict(tensors)
    damage(h, t)
    with pytest.raises(ModelFileError):
        lowbit.load(_write(tmp_path / "h.lowbit", h, t))


def test_captured_file_round_trip_and_bounded_creation(captured, tmp_path):
    q, ids, header, tensors = captured
    r = lowbit.load(_write(tmp_path / "ok.lowbit", header, tensors))
    with torch.no_grad():
        torch.testing.assert_close(r(ids), q(ids))
    assert any(n["target"] == "aten:softmax.int" for n in header["nodes"])
    h = copy.deepcopy(header)  # a graph asking for a huge tensor from sizes alone: refused when it runs
    out = h["nodes"][-1]
    h["nodes"][-1:] = [{"name": "big", "op": "call_function", "target": "aten:zeros.default",
                        "args": [[1 << 20, 1 << 20]], "kwargs": {}}, out]
    out["args"] = [{"__node__": "big"}]
    r = lowbit.load(_write(tmp_path / "big.lowbit", h, tensors))
    with pytest.raises(ValueError, match="would create"):
        r(ids)


def test_hostile_weights_only_file(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    q = lowbit.quantize(model, "weight_only", example_input=torch.randn(2, 4))
    path = lowbit.save(q, tmp_path / "w.lowbit", weights_only=True)
    header, tensors = _read(path)
    assert header["kind"] == "weights" and header["nodes"] == []
    r = lowbit.load(path, model=copy.deepcopy(model))
    torch.testing.assert_close(r(torch.ones(1, 4)), q(torch.ones(1, 4)))
    cases = {
        "nodes": lambda h: h.update(nodes=[{"name": "x", "op": "placeholder", "target": None, "args": [],
                                            "kwargs": {}}]),
        "module alias": lambda h: h["meta"].update(module_aliases={"1": "nowhere"}),
        "swapped": lambda h: h["meta"].pop("swapped"),
        "class": lambda h: h["meta"]["swapped"]["0"].update({"class": "torch.nn.modules.conv.Conv2d"}),
        "path": lambda h: h["modules"].update({"9": h["modules"].pop("0")}),
    }
    for what, damage in cases.items():
        h = copy.deepcopy(header)
        damage(h)
        with pytest.raises(ModelFileError):
            lowbit.load(_write(tmp_path / f"{what}.lowbit", h, tensors), model=copy.deepcopy(model))
    with pytest.raises(ModelFileError, match="float tensors do not match"):
        lowbit.load(path, model=nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)))
