"""Binary networks (lowbit.binary, lowbit.nn.binary): thresholds against brute force, the packed layers
against the plain-PyTorch reference, the fake-binary model against its execution form (same predictions,
same signs), 1-bit storage, fall-backs, gradual-freezing stages and the errors a user can run into."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import lowbit
import lowbit.binary as lb
from lowbit.binary.convert import float_threshold, int_threshold
from lowbit.binary.modules import SignBatchNorm
from lowbit.kernels import PoolGeometry
from lowbit.kernels.binary import Threshold, binary_conv2d_ref, binary_linear_ref, pack_bits, unpack_bits
from lowbit.nn import QBinaryConv, QBinaryLinear, QBitMaxPool2d, QConv, QSignBits, QUnpackBits
from lowbit.quantizers import Binarizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _signs(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(shape, generator=g) > 0.5, 1.0, -1.0)


def _bn(n: int, seed: int) -> SignBatchNorm:
    g = torch.Generator().manual_seed(seed)
    bn = SignBatchNorm(n)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(n, generator=g))
        bn.weight[0] = 0.0  # γ = 0: a constant sign
        bn.bias.copy_(torch.randn(n, generator=g) * 3)
        bn.running_mean.copy_(torch.randn(n, generator=g) * 5)
        bn.running_var.copy_(torch.rand(n, generator=g) * 4 + 0.1)
    return bn.eval()


# ---------------------------------------------------------------------------------------- thresholds

def test_integer_threshold_equals_the_sign_of_the_batchnorm_for_every_dot():
    k, n = 40, 64
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(n, generator=g) + 0.05
    scale[1] = 0.0  # no scale: a constant
    bias = torch.randn(n, generator=g) * 3
    bn = _bn(n, 1)
    thr, flip = int_threshold(scale, bias, bn, k)
    dots = torch.arange(-k, k + 1, dtype=torch.float64)[:, None]
    a, c = bn.scale_shift()
    want = a * (scale.double() * dots + bias.double()) + c > 0
    got = (dots >= thr.double()) ^ flip
    assert torch.equal(got, want)
    assert flip.any() and (~flip).any()  # negative γ flips


def test_float_threshold_equals_the_sign_of_the_batchnorm():
    n = 32
    bn = _bn(n, 2)
    thr, flip = float_threshold(bn, n)
    a, c = bn.scale_shift()
    t = (-c / a).float()
    # values around each channel's boundary, the boundary itself included
    y = torch.stack([t, torch.nextafter(t, t + 1), torch.nextafter(t, t - 1), t + 1, t - 1]).nan_to_num(0.0)
    y = torch.cat([y, torch.randn(200, n)])
    want = (a * y.double() + c) > 0
    assert torch.equal((y >= thr) ^ flip, want)


# ------------------------------------------------------------------------------------- packed layers

@pytest.mark.parametrize("stride,padding,groups,pad_value", [(1, 1, 1, -1), (2, 1, 1, 1), (1, 0, 2, -1)])
def test_binary_conv_module_matches_reference(stride, padding, groups, pad_value):
    c, n, h = 70, 66, 7
    x = _signs((2, c, h, h), 1)
    w = _signs((n, c // groups, 3, 3), 2)
    k = (c // groups) * 9
    g = torch.Generator().manual_seed(3)
    thr = torch.randint(-k, k + 1, (n,), generator=g, dtype=torch.int32)
    flip = torch.rand(n, generator=g) > 0.5
    geo = {"stride": stride, "padding": padding, "groups": groups}
    bits = QBinaryConv(w, out="bits", thr=thr, flip=flip, pad_value=pad_value, **geo)
    ref = binary_conv2d_ref(x, w, Threshold(thr, flip), stride, padding, 1, groups, pad_value)
    xw = pack_bits(x.permute(0, 2, 3, 1))
    assert torch.equal(bits(xw), ref) and torch.equal(bits(x), ref)  # packed or ±1 input
    scale, bias = torch.rand(n, generator=g), torch.randn(n, generator=g)
    flt = QBinaryConv(w, scale, out="float", bias=bias, act="relu", pad_value=pad_value, **geo)
    dot = binary_conv2d_ref(x, w, None, stride, padding, 1, groups, pad_value).float()
    assert torch.equal(flt(xw), torch.relu(dot * scale[:, None, None] + bias[:, None, None]))


def test_binary_linear_module_and_unpack_sign_modules():
    x, w = _signs((5, 130), 4), _signs((70, 130), 5)
    thr = torch.arange(-35, 35, dtype=torch.int32)
    lin = QBinaryLinear(w, out="bits", thr=thr)
    ref = binary_linear_ref(x, w, Threshold(thr))
    assert torch.equal(lin(pack_bits(x)), ref)
    codes = QUnpackBits(70)(ref)
    assert codes.dtype == torch.uint8 and torch.equal(codes.to(torch.int8) - 1, unpack_bits(ref, 70))
    # QSignBits: (y >= thr) XOR flip per channel, on maps and vectors
    y = torch.randn(2, 70, 3, 3)
    t, f = torch.randn(70), torch.rand(70) > 0.5
    mod = QSignBits(t, f)
    want = ((y >= t[:, None, None]) ^ f[:, None, None]).permute(0, 2, 3, 1)
    assert torch.equal(unpack_bits(mod(y), 70), (want.to(torch.int8) * 2 - 1))
    assert torch.equal(QUnpackBits(70)(mod(y)).to(torch.int8) - 1, want.permute(0, 3, 1, 2).to(torch.int8) * 2 - 1)
    with pytest.raises(ValueError, match="thresholds"):
        QBinaryLinear(w, out="bits", thr=thr[:3])
    with pytest.raises(ValueError, match="bits"):
        QBinaryLinear(w, out="bits")
    with pytest.raises(ValueError, match="pad"):
        QBinaryConv(_signs((4, 4, 3, 3)), pad_value=0)


@pytest.mark.parametrize("k,s,p,ceil", [(2, 2, 0, True), (3, 2, 1, False), (3, 1, 1, True), (2, 1, 0, False)])
def test_bit_max_pool_is_max_pool_of_signs(k, s, p, ceil):
    x = _signs((2, 70, 7, 7), 6)
    want = F.max_pool2d(x, k, s, p, ceil_mode=ceil)
    got = QBitMaxPool2d(k, s, p, 1, ceil)(pack_bits(x.permute(0, 2, 3, 1)))
    assert torch.equal(unpack_bits(got, 70).permute(0, 3, 1, 2).float(), want)
    assert PoolGeometry.make(k, s, p, 1, ceil).output_size(7, 7) == tuple(want.shape[2:])


# -------------------------------------------------------------------- the fake-binary model and its form

def _trained(model, splits, method="binary_ste", steps=40, **options):
    """Prepare, then train a few steps with a plain loop (any loop drives the binarizers)."""
    torch.manual_seed(0)
    qm = lb.prepare(model, method, calib=splits.calib, **options)
    if lb.binary_info(qm)["config"]["freeze"] == "gradual":
        for k in range(lb.stage_count(qm)):
            lb.begin_stage(qm, k, steps // 2)
            _steps(qm, splits, steps // 2)
            lb.end_stage(qm, k)
    else:
        lb.begin_all(qm, steps)
        _steps(qm, splits, steps)
    return qm.eval()


def _steps(qm, splits, n):
    x, y = splits.train.tensors
    params = [p for p in qm.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3) if params else None
    g = torch.Generator().manual_seed(n)
    qm.train()
    for _ in range(n):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = F.cross_entropy(qm(x[idx]), y[idx])
        if opt is not None:
            opt.zero_grad()
            loss.backward()
            opt.step()


class _Record(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.out = {}

    def run_node(self, n):
        v = super().run_node(n)
        self.out[n.name] = v
        return v


def _as_signs(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Packed bits (a map [B, H, W, words] or a vector [B, words]) or codes {0, 2} as ±1 shaped like ``like``."""
    if v.dtype != torch.int64:
        return (v.to(torch.float32) - 1).reshape(like.shape)
    if v.dim() == 4:
        c = like.shape[1] if like.dim() == 4 else like[0].numel() // (v.shape[1] * v.shape[2])
        return unpack_bits(v, c).permute(0, 3, 1, 2).float().reshape(like.shape)
    return unpack_bits(v, like.shape[1]).float()


def _agreement(qm, bm, x):
    with torch.no_grad():
        return float((qm(x).argmax(1) == bm(x).argmax(1)).float().mean())


@pytest.fixture(scope="module")
def ste_model(digits_cnn):
    model, splits, _ = digits_cnn
    qm = _trained(model, splits, "binary_ste")
    return qm, lb.convert(qm), splits


def test_converted_model_is_packed_and_agrees_with_the_trained_one(ste_model, monkeypatch):
    qm, bm, splits = ste_model
    kinds = [type(m).__name__ for m in bm.children()]
    assert kinds.count("QBinaryConv") == 4 and "QBitMaxPool2d" in kinds  # fc1 runs as a 4x4 binary conv
    assert not [k for k in kinds if k in ("Dequantize", "QUnpackBits")][1:]  # signs stay packed until fc2
    meta = bm.lowbit_meta
    assert meta["binary_layers"] == ["features.3", "features.7", "features.10", "fc1"]
    assert meta["int8_layers"] == ["features.0", "fc2"] and meta["binary_fallback"] == []
    x = splits.test.tensors[0]
    assert _agreement(qm, bm, x) >= 0.995
    # every sign the fake model computes equals the packed bits of the integer model
    fake, real = _Record(qm), _Record(bm)
    with torch.no_grad():
        fake.run(x)
        real.run(x)
    checked = 0
    real_nodes = {n.name: n for n in bm.graph.nodes}
    for n in qm.graph.nodes:  # the input of every layer: fake ±1 values vs the integer model's packed bits / codes
        b = n.args[0] if n.op == "call_module" and isinstance(qm.get_submodule(str(n.target)), lb.BinaryLayer) else None
        if b is None or not isinstance(qm.get_submodule(str(b.target)), Binarizer):
            continue
        s = fake.out[b.name]
        v = _as_signs(real.out[real_nodes[n.name].args[0].name], s)
        assert float((v == s).float().mean()) >= 0.999, n.name
        checked += 1
    assert checked >= 3
    # the packed execution is bit-exact against the plain-PyTorch reference kernels
    with torch.no_grad():
        native = bm(x[:64])
        monkeypatch.setenv("LOWBIT_KERNELS", "torch")
        assert torch.equal(bm(x[:64]), native)


def test_binary_model_file_roundtrip_and_one_bit_weights(ste_model, digits_cnn, tmp_path):
    qm, bm, splits = ste_model
    path = lowbit.save(bm, tmp_path / "b.lowbit")
    lm = lowbit.load(path)
    x = splits.test.tensors[0][:100]
    with torch.no_grad():
        assert torch.equal(lm(x), bm(x))
    model = digits_cnn[0]
    float_bytes = sum(m.weight.numel() * 4 for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                      and n in bm.lowbit_meta["binary_layers"])
    packed = sum(b.numel() for n, b in bm.named_buffers() if n.endswith("weight_q")
                 and n.split(".")[0] in {t.replace(".", "_") for t in bm.lowbit_meta["binary_layers"]})
    stored = sum(len(t.packed.storage()[1]["packed"]) for t in bm.children() if isinstance(t, (QBinaryConv,)))
    assert stored * 8 == packed and stored <= float_bytes / 20
    assert copy.deepcopy(bm)(x).equal(bm(x))


@pytest.mark.parametrize("options", [{"bits": (1, 4)}, {"first_last_bits": None},
                                     {"pad_value": 1, "xnor_scale": False}])
def test_variants_convert_exactly(digits_cnn, options):
    model, splits, _ = digits_cnn
    qm = _trained(model, splits, "ubq", steps=20, freeze="none", **options)
    bm = lb.convert(qm)
    assert _agreement(qm, bm, splits.test.tensors[0]) >= 0.995
    kinds = {type(m).__name__ for m in bm.modules()}
    if options.get("bits") == (1, 4):  # binary weights only: the int8 kernels, ±1 codes stored 1 bit each
        assert "QBinaryConv" not in kinds
        convs = [m for m in bm.modules() if isinstance(m, QConv) and m.packed.format.bits == 1]
        assert len(convs) == 3
    else:
        assert "QBinaryConv" in kinds


def test_zero_padding_and_conv1d_fall_back_to_int8_and_are_listed(digits_cnn):
    model, splits, _ = digits_cnn
    qm = _trained(model, splits, "binary_ste", steps=10, pad_value=0)
    bm = lb.convert(qm)
    fb = bm.lowbit_meta["binary_fallback"]
    assert [f["layer"] for f in fb] == ["features.3", "features.7", "features.10"]
    assert all("zero padding" in f["reason"] for f in fb)
    assert bm.lowbit_meta["binary_layers"] == ["fc1"]
    assert _agreement(qm, bm, splits.test.tensors[0]) >= 0.995

    net = nn.Sequential(nn.Conv1d(2, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.Conv1d(8, 8, 3),
                        nn.BatchNorm1d(8), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3)).eval()
    x = torch.randn(64, 2, 8)
    qm = lb.prepare(net, "binary_ste", calib=x)
    lb.begin_all(qm, 1)
    qm.train()(x)
    bm = lb.convert(qm.eval())
    assert [f["layer"] for f in bm.lowbit_meta["binary_fallback"]] == ["3"]
    assert "1-D" in bm.lowbit_meta["binary_fallback"][0]["reason"]
    with torch.no_grad():
        assert float((qm(x).argmax(1) == bm(x).argmax(1)).float().mean()) >= 0.95


def test_stages_of_gradual_freezing(digits_cnn):
    model, splits, _ = digits_cnn
    qm = lb.prepare(model, "ubq", calib=splits.calib, stage_epochs=(1, 1, 1, 1, 0.5))
    stages = lb.binary_info(qm)["stages"]
    # a sign belongs to the layer whose output it takes: the 8-bit first layer's stage switches on the sign of
    # its output, the 8-bit last layer (no binarizer) freezes with the stage before it
    assert [s["layer"] for s in stages] == ["features.0", "features.3", "features.7", "features.10", "fc1"]
    assert stages[0]["binarizers"] == ["ab_features_0_bn"] and "features_0_bn" in stages[0]["freeze"]
    assert stages[1]["binarizers"] == ["features.3.weight_quantizer", "ab_features_6"]
    assert "fc2" in stages[4]["freeze"] and [s["epochs"] for s in stages] == [1, 1, 1, 1, 0.5]
    bins = {n: m for n, m in qm.named_modules() if isinstance(m, Binarizer)}
    assert not any(bool(b.enabled) for b in bins.values())  # gradual: nothing binary before its stage
    bn = qm.get_submodule("features_3_bn")
    lb.begin_stage(qm, 0, 10)
    lb.end_stage(qm, 0)
    lb.begin_stage(qm, 1, 10)
    on = stages[0]["binarizers"] + stages[1]["binarizers"]
    assert [n for n, b in bins.items() if b.enabled] == sorted(on, key=list(bins).index)
    lb.end_stage(qm, 1)
    assert not any(p.requires_grad for p in qm.get_submodule("features.3").parameters())
    assert not any(p.requires_grad for p in qm.get_submodule("features.0").parameters())
    assert any(p.requires_grad for p in qm.get_submodule("fc1").parameters())
    stats = bn.running_mean.clone()
    qm.train()(splits.train.tensors[0][:32])
    assert torch.equal(bn.running_mean, stats) and bool(bn.frozen)  # a frozen BatchNorm is a fixed threshold
    rev = lb.prepare(model, "ubq", calib=splits.calib, order=("reverse",))
    assert [s["layer"] for s in lb.binary_info(rev)["stages"]] == ["fc1", "features.10", "features.7",
                                                                     "features.3", "features.0"]
    named = lb.prepare(model, "ubq", calib=splits.calib, order=("fc1", "features.3", "features.7", "features.10",
                                                                "features.0"))
    assert lb.binary_info(named)["stages"][0]["layer"] == "fc1"
    with pytest.raises(ValueError, match="every binarized layer"):
        lb.prepare(model, "ubq", calib=splits.calib, order=("fc1",))
    with pytest.raises(ValueError, match="one per stage"):
        lb.prepare(model, "ubq", calib=splits.calib, stage_epochs=(1, 2))


def test_gradual_model_converts_exactly(digits_cnn):
    model, splits, _ = digits_cnn
    qm = _trained(model, splits, "ubq", steps=8)
    assert all(b.exact for b in qm.modules() if isinstance(b, Binarizer))
    assert _agreement(qm, lb.convert(qm), splits.test.tensors[0]) >= 0.995


def test_clear_errors_and_warnings(digits_cnn):
    model, splits, _ = digits_cnn
    with pytest.raises(ValueError, match="not prepared as a binary network"):
        lb.convert(lowbit.graph.prepare(model, splits.test.tensors[0][:1]).gm)
    qm = lb.prepare(model, "binary_ste", calib=splits.calib)
    with pytest.raises(ValueError, match="never trained"):
        lb.convert(qm)
    qm = lb.prepare(model, "ubq", calib=splits.calib)
    lb.begin_stage(qm, 0, 2)
    _steps(qm, splits, 2)
    with pytest.raises(ValueError, match="never ran"):
        lb.convert(qm)
    with pytest.warns(UserWarning, match="not yet exactly binary"):
        qm = lb.prepare(model, "ubq", calib=splits.calib, freeze="none", delta_end=0.2)
    lb.begin_all(qm, 2)
    _steps(qm, splits, 2)
    with pytest.warns(UserWarning, match="not yet exactly binary"):
        lb.convert(qm.eval())
    with pytest.raises(ValueError, match="binary-network method"):
        lb.prepare(model, "lsq", calib=splits.calib)
    with pytest.raises(ValueError, match="1..1 bits"):
        lb.prepare(model, "binary_ste", calib=splits.calib, bits=(2, 1))
    with pytest.raises(ValueError, match="pad_value"):
        lb.prepare(model, "binary_ste", calib=splits.calib, pad_value=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lb.prepare(model, "ubq", calib=splits.calib, delta_schedule="exponential", noise="gauss")


def test_math_of_the_docstring_example():
    # y = α dot + b, z = a y + c with a < 0: z > 0 <=> dot < -(a b + c)/(a α)
    bn = SignBatchNorm(1).eval()
    with torch.no_grad():
        bn.weight.fill_(-2.0)
        bn.bias.fill_(1.0)
    thr, flip = int_threshold(torch.tensor([0.5]), torch.tensor([0.25]), bn, 10)
    t = -(bn.scale_shift()[0] * 0.25 + bn.scale_shift()[1]) / (bn.scale_shift()[0] * 0.5)
    assert bool(flip[0]) and int(thr[0]) == math.ceil(float(t))
