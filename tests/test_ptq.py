"""The four post-training modes: real integer execution, quality bar, save/load, bad input."""

import struct

import pytest
import torch
from torch import nn

import lowbit
from _spec_modules import check_layers
from lowbit.evaluate import FloatIO, accuracy, model_input
from lowbit.io import ModelFileError, file_size
from lowbit.methods.integer_graph import UnsupportedForIntegerError
from lowbit.nn import DynamicQConv, DynamicQLinear, F16Layer, QAdd, QAvgPool2d, QConv, QLinear

MODES = ["dynamic", "static", "full_integer", "float16"]


@pytest.fixture(scope="module")
def quantized(digits_quantized):
    return {m: digits_quantized[m] for m in MODES}


def _float_file(model, splits):
    from lowbit.graph import prepare

    gm = prepare(model, splits.calib.tensors[0][:1]).gm
    return gm, file_size(gm)


def test_quality_bar_on_digits(digits_cnn, quantized):
    """Issue 2: static and full-integer within 0.5 points of float, float16 identical to 0.1 point and
    half the size, every int8 file at most 0.27x the float file."""
    model, splits, _ = digits_cnn
    fgm, fsize = _float_file(model, splits)
    a0 = accuracy(fgm, splits.test)
    assert a0 > 95.0
    acc = {m: accuracy(q, splits.test) for m, q in quantized.items()}
    size = {m: file_size(q) for m, q in quantized.items()}
    assert abs(acc["static"] - a0) <= 0.5, (acc, a0)
    assert abs(acc["full_integer"] - a0) <= 0.5, (acc, a0)
    assert abs(acc["float16"] - a0) <= 0.1, (acc, a0)
    assert size["float16"] <= 0.51 * fsize
    for m in ("dynamic", "static", "full_integer"):
        assert size[m] <= 0.27 * fsize, (m, size[m], fsize)
    assert abs(acc["dynamic"] - a0) <= 1.5


def test_layers_are_replaced_by_integer_modules(quantized):
    kinds = {m: {type(mod) for mod in q.modules()} for m, q in quantized.items()}
    for m in ("static", "full_integer"):
        assert QConv in kinds[m] and QLinear in kinds[m]
        assert not any(issubclass(k, (nn.Conv2d, nn.Linear)) for k in kinds[m])
    assert DynamicQConv in kinds["dynamic"] and DynamicQLinear in kinds["dynamic"]
    assert F16Layer in kinds["float16"]
    assert all(isinstance(q.lowbit_meta["method"], str) for q in quantized.values())


def test_static_runs_integer_arithmetic(quantized, digits_cnn):
    """Every quantized layer receives uint8 codes and returns uint8 codes; weights are int8."""
    _, splits, _ = digits_cnn
    q = quantized["static"]
    seen = []

    def hook(mod, inp, out):
        seen.append((type(mod).__name__, inp[0].dtype, out.dtype, mod.weight_q.dtype))

    hs = [m.register_forward_hook(hook) for m in q.modules() if isinstance(m, (QConv, QLinear))]
    q(splits.test.tensors[0][:4])
    for h in hs:
        h.remove()
    assert len(seen) == sum(isinstance(m, (QConv, QLinear)) for m in q.modules())
    assert all(s[1:] == (torch.uint8, torch.uint8, torch.int8) for s in seen)


# Relative output error against the float model on 200 digits test images, measured (CPU-independent:
# integer layers are bit-exact, tests/test_exact_models.py) and given about twice that as the bar:
# dynamic 0.0048, static / full_integer 0.0107, float16 0.00012.
REL_ERROR_BAR = {"dynamic": 0.01, "static": 0.02, "full_integer": 0.02, "float16": 0.0003}


@pytest.mark.parametrize("mode", MODES)
def test_close_to_float(mode, digits_cnn, quantized):
    model, splits, _ = digits_cnn
    x = splits.test.tensors[0][:200]
    with torch.no_grad():
        ref = model(x)
        out = FloatIO(quantized[mode])(x)
    assert out.dtype == torch.float32
    agree = (ref.argmax(1) == out.argmax(1)).float().mean().item()
    assert agree >= 0.99  # measured 0.995 (static) to 1.0
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < REL_ERROR_BAR[mode], rel


def test_float16_weights_are_rounded_float32(digits_cnn, quantized):
    """float16 layers hold exactly the float16 rounding (round to nearest even) of the folded float weights."""
    import numpy as np

    from lowbit.graph import Fused, prepare

    model, splits, _ = digits_cnn
    gm = prepare(model, splits.calib.tensors[0][:1]).gm
    n = 0
    for name, mod in quantized["float16"].named_modules():
        if isinstance(mod, F16Layer):
            ref = gm.get_submodule(name)
            ref = ref.layer if isinstance(ref, Fused) else ref
            want = ref.weight.detach().numpy().astype(np.float16)
            assert np.array_equal(mod.weight.numpy().reshape(want.shape), want), name
            n += 1
    assert n >= 5


@pytest.mark.parametrize("mode", MODES)
def test_save_load_bit_identical(mode, quantized, digits_cnn, tmp_path):
    _, splits, _ = digits_cnn
    q = quantized[mode]
    path = lowbit.save(q, tmp_path / f"{mode}.lowbit")
    r = lowbit.load(path)
    x = model_input(q, splits.test.tensors[0][:64])
    with torch.no_grad():
        assert torch.equal(q(x), r(x))
    assert r.lowbit_meta["method"] == mode
    assert not list(tmp_path.glob("*.tmp"))


def test_full_integer_io(digits_cnn):
    model, splits, _ = digits_cnn
    for io_dtype, dt in (("uint8", torch.uint8), ("int8", torch.int8)):
        q = lowbit.quantize(model, "full_integer", calib=splits.calib, io_dtype=io_dtype)
        meta = q.lowbit_meta
        assert meta["input"]["dtype"] == io_dtype and meta["output"]["dtype"] == io_dtype
        x = model_input(q, splits.test.tensors[0][:8])
        assert x.dtype == dt
        y = q(x)
        assert y.dtype == dt
        with pytest.raises(TypeError, match=io_dtype):
            q(splits.test.tensors[0][:8])  # float input to a full-integer model


def test_int8_io_equals_uint8_io(digits_cnn):
    model, splits, _ = digits_cnn
    qu = lowbit.quantize(model, "full_integer", calib=splits.calib, io_dtype="uint8")
    qs = lowbit.quantize(model, "full_integer", calib=splits.calib, io_dtype="int8")
    x = splits.test.tensors[0][:16]
    yu = qu(model_input(qu, x)).to(torch.int16) - 128
    ys = qs(model_input(qs, x)).to(torch.int16)
    assert torch.equal(yu, ys)


# ---------------------------------------------------------------- other architectures

class _Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(torch.sigmoid(self.conv(x)), 1))


@pytest.mark.parametrize("name", ["resnet20", "mobilenet"])
def test_residual_and_depthwise_models(name, digits_cnn, residual_models):
    _, splits, _ = digits_cnn
    q, model = residual_models[0][name]
    kinds = {type(m) for m in q.modules()}
    assert QConv in kinds
    if name == "resnet20":
        assert QAdd in kinds
    if any(isinstance(m, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)) for m in model.modules()):
        assert QAvgPool2d in kinds
    x = splits.test.tensors[0][:64]
    with torch.no_grad():  # every integer module is exact (tests/test_exact_models.py); here the float error
        ref, out = model(x), q(x)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < {"resnet20": 0.02, "mobilenet": 0.006}[name], rel  # measured 0.0116 / 0.0032: about 2x
    assert not q.lowbit_meta["float_ops"]


def test_static_leaves_unsupported_float_and_lists_it(digits_cnn):
    _, splits, _ = digits_cnn
    torch.manual_seed(0)  # the bound below was measured on seeded models; unseeded, it depended on test order
    model = _Unsupported().eval()
    q = lowbit.quantize(model, "static", calib=splits.calib)
    assert any("sigmoid" in s for s in q.lowbit_meta["float_ops"])
    x = splits.test.tensors[0][:32]
    out, n = check_layers(q, x)  # the integer modules around the float sigmoid are exact
    assert n >= 4
    s_out = next(m.out_scale for m in q.modules() if isinstance(m, QLinear))
    with torch.no_grad():
        err = (out - model(x)).abs().max().item()
    assert err <= 2 * s_out, err / s_out  # within two output codes (measured 1.0-1.6 over three seeds)


def test_full_integer_rejects_unsupported_layer(digits_cnn):
    _, splits, _ = digits_cnn
    with pytest.raises(UnsupportedForIntegerError, match="sigmoid"):
        lowbit.quantize(_Unsupported().eval(), "full_integer", calib=splits.calib)


def test_keep_float_override(digits_cnn):
    model, splits, _ = digits_cnn
    from lowbit.graph import layer_names, prepare

    names = layer_names(prepare(model, splits.calib.tensors[0][:1]).gm)
    first, last = names[0], names[-1]
    q = lowbit.quantize(model, "static", calib=splits.calib, keep_float=(first, last))
    assert q.lowbit_meta["float_layers"] == [first, last]
    assert sum(isinstance(m, (QConv, QLinear)) for m in q.modules()) == len(names) - 2
    assert accuracy(q, splits.test) > 90
    with pytest.raises(UnsupportedForIntegerError, match="kept float"):
        lowbit.quantize(model, "full_integer", calib=splits.calib, keep_float=(first,))
    qd = lowbit.quantize(model, "dynamic", calib=splits.calib, overrides={last: {"keep_float": True}})
    assert qd.lowbit_meta["float_layers"] == [last]


def test_per_tensor_option(digits_cnn):
    model, splits, _ = digits_cnn
    q = lowbit.quantize(model, "static", calib=splits.calib, per_channel=False)
    for m in q.modules():
        if isinstance(m, (QConv, QLinear)):
            assert torch.unique(m.weight_scale).numel() == 1


# ---------------------------------------------------------------- bad input

def test_nan_weights(digits_cnn):
    model, splits, _ = digits_cnn
    import copy

    bad = copy.deepcopy(model)
    next(bad.parameters()).data[0].view(-1)[0] = float("nan")
    for mode in MODES:
        with pytest.raises(ValueError, match="NaN"):
            lowbit.quantize(bad, mode, calib=splits.calib)


def test_empty_and_mismatched_calibration(digits_cnn):
    model, splits, _ = digits_cnn
    with pytest.raises(ValueError, match="empty"):
        lowbit.quantize(model, "static", calib=torch.zeros(0, 1, 8, 8), example_input=torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="does not match"):
        lowbit.quantize(model, "static", calib=torch.zeros(10, 1, 9, 9), example_input=torch.zeros(1, 1, 8, 8))
    nan = torch.zeros(10, 1, 8, 8)
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        lowbit.quantize(model, "static", calib=nan)


def test_unknown_method_and_options(digits_cnn):
    model, splits, _ = digits_cnn
    with pytest.raises(ValueError, match="unknown method 'int3'.*static"):
        lowbit.quantize(model, "int3", calib=splits.calib)
    with pytest.raises(ValueError, match="unknown option"):
        lowbit.quantize(model, "static", calib=splits.calib, config={"bogus": 1})
    with pytest.raises(ValueError, match="io_dtype"):
        lowbit.quantize(model, "full_integer", calib=splits.calib, io_dtype="int4")


def test_corrupt_and_future_files(quantized, tmp_path):
    path = lowbit.save(quantized["static"], tmp_path / "m.lowbit")
    data = path.read_bytes()
    (tmp_path / "trunc.lowbit").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="corrupt or truncated"):
        lowbit.load(tmp_path / "trunc.lowbit")
    (tmp_path / "junk.lowbit").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelFileError):
        lowbit.load(tmp_path / "junk.lowbit")
    with pytest.raises(FileNotFoundError):
        lowbit.load(tmp_path / "missing.lowbit")
    # same file, header claiming a newer format version
    n = struct.unpack("<Q", data[:8])[0]
    from lowbit.modelfile.container import FORMAT_VERSION

    old = f'\\"format_version\\":{FORMAT_VERSION}'.encode()
    header = data[8 : 8 + n].replace(old, b'\\"format_version\\":99')
    assert header != data[8 : 8 + n]
    (tmp_path / "future.lowbit").write_bytes(struct.pack("<Q", len(header)) + header + data[8 + n :])
    with pytest.raises(ModelFileError, match="newer|upgrade"):
        lowbit.load(tmp_path / "future.lowbit")
    # a plain safetensors file is not a lowbit model
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ModelFileError, match="not a lowbit model"):
        lowbit.load(tmp_path / "plain.safetensors")


@pytest.mark.parametrize("mode", MODES)
def test_conv1d_models(mode, tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Conv1d(8, 4, 3, dilation=2),
                      nn.Flatten(), nn.Linear(16, 5)).eval()
    x = torch.randn(64, 3, 16)
    q = lowbit.quantize(m, mode, calib=x)
    with torch.no_grad():
        ref, out = m(x), FloatIO(q)(x)
        # measured 0.0054-0.0090 (int8 modes), 0.0002-0.0003 (float16) over three seeds
        assert ((out - ref).norm() / ref.norm()).item() < (0.0005 if mode == "float16" else 0.015)
        r = lowbit.load(lowbit.save(q, tmp_path / "c1.lowbit"))
        xi = model_input(q, x)
        assert torch.equal(q(xi), r(xi))
