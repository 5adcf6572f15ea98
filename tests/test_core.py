"""The shared core: one packed-weight protocol for the three kernel families, integer layers built from
quantized-value specs, typed method configs, and copies (deepcopy, pickle) of integer models."""

import copy
import io
import pickle

import pytest
import torch

import lowbit
from lowbit import kernels
from lowbit.evaluate import model_input
from lowbit.formats import BinaryFormat, IntRange, PerTensor, QSpec, apot_levels, odd_levels
from lowbit.formats.packing import radix_group, storage_scheme
from lowbit.kernels import PackedInt8, pack_weights, weights_from_storage
from lowbit.kernels.binary import PackedBinary, binary_linear_ref
from lowbit.kernels.reference import int8_gemm_ref
from lowbit.kernels.w46 import PackedW46, w46_linear_ref
from lowbit.methods import METHODS, QuantConfig, StaticConfig, get_method, register
from lowbit.methods.base import Method
from lowbit.models import build
from lowbit.nn import QAdd, QLinear

pytestmark = pytest.mark.usefixtures("one_thread")


def _codes(fmt, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    lv = torch.tensor(fmt.levels)
    return lv[torch.randint(0, len(lv), shape, generator=g)].to(torch.int8)


@pytest.mark.parametrize("fmt,kernel,extra", [
    (IntRange.signed_bits(4), None, {}),
    (apot_levels(4, True), None, {}),
    (odd_levels(21), "w46", {"K_x": 12}),
    (BinaryFormat(), None, {}),
])
def test_packed_weight_protocol(fmt, kernel, extra):
    codes = _codes(fmt, (6, 70))
    p = pack_weights(codes, fmt, kernel, **extra)
    family = PackedW46 if kernel == "w46" else PackedBinary if isinstance(fmt, BinaryFormat) else PackedInt8
    assert isinstance(p, family)
    assert torch.equal(p.codes.to(torch.int8), codes) and p.format == fmt
    assert (p.out_features, p.in_features) == (6, 70)
    attrs, tensors = p.storage()
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    if storage_scheme(fmt) == "radix":  # 21 levels: 7 codes per 32-bit word, 4.57 bits each
        assert nbytes == 4 * -(-6 * 70 // radix_group(fmt)) < (6 * 70 * fmt.bits + 7) // 8
    else:
        assert nbytes == (6 * 70 * fmt.bits + 7) // 8  # stored at the format's width
    for clone in (weights_from_storage(attrs, tensors), copy.deepcopy(p), pickle.loads(pickle.dumps(p))):
        assert type(clone) is type(p) and torch.equal(clone.codes, p.codes) and clone.format == p.format
    g = torch.Generator().manual_seed(1)
    if isinstance(fmt, BinaryFormat):
        x = (torch.randint(0, 2, (5, 70), generator=g) * 2 - 1).to(torch.int8)
        assert torch.equal(copy.deepcopy(p).linear(x), binary_linear_ref(x, codes))
        with pytest.raises(ValueError, match="bias"):
            p.linear(x, None, torch.zeros(6, dtype=torch.int32))
    elif kernel == "w46":
        x = torch.randint(0, 25, (5, 70), dtype=torch.uint8, generator=g)
        assert torch.equal(p.linear(x, 12), w46_linear_ref(x, 12, codes))
        assert torch.equal(p.linear(x, 3), w46_linear_ref(x, 12, codes, zp=3))  # any zero point in [0, 2 K_x]
        with pytest.raises(ValueError, match="zero point"):
            p.linear(x, 25)
    else:
        x = torch.randint(0, 256, (5, 70), dtype=torch.uint8, generator=g)
        assert torch.equal(pickle.loads(pickle.dumps(p)).linear(x, 7), int8_gemm_ref(x, 7, codes))


def test_pack_weights_refuses_what_no_kernel_runs():
    with pytest.raises(ValueError, match="no integer kernel"):
        pack_weights(torch.zeros(2, 2, dtype=torch.int8), IntRange(-300, 300))
    with pytest.raises(ValueError, match="cannot run"):
        pack_weights(torch.zeros(2, 2, dtype=torch.int8), IntRange.signed_bits(4), "w46", K_x=9)
    with pytest.raises(ValueError, match="outside"):
        kernels.pack_int8(torch.full((2, 2), 9, dtype=torch.int8), IntRange.signed_bits(4))


def test_integer_layer_from_specs_sub_byte_codes_and_float_output(tmp_path):
    """A 4-bit layer: uint4 activation codes in, uint4 codes out (clamped to the format), and the same layer
    with no output spec writes acc * s_in * s_w exactly; both survive save/load."""
    g = torch.Generator().manual_seed(0)
    w = _codes(IntRange.signed_bits(4), (8, 16))
    ws = torch.rand(8, generator=g) * 0.3 + 0.05  # large enough that codes saturate at 15
    in_spec = QSpec.per_tensor(IntRange.signed_bits(4), 0.5, 0)  # signed codes: the layer takes them +8
    out_spec = QSpec.per_tensor(IntRange(0, 15, True), 0.25, 0)
    x = torch.randint(0, 16, (3, 16), dtype=torch.uint8, generator=g)  # shifted codes, zero point 8
    layer = QLinear(w, ws, None, in_spec, out_spec, "relu", IntRange.signed_bits(4))
    acc = (x.double() - 8) @ w.double().t()
    ref = torch.clamp(torch.floor(acc * ws.double() * 0.5 / 0.25 + 0.5), 0, 15)
    assert torch.equal(layer(x).double(), ref)  # one rounding of a Q31 multiplier: exact on these values
    assert (ref == 15).sum() >= 3 and (ref == 0).sum() >= 3
    flt = QLinear(w, ws, None, in_spec, None)
    assert torch.allclose(flt(x).double(), acc * ws.double() * 0.5, rtol=1e-6)
    g2 = torch.fx.Graph()
    root = torch.nn.Module()
    root.a, root.b = layer, QLinear(_codes(IntRange.signed_bits(4), (4, 8), 1), ws[:4], None, out_spec, None,
                                    weight_format=IntRange.signed_bits(4))
    g2.output(g2.call_module("b", (g2.call_module("a", (g2.placeholder("x"),)),)))
    gm = torch.fx.GraphModule(root, g2)
    gm.lowbit_meta = {}
    path = lowbit.save(gm, tmp_path / "l.lowbit")
    assert torch.equal(lowbit.load(path)(x), gm(x))


def test_qadd_clamps_to_the_output_format():
    a = torch.tensor([0, 8, 15, 15], dtype=torch.uint8)
    b = torch.tensor([0, 8, 15, 8], dtype=torch.uint8)
    out = QAdd((1.0, 8), (1.0, 8), (1.0, 8), 0, 15)(a, b)  # reals -8..7 each; sums -16, 0, 14, 7
    assert out.tolist() == [0, 8, 15, 15]


def test_typed_configs_are_the_methods(digits_cnn):
    model, splits, _ = digits_cnn
    a = lowbit.quantize(model, StaticConfig(weight_granularity=PerTensor(), progress=False), calib=splits.calib)
    b = lowbit.quantize(model, "static", calib=splits.calib, per_channel=False, progress=False)
    x = splits.test.tensors[0][:32]
    assert torch.equal(a(x), b(x))
    assert a.lowbit_meta["config"]["weight_granularity"] == "per_tensor"
    assert get_method(StaticConfig()).name == "static" and get_method(StaticConfig) is METHODS["static"]
    assert StaticConfig(weight_granularity="per_channel").weight_granularity == StaticConfig().weight_granularity
    with pytest.raises(ValueError, match="not the config"):
        get_method(QuantConfig())
    with pytest.raises(ValueError, match="granularity"):
        StaticConfig(weight_granularity="per_row")
    with pytest.raises(ValueError, match="output channel"):
        lowbit.quantize(model, "static", calib=splits.calib, weight_granularity="per_group:8", progress=False)

    class Twice(Method):
        name = "twice"
        config_cls = StaticConfig

    with pytest.raises(ValueError, match="own config"):
        register(Twice)


@pytest.mark.parametrize("method", ["dynamic", "static", "full_integer", "float16"])
def test_integer_models_copy_and_pickle(method):
    torch.manual_seed(0)
    m = build("resnet20", 1, 10, 8).eval()
    x = torch.randn(16, 1, 8, 8)
    q = lowbit.quantize(m, method, calib=x)
    xi = model_input(q, x)
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    for c in (copy.deepcopy(q), torch.load(buf, weights_only=False)):
        assert torch.equal(c(xi), q(xi)) and c.lowbit_meta["method"] == method
