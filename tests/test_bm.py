"""BM networks (lowbit.bm): float layers against the direct formula, gradients, conversion, BatchNorm
folding, the integer layers against the float ones (tolerance derived from the log step), the integer
model end to end, files, operation counts, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
import lowbit.bm as bm
from lowbit.bm.functional import maxplus, safe_log
from lowbit.graph import prepare
from lowbit.kernels.bm import bm_conv2d_ref, bm_linear_ref
from lowbit.nn import QBMConv2d, QBMLinear


@pytest.fixture(autouse=True, scope="module")
def _torch_single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _neuron(x: torch.Tensor, vp: torch.Tensor, vn: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The four-branch formula of methods.md §4 for one input vector x [K] and log weights [N, K]."""
    lp, ln = safe_log(x), safe_log(-x)
    y = (torch.exp((lp + vp).max(-1).values) - torch.exp((lp + vn).max(-1).values)
         - torch.exp((ln + vp).max(-1).values) + torch.exp((ln + vn).max(-1).values))
    return y if b is None else y + b


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # float32: exp/log of the same values in differently vectorized loops may differ by an ulp or two
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bm_linear_direct_formula():
    g = torch.Generator().manual_seed(0)
    m = bm.BMLinear(7, 5)
    for x in (torch.randn(4, 7, generator=g), torch.rand(3, 7, generator=g), -torch.rand(2, 7, generator=g),
              torch.zeros(1, 7)):
        x[0, 0] = 0.0
        want = torch.stack([_neuron(r, m.v_pos, m.v_neg, m.bias) for r in x])
        assert _close(m(x), want)
    assert torch.equal(m(torch.zeros(2, 7)), m.bias.detach().expand(2, 5))  # zero input: only the bias


@pytest.mark.parametrize("geo", [dict(stride=1, padding=1), dict(stride=2, padding=0),
                                 dict(stride=(1, 2), padding=(2, 1), dilation=2), dict(padding=1, groups=2)])
def test_bm_conv2d_direct_formula(geo):
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    m = bm.BMConv2d(4, 6, 3, **geo)
    x = torch.randn(2, 4, 7, 6, generator=g)
    y = m(x)
    s, p, d, G = m.stride, m.padding, m.dilation, m.groups
    xp = F.pad(x, (p[1], p[1], p[0], p[0]))
    Cg, Ng = 4 // G, 6 // G
    for b in range(2):
        for n in range(6):
            gi = n // Ng
            for i in range(y.shape[2]):
                for j in range(y.shape[3]):
                    patch = xp[b, gi * Cg:(gi + 1) * Cg, i * s[0]: i * s[0] + 2 * d[0] + 1: d[0],
                               j * s[1]: j * s[1] + 2 * d[1] + 1: d[1]]
                    want = _neuron(patch.reshape(-1), m.v_pos[n].reshape(1, -1), m.v_neg[n].reshape(1, -1),
                                   m.bias[n])
                    assert _close(y[b, n, i, j], want[0]), (b, n, i, j)


def test_hard_max_gradient_matches_torch_max():
    g = torch.Generator().manual_seed(2)
    m = bm.BMLinear(9, 4)
    x = torch.randn(5, 9, generator=g, requires_grad=True)
    up = torch.randn(5, 4, generator=g)
    (m(x) * up).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    vp, vn, b = (t.detach().clone().requires_grad_() for t in (m.v_pos, m.v_neg, m.bias))
    want = torch.stack([_neuron(r, vp, vn, b) for r in x2])  # torch.max: gradient to the first arg-max
    (want * up).sum().backward()
    assert _close(x.grad, x2.grad) and _close(m.v_pos.grad, vp.grad) and _close(m.v_neg.grad, vn.grad)
    assert _close(m.bias.grad, b.grad)


def test_soft_max_gradient_and_annealing():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(6, 11, generator=g, dtype=torch.float64)
    V = torch.randn(4, 11, generator=g, dtype=torch.float64)
    X[0] = -math.inf  # an all-zero input row: output -inf, gradient 0, no NaN
    Xg, Vg = X.clone().requires_grad_(), V.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: maxplus(a, b, 0.3)[1:], (Xg, Vg))
    y = maxplus(Xg, Vg, 0.3)
    y[1:].sum().backward()
    assert torch.isfinite(Xg.grad).all() and (Xg.grad[0] == 0).all()
    hard = maxplus(X.float(), V.float())
    for t in (1.0, 0.1, 0.01):  # t*logsumexp(z/t) lies in [max, max + t ln K]
        soft = maxplus(X, V, t).float()
        assert (soft[1:] >= hard[1:] - 1e-5).all() and (soft[1:] <= hard[1:] + t * math.log(11) + 1e-5).all()


def test_conversion_formula_and_sign_pattern():
    g = torch.Generator().manual_seed(4)
    lin = nn.Linear(6, 8)
    with torch.no_grad():  # outputs 0-3: positive weights, 4-7 negative (one sign per output)
        lin.weight.copy_(torch.rand(8, 6, generator=g) + 0.05)
        lin.weight[4:] *= -1
        lin.bias.zero_()
    conv = bm.BMLinear.from_float(lin)
    assert torch.equal(conv.v_pos, torch.log(lin.weight.clamp(min=1e-6)))
    assert torch.equal(conv.v_neg, torch.log((-lin.weight).clamp(min=1e-6)))
    assert torch.equal(conv.bias, lin.bias)
    x = torch.rand(10, 6, generator=g) + 0.01  # all-positive inputs
    assert torch.equal(torch.sign(conv(x)), torch.sign(lin(x)))
    # a single input: the neuron is exactly the product (up to the float rounding of exp(log))
    one = nn.Linear(1, 3)
    assert _close(bm.BMLinear.from_float(one)(x[:, :1]), one(x[:, :1]))


def test_convert_model_and_layer_outputs():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 3)).eval()
    conv = bm.convert(model, ["0"])
    assert isinstance(conv[0], bm.BMConv2d) and isinstance(model[0], nn.Conv2d)  # the original is untouched
    assert conv[0].lowbit_name == "0" and bm.bm_layers(conv) == ["0"]
    assert bm.convertible_layers(model) == ["0", "4"]
    x = torch.rand(2, 1, 5, 5)
    outs = bm.layer_outputs(conv, x, ["0", "4"])
    ref = bm.layer_outputs(model, x, ["0", "4"])
    assert outs["0"].shape == ref["0"].shape
    with torch.no_grad():
        assert torch.equal(outs["0"], conv[0](x)) and torch.equal(ref["0"], model[0](x))
    full = bm.convert(model)
    assert bm.bm_layers(full) == ["0", "4"]
    assert bm.execution_order(full, x, ["4", "0"]) == ["0", "4"]


def test_convert_errors_name_the_layer():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"'0' \(Conv1d\)"):
        bm.convert(model, ["0"])
    with pytest.raises(ValueError, match=r"'0' \(Conv1d\) matched by '\*'"):
        bm.convert(model, "*")
    with pytest.raises(ValueError, match="no convertible layer matches 'fc'"):
        bm.convert(model, ["fc"])
    with pytest.raises(ValueError, match="already a BM layer"):
        bm.convert(bm.convert(model, ["2"]), ["2"])
    with pytest.raises(ValueError, match="zero padding"):
        bm.convert(nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect")), ["0"])


def test_nan_inf_input_is_an_error():
    m = bm.convert(nn.Sequential(nn.Linear(3, 2)), ["0"])
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match=r"BM layer '0'.*(NaN|Inf)"):
            m(torch.tensor([[1.0, bad, 0.5]]))


def test_batchnorm_folding_and_prepare():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 16, 3), nn.BatchNorm1d(3))
    with torch.no_grad():
        for bn in (model[1], model[5]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(-2, 2)  # negative scales swap the log weights
            bn.weight[0] = 0.0  # a zero scale: constant output
            bn.bias.uniform_(-1, 1)
    bmm = bm.convert(model).eval()
    x = torch.randn(3, 2, 4, 4)
    from lowbit.graph import prepare

    p = prepare(bmm, x)
    mods = dict(p.gm.named_modules())
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU)) for m in mods.values())
    assert not p.unsupported
    layers = [m for m in mods.values() if isinstance(m, bm.BMLayer)]
    assert [m.act for m in layers] == ["relu", None]
    with torch.no_grad():
        assert torch.allclose(p.gm(x), bmm(x), rtol=1e-4, atol=1e-5)


def _layer_error_bound(layer: bm.BMLayer, xq: torch.Tensor, q_in, q_out, params) -> torch.Tensor:
    """|integer code - float code| bound: each branch value is within one log step (input and weight code
    rounding, half a step each) of the float one; terms below the code range count at most the smallest
    representable product; the exp table and the shifts round to 2^-F; the output rounds by 0.5."""
    s_in, z_in = q_in
    s_out, _ = q_out
    x = s_in * (xq.to(torch.float32) - z_in)
    rel = 2.0 ** (1.0 / (1 << params["f"])) - 1
    top = float(torch.maximum(layer.v_pos.max(), layer.v_neg.max()).detach())
    floor_val = 255.0 * math.exp(top) * s_in / s_out * \
        2.0 ** ((-(1 << (params["bits"] - 1)) + 1) / (1 << params["f"])) * 2
    branches = 0
    with torch.no_grad():
        if isinstance(layer, bm.BMLinear):
            lx = [safe_log(x), safe_log(-x)]
            for a in lx:
                for v in (layer.v_pos, layer.v_neg):
                    branches = branches + torch.exp((a[:, None, :] + v[None]).max(-1).values)
        else:
            for a in (safe_log(x), safe_log(-x)):
                cols = F.unfold(F.pad(a, (1, 1, 1, 1), value=-math.inf), 3).transpose(1, 2)
                for v in (layer.v_pos, layer.v_neg):
                    e = torch.exp((cols[:, :, None, :] + v.reshape(v.shape[0], -1)[None, None]).max(-1).values)
                    branches = branches + e.transpose(1, 2).reshape(x.shape[0], -1, x.shape[2], x.shape[3])
    return 0.5 + branches * rel / s_out + 4 * floor_val + 5 * 2.0 ** -params["F"] + 1e-3


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_integer_layer_against_float_layer(bits: int, kind: str):
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    layer = bm.BMLinear(40, 12) if kind == "linear" else bm.BMConv2d(3, 5, 3, padding=1)
    layer.code_bits = bits
    q_in, q_out = (0.02, 100), (0.05, 80)
    shape = (6, 40) if kind == "linear" else (2, 3, 6, 6)
    xq = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    imod = layer.to_integer(q_in, q_out, "probe")
    assert isinstance(imod, QBMLinear if kind == "linear" else QBMConv2d)
    got = imod(xq)
    # the layer runs the kernel specification with its own parameters, bit for bit
    p = bm.integer_params(layer.v_pos, layer.v_neg, layer.bias, q_in, q_out, bits)
    if kind == "linear":
        ref = bm_linear_ref(xq, 100, p["cpos"], p["cneg"], bits, p["L"], imod.epilogue)
    else:
        ref = bm_conv2d_ref(xq, 100, p["cpos"], p["cneg"], bits, p["L"], imod.epilogue, padding=1)
    assert torch.equal(got, ref)
    # and stays within the derived bound of the float layer
    with torch.no_grad():
        y = layer(q_in[0] * (xq.to(torch.float32) - q_in[1]))
    want = y / q_out[0] + q_out[1]
    inside = (want > 0.5) & (want < 254.5)  # away from the clamp
    err = (got.to(torch.float32) - want).abs()
    bound = _layer_error_bound(layer, xq, q_in, q_out, p)
    assert inside.any() and (err[inside] <= bound[inside]).all(), float((err - bound)[inside].max())


def test_integer_conversion_errors_name_the_layer():
    layer = bm.BMLinear(4, 2)
    layer.code_bits, layer.log_step_bits = 8, 5
    with pytest.raises(bm.BMIntegerError, match="BM layer 'fc'.*coarser step or wider codes"):
        layer.to_integer((0.1, 0), (0.1, 0), "fc")
    layer.code_bits, layer.log_step_bits = 16, None
    with torch.no_grad():
        layer.v_pos.fill_(10.0)  # products of ~5.6e6 output codes: beyond the exp table's range
    with pytest.raises(bm.BMIntegerError, match="BM layer 'fc'.*overflow"):
        layer.to_integer((1.0, 0), (0.001, 0), "fc")
    with torch.no_grad():
        layer.v_pos.fill_(float("nan"))
    with pytest.raises(bm.BMIntegerError, match="BM layer 'fc'.*NaN"):
        layer.to_integer((1.0, 0), (1.0, 0), "fc")


def test_integer_model_end_to_end(digits_cnn, tmp_path):
    """Only the hidden fully connected layer converted (no training needed to keep accuracy; the other
    layers become int8 as in the static method): the integer BM model is close
    to the float BM model, saves and loads bit-exactly, and has no multiplication inside BM layers."""
    from lowbit.evaluate import accuracy
    from lowbit.opcount import count_ops

    model, splits, _ = digits_cnn
    bmm = bm.convert(model, ["fc1"]).eval()
    a_float = accuracy(bmm, splits.test)
    calib = splits.calib.tensors[0]
    q = bm.quantize_bm(bmm, calib)
    assert q.lowbit_meta["method"] == "bm"
    a_int = accuracy(q, splits.test)
    assert a_float > 90 and abs(a_int - a_float) <= 1.0, (a_float, a_int)
    q8 = bm.quantize_bm(bmm, calib, code_bits=8)
    assert accuracy(q8, splits.test) > a_float - 3.0
    path = lowbit.save(q, tmp_path / "bm.lowbit")
    back = lowbit.load(path)
    x = splits.test.tensors[0][:16]
    assert torch.equal(back(x), q(x))
    ops = count_ops(q, x[:1])
    for name, typ, c in ops["layers"]:
        if typ.startswith("QBM"):
            assert c["mul"] == 0 and c["max"] > 0 and c["lookup"] > 0, name
    fc1 = next(c for n, t, c in ops["layers"] if t == "QBMLinear")
    assert fc1["add"] == 256 * (2 * 1024 + 2) and fc1["max"] == 256 * 2 * 1023  # ReLU input: two branches
    assert fc1["lookup"] == 256 * 2 + 1024


def test_bm_layers_save_and_load(digits_cnn, tmp_path):
    """Integer BM convolutions (8-bit codes stored as int8) round-trip through the model file."""
    model, splits, _ = digits_cnn
    bmm = bm.convert(model, ["features.0", "fc2"]).eval()
    x = splits.test.tensors[0][:8]
    # the float BM model as lowbit's graph holds it (compare's float row): BM layers are leaf modules
    fbm = prepare(bmm, x[:1]).gm
    fbm.lowbit_meta = {"method": "float", "input": {"dtype": "float32"}, "output": {"dtype": "float32"}}
    back = lowbit.load(lowbit.save(fbm, tmp_path / "f.lowbit"))
    assert sum(isinstance(m, (bm.BMConv2d, bm.BMLinear)) for m in back.modules()) == 2
    with torch.no_grad():
        assert torch.equal(back(x), fbm(x))
    q8 = bm.quantize_bm(bmm, splits.calib.tensors[0], code_bits=8)
    conv = next(m for m in q8.modules() if isinstance(m, QBMConv2d))
    assert conv.cpos.dtype == torch.int8
    back = lowbit.load(lowbit.save(q8, tmp_path / "q.lowbit"))
    assert torch.equal(back(x), q8(x))


def test_bm_method_through_quantize(digits_cnn):
    """The registered 'bm' method: layer-by-layer training on the prepared graph, then the integer model."""
    from lowbit.evaluate import accuracy

    model, splits, _ = digits_cnn
    with pytest.raises(ValueError, match="training data"):
        lowbit.quantize(model, "bm", calib=splits.calib)
    with pytest.raises(ValueError, match="code_bits"):
        lowbit.quantize(model, "bm", calib=splits.calib, train=splits.train, config={"code_bits": 12})
    q = lowbit.quantize(model, "bm", calib=splits.calib, train=splits.train, test=splits.test,
                        config={"layers": "fc1", "epochs_per_layer": 1, "finetune_epochs": 0, "batch_size": 32,
                                "progress": False, "threads": 1})
    meta = q.lowbit_meta
    assert meta["method"] == "bm" and meta["bm"]["layers"] == ["fc1"]
    assert any(isinstance(m, QBMLinear) for m in q.modules())
    assert abs(accuracy(q, splits.test) - meta["bm"]["float_bm_acc"]) <= 1.5


class _Branchy(nn.Module):
    """A model torch.export cannot capture (control flow on a tensor value): saved weights-only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc1 = nn.Linear(3 * 4 * 4, 6)
        self.fc2 = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1)))
        if h.sum() > 0:
            h = h + 0
        return self.fc2(h)


@pytest.mark.parametrize("method", ["float16", "dynamic"])
def test_float_bm_layers_in_a_weights_only_file(tmp_path, method):
    """A graph-free model with float BM layers: its weights-only file loads into the float model (or the
    converted one); hostile BM fields are refused before the user's model is touched."""
    import copy

    from lowbit.io import ModelFileError
    from lowbit.modelfile.container import read, to_bytes

    torch.manual_seed(0)
    float_model = _Branchy().eval()
    q = lowbit.quantize(bm.convert(float_model, ["conv", "fc1"]), method)
    path = lowbit.save(q, tmp_path / "w.lowbit", weights_only=True)
    x = torch.rand(2, 2, 4, 4)
    with torch.no_grad():
        want = q(x)
        for target in (copy.deepcopy(float_model), bm.convert(float_model, ["conv", "fc1"])):
            back = lowbit.load(path, model=target)
            assert isinstance(back.conv, bm.BMConv2d) and isinstance(back.fc1, bm.BMLinear)
            assert torch.equal(back(x), want)

    header, tensors = read(path)
    assert header["meta"]["swapped"]["fc1"] == {"class": "torch.nn.modules.linear.Linear",
                                                 "params": {"weight": [6, 48], "bias": [6]}}

    def attr(path: str, **kv: object):
        return lambda h, t: h["modules"][path]["attrs"].update(kv)

    def tensor(key: str, value: torch.Tensor):
        return lambda h, t: t.update({key: value})

    cases = {
        "negative temperature": attr("fc1", temperature=-1.0),
        "zero floor": attr("conv", floor=0.0),
        "code width": attr("fc1", code_bits=12),
        "activation": attr("conv", act="os.system"),
        "unknown attribute": attr("fc1", __class__="builtins.eval"),
        "negative size": attr("fc1", in_features=-48),
        "groups": attr("conv", groups=2),
        "huge kernel": attr("conv", kernel_size=[1 << 20, 1 << 20]),
        "class": lambda h, t: h["modules"]["fc1"].update({"class": "_BMPrivate"}),
        "broadcast tensor": tensor("fc1::v_pos", torch.zeros(1, 48)),
        "tensor dtype": tensor("fc1::v_neg", torch.zeros(6, 48, dtype=torch.float64)),
        "NaN": tensor("conv::v_pos", torch.full((3, 2, 3, 3), float("nan"))),
        "missing tensor": lambda h, t: t.pop("conv::v_neg"),
        "swapped class": lambda h, t: h["meta"]["swapped"]["conv"].update({"class": "torch.nn.modules.linear.Linear"}),
        "swapped shape": lambda h, t: h["meta"]["swapped"]["fc1"]["params"].update({"weight": [6, 47]}),
        "no origin": lambda h, t: h["meta"]["swapped"].pop("conv"),
    }
    for what, damage in cases.items():
        h, t = copy.deepcopy(header), dict(tensors)
        damage(h, t)
        bad = tmp_path / f"{what.replace(' ', '_')}.lowbit"
        bad.write_bytes(to_bytes(h, t))
        target = copy.deepcopy(float_model)
        with pytest.raises(ModelFileError):
            lowbit.load(bad, model=target)
        assert type(target.conv) is nn.Conv2d and type(target.fc1) is nn.Linear, what  # untouched
