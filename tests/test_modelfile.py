"""Model files (issue 6): hostile headers never run code, every corruption is a ModelFileError, every
header field is checked, float torch.nn modules are saved, a loaded model runs without fx code.

Hostile files are a real saved file with one part of its header replaced and the checksum (if the
format has one) recomputed, as an attacker would: the loader's checks must stop them, not the checksum.
"""

from __future__ import annotations

import base64
import copy
import json
import random
import zlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import fx, nn

import lowbit
from lowbit.evaluate import model_input
from lowbit.io import ModelFileError
from lowbit.modelfile.container import DIGEST_KEY, FORMAT_VERSION, digest, read

MARKER = "pwned.marker"
PAYLOAD = f"__import__('pathlib').Path({MARKER!r}).touch()"
#: the same without a dot (torch.fx splits method targets on dots)
NODOT = f"exec(str(bytes({list(PAYLOAD.encode())}),'ascii'))"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A static model (conv, max-pool, linear) saved once: (model, path, header, tensors)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 3)).eval()
    q = lowbit.quantize(m, "static", calib=torch.randn(16, 1, 8, 8), progress=False)
    path = lowbit.save(q, tmp_path_factory.mktemp("small") / "m.lowbit")
    header, tensors = read(path)
    return q, path, header, tensors


def _write(path, header, tensors):
    """A file with this header and tensors, its checksum made to match."""
    return _write_text(path, json.dumps(header), tensors)


def _write_text(path, text, tensors, version=FORMAT_VERSION):
    """A format-3 file built here from the format's description (not by lowbit's writer): a stub under
    ``lowbit``, the header text zlib-compressed and base64-encoded under ``lowbit_z``, the checksum."""
    stub = json.dumps({"format_version": version, "lowbit_version": lowbit.__version__, "encoding": "zlib+base64"})
    body = base64.b64encode(zlib.compress(text.encode())).decode()
    save_file(tensors, str(path), metadata={"lowbit": stub, "lowbit_z": body, DIGEST_KEY: digest(text, tensors)})
    return path


def _args(header, *items):
    """Node arguments in the header's own layout (a plain list, or the older {"__tuple__": [...]})."""
    sample = next(n["args"] for n in header["nodes"] if n["op"] == "call_module")
    return {"__tuple__": list(items)} if isinstance(sample, dict) else list(items)


def _kwargs(header):
    sample = next(n["kwargs"] for n in header["nodes"] if n["op"] == "call_module")
    return {"__dict__": {}} if "__dict__" in sample else {}


def _first(header, op):
    return next(n for n in header["nodes"] if n["op"] == op)


def _insert(header, *nodes):
    """Put ``nodes`` before the output and make the output return the last of them."""
    out = header["nodes"][-1]
    header["nodes"][-1:] = [*nodes, out]
    out["args"] = _args(header, {"__node__": nodes[-1]["name"]})


def _call(header, name, op, target, *args):
    return {"name": name, "op": op, "target": target, "args": _args(header, *args), "kwargs": _kwargs(header)}


def _x(header):
    return {"__node__": _first(header, "placeholder")["name"]}


# each case: a function that damages a deep copy of the header (and may return new tensors)
def _placeholder_default(h, t):  # fx turned a placeholder target "x=<expr>" into a default argument
    _first(h, "placeholder")["target"] = f"x={PAYLOAD}"


def _placeholder_name(h, t):
    ph = _first(h, "placeholder")
    old = ph["name"]
    ph["name"] = f"x=({PAYLOAD})"
    text = json.dumps(h["nodes"]).replace(json.dumps({"__node__": old}), json.dumps({"__node__": ph["name"]}))
    h["nodes"] = json.loads(text)


def _method_quotes(h, t):  # breaks out of getattr(x, "...") in generated code
    _insert(h, _call(h, "m1", "call_method", f'relu"); {NODOT}; ("', _x(h)))


def _attrgetter_chain(h, t):  # tensor -> __class__ ... -> builtins -> eval at the first forward
    _insert(h, _call(h, "g1", "call_function", "operator:attrgetter", "__class__.__repr__.__globals__"),
            _call(h, "g2", "call_function", "operator:call", {"__node__": "g1"}, _x(h)),
            _call(h, "g3", "call_function", "operator:getitem", {"__node__": "g2"}, "__builtins__"),
            _call(h, "g4", "call_function", "operator:getitem", {"__node__": "g3"}, "eval"),
            _call(h, "g5", "call_function", "operator:call", {"__node__": "g4"}, PAYLOAD))


def _builtin_eval(h, t):
    _insert(h, _call(h, "e1", "call_function", "builtins:eval", PAYLOAD))


def _getattr_dunder(h, t):
    _insert(h, _call(h, "a1", "call_function", "builtins:getattr", _x(h), "__class__"))


def _os_system(h, t):
    _insert(h, _call(h, "o1", "call_function", "os:system", f"touch {MARKER}"))


def _torch_load(h, t):
    _insert(h, _call(h, "l1", "call_function", "torch:load", "x.pt"))


def _dunder_node(h, t):
    _insert(h, _call(h, "__init__", "call_method", "relu", _x(h)))


def _keyword_node(h, t):
    _insert(h, _call(h, "import", "call_method", "relu", _x(h)))


def _builtin_node(h, t):
    _insert(h, _call(h, "eval", "call_method", "relu", _x(h)))


def _newline_node(h, t):
    _insert(h, _call(h, f"a\n{PAYLOAD}\n", "call_method", "relu", _x(h)))


def _long_name(h, t):
    _insert(h, _call(h, "a" * 100_000, "call_method", "relu", _x(h)))


def _deep_nesting(h, t):
    deep: object = 1
    for _ in range(200):
        deep = [deep]
    _insert(h, _call(h, "d1", "call_function", "torch:flatten", _x(h), deep))


def _very_deep_json(h, t):  # deeper than Python's JSON recursion limit
    h["meta"]["x"] = "DEEP"


def _cycle(h, t):
    n = _call(h, "c1", "call_method", "relu", {"__node__": "c2"})
    m = _call(h, "c2", "call_method", "relu", {"__node__": "c1"})
    _insert(h, n, m)


def _self_reference(h, t):
    _insert(h, _call(h, "s1", "call_method", "relu", {"__node__": "s1"}))


def _unknown_op(h, t):
    _insert(h, _call(h, "u1", "call_eval", PAYLOAD, _x(h)))


def _missing_module(h, t):
    node = next(n for n in h["nodes"] if n["op"] == "call_module")
    node["target"] = "no_such_module"


def _missing_tensor(h, t):
    key = next(k for k in t if k.endswith("weight_q"))
    del t[key]


def _missing_constant(h, t):
    _insert(h, {"name": "k1", "op": "get_attr", "target": "missing_constant", "args": _args(h),
                "kwargs": _kwargs(h)})


def _dunder_module(h, t):
    path = next(iter(h["modules"]))
    h["modules"]["__class__"] = h["modules"].pop(path)
    for k in [k for k in t if k.startswith(f"{path}::")]:
        t[k.replace(f"{path}::", "__class__::", 1)] = t.pop(k)
    for n in h["nodes"]:
        if n["target"] == path:
            n["target"] = "__class__"


def _private_lowbit_class(h, t):
    spec = next(s for s in h["modules"].values() if "Linear" in json.dumps(s))
    spec["class" if "class" in spec else "type"] = "_IntWeights"


def _foreign_torch_class(h, t):
    h["modules"][next(iter(h["modules"]))] = {"kind": "torch", "type": "torch", "class": "os.system",
                                               "args": {"command": f"touch {MARKER}"}, "attrs": {}}


def _hostile_ctor_args(h, t):
    h["modules"][next(iter(h["modules"]))] = {"kind": "torch", "type": "torch", "class": "Linear",
                                               "args": {"in_features": PAYLOAD}, "attrs": {"in_features": PAYLOAD}}


def _unknown_marker(h, t):
    _insert(h, _call(h, "k2", "call_function", "torch:flatten", _x(h), {"__class__": "os"}))


def _dtype_injection(h, t):
    _insert(h, _call(h, "k3", "call_method", "to", _x(h), {"__dtype__": "__import__"}))


HOSTILE = [_placeholder_default, _placeholder_name, _method_quotes, _attrgetter_chain, _builtin_eval,
           _getattr_dunder, _os_system, _torch_load, _dunder_node, _keyword_node, _builtin_node, _newline_node,
           _long_name, _deep_nesting, _very_deep_json, _cycle, _self_reference, _unknown_op, _missing_module,
           _missing_tensor, _missing_constant, _dunder_module, _private_lowbit_class, _foreign_torch_class,
           _hostile_ctor_args, _unknown_marker, _dtype_injection]


@pytest.mark.parametrize("damage", HOSTILE, ids=[f.__name__.lstrip("_") for f in HOSTILE])
def test_hostile_header_is_refused_without_side_effects(damage, small, tmp_path, monkeypatch):
    q, _, header, tensors = small
    monkeypatch.chdir(tmp_path)
    h, t = copy.deepcopy(header), dict(tensors)
    damage(h, t)
    path = tmp_path / "hostile.lowbit"
    if damage is _very_deep_json:
        text = json.dumps(h).replace('"DEEP"', "[" * 100_000 + "]" * 100_000)
        _write_text(path, text, t)
    else:
        _write(path, h, t)
    try:
        m = lowbit.load(path)
        m(model_input(m, torch.randn(2, 1, 8, 8)))  # a loader that accepted it must not run it either
    except Exception as e:  # noqa: BLE001 - checked below, after the side effect
        err: Exception | None = e
    else:
        err = None
    assert not (tmp_path / MARKER).exists(), "code from the file ran"
    assert isinstance(err, ModelFileError), repr(err)


def test_hostile_file_through_the_cli(small, tmp_path, monkeypatch, capsys):
    from lowbit.cli import main

    _, _, header, tensors = small
    monkeypatch.chdir(tmp_path)
    h = copy.deepcopy(header)
    _method_quotes(h, tensors)
    path = _write(tmp_path / "h.lowbit", h, dict(tensors))
    assert main(["eval", str(path), "--repeats", "1"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / MARKER).exists()


def _bad_field(key, value):
    def damage(h, t):
        h[key] = value
    damage.__name__ = f"{key}={value!r}"
    return damage


def _bad_meta(key, value):
    def damage(h, t):
        h["meta"][key] = value
    damage.__name__ = f"meta.{key}={value!r}"
    return damage


def _input_field(key, value):
    def damage(h, t):
        h["meta"]["input"] = {"dtype": "uint8", "scale": 0.1, "zero_point": 3, key: value}
    damage.__name__ = f"meta.input.{key}={value!r}"
    return damage


def _attr(name, value):
    def damage(h, t):
        spec = next(s for s in h["modules"].values() if "Quantize" in json.dumps(s))
        spec["attrs"][name] = value
    damage.__name__ = f"Quantize.{name}={value!r}"
    return damage


FIELDS = [_bad_field("format_version", -5), _bad_field("format_version", 0), _bad_field("format_version", "2"),
          _bad_field("format_version", True), _bad_field("format_version", 1.5), _bad_field("lowbit_version", 7),
          _bad_field("modules", []), _bad_field("nodes", {}), _bad_field("extra", 1),
          _bad_meta("method", 5), _bad_meta("float_layers", "conv"), _input_field("scale", -0.1),
          _input_field("scale", 0), _input_field("zero_point", 300), _input_field("dtype", "complex64"),
          _attr("scale", -1.0), _attr("scale", "0.1"), _attr("zero_point", 256), _attr("zero_point", 1.5),
          _attr("zero_point", True), _attr("bogus", 1)]


@pytest.mark.parametrize("damage", FIELDS, ids=[f.__name__ for f in FIELDS])
def test_every_header_field_is_checked(damage, small, tmp_path):
    _, _, header, tensors = small
    h = copy.deepcopy(header)
    damage(h, tensors)
    with pytest.raises(ModelFileError):
        lowbit.load(_write(tmp_path / "f.lowbit", h, dict(tensors)))


def test_wrong_tensor_dtype_or_shape(small, tmp_path):
    _, _, header, tensors = small
    key = next(k for k in tensors if k.endswith("bias_q"))
    for bad in (tensors[key].to(torch.int64), tensors[key][:-1]):
        with pytest.raises(ModelFileError, match="bias_q|bias"):
            lowbit.load(_write(tmp_path / "t.lowbit", header, {**tensors, key: bad}))


def test_every_sampled_bit_flip_is_a_model_file_error(small, tmp_path):
    """300 single-bit flips over header and tensor data: each load fails with ModelFileError (none loads,
    none raises another exception type)."""
    _, path, _, _ = small
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    rng = random.Random(6)
    bits = [rng.randrange(0, 8 * (8 + n)) for _ in range(150)]
    bits += [rng.randrange(8 * (8 + n), 8 * len(data)) for _ in range(150)]
    target = tmp_path / "flip.lowbit"
    loaded, other = [], []
    for b in bits:
        d = bytearray(data)
        d[b // 8] ^= 1 << (b % 8)
        target.write_bytes(bytes(d))
        try:
            lowbit.load(target)
            loaded.append(b)
        except ModelFileError:
            pass
        except Exception as e:  # noqa: BLE001 - the test is that nothing but ModelFileError escapes
            other.append((b, type(e).__name__))
    assert not loaded, f"{len(loaded)} flipped files loaded silently (bits {loaded[:5]})"
    assert not other, f"other exceptions: {other[:5]}"


def test_format_3_layout_compressed_header(small, tmp_path):
    """The file's metadata, read without lowbit: a stub, the header compressed, the checksum; the header
    is several times smaller than its JSON text."""
    _, path, header, _ = small
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert set(meta) == {"lowbit", "lowbit_z", DIGEST_KEY}
    stub = json.loads(meta["lowbit"])
    assert stub == {"format_version": 3, "lowbit_version": lowbit.__version__, "encoding": "zlib+base64"}
    text = zlib.decompress(base64.b64decode(meta["lowbit_z"])).decode()
    assert json.loads(text) == header and header["format_version"] == 3
    assert len(meta["lowbit_z"]) * 2 < len(text)  # 2.9x on this 5-module model, 7x on ResNet-20


def test_info_prints_the_header(small, capsys):
    from lowbit.cli import main

    _, path, header, _ = small
    assert main(["info", str(path), "--header"]) == 0
    assert json.loads(capsys.readouterr().out) == header
    assert main(["info", "--header"]) == 2 and "give the FILE" in capsys.readouterr().err


def test_format_2_files_still_load(small, tmp_path):
    """A file written before the header was compressed (format 2: the JSON header under ``lowbit``)."""
    q, _, header, tensors = small
    text = json.dumps({**header, "format_version": 2})
    path = tmp_path / "v2.lowbit"
    save_file(tensors, str(path), metadata={"lowbit": text, DIGEST_KEY: digest(text, tensors)})
    x = model_input(q, torch.randn(3, 1, 8, 8))
    with torch.no_grad():
        assert torch.equal(lowbit.load(path)(x), q(x))
    save_file(tensors, str(path), metadata={"lowbit": text, "lowbit_z": "", DIGEST_KEY: digest(text, tensors)})
    with pytest.raises(ModelFileError, match="unexpected metadata key 'lowbit_z'"):
        lowbit.load(path)


def _non_canonical(text):
    """base64 of the compressed text with the unused low bits of its last character changed (it decodes to
    the same bytes), or None when no compression level leaves padding bits."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    for level in range(1, 10):
        enc = base64.b64encode(zlib.compress(text.encode(), level)).decode()
        if enc.endswith("="):
            core = enc.rstrip("=")
            return core[:-1] + alphabet[alphabet.index(core[-1]) ^ 1] + enc[len(core):]
    return None


def _packed_cases(text):
    good = zlib.compress(text.encode())
    stub = {"format_version": 3, "lowbit_version": lowbit.__version__, "encoding": "zlib+base64"}
    b64 = base64.b64encode
    return {  # name: (stub, lowbit_z or None, the error)
        "not base64": (stub, "@@@@" + b64(good).decode(), "cannot decompress"),
        "not zlib": (stub, b64(b"plain text, not zlib").decode(), "cannot decompress"),
        "truncated": (stub, b64(good[: len(good) // 2]).decode(), "truncated"),
        "trailing bytes": (stub, b64(good + b"xx").decode(), "trailing"),
        "non-canonical base64": (stub, _non_canonical(text), "not canonical"),
        "other encoding": ({**stub, "encoding": "gzip"}, b64(good).decode(), "expected"),
        "extra stub key": ({**stub, "modules": {}}, b64(good).decode(), "expected"),
        "no body": (stub, None, "expected"),
        "version inside differs": ({**stub}, b64(zlib.compress(text.replace('"format_version": 3',
                                                                         '"format_version": 2').encode())).decode(),
                                   "format_version 2 inside"),
        "lowbit version differs": ({**stub, "lowbit_version": "9.9"}, b64(good).decode(), "lowbit_version"),
    }


@pytest.mark.parametrize("case", list(_packed_cases("")))
def test_corrupt_compressed_header(case, small, tmp_path):
    _, _, header, tensors = small
    text = json.dumps(header)
    stub, body, err = _packed_cases(text)[case]
    if case == "non-canonical base64" and body is None:
        pytest.skip("no compression level of this header leaves base64 padding bits")
    meta = {"lowbit": json.dumps(stub), DIGEST_KEY: digest(text, tensors)}
    if body is not None:
        meta["lowbit_z"] = body
    path = tmp_path / "c.lowbit"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ModelFileError, match=err):
        lowbit.load(path)


def test_compressed_header_bomb_is_bounded(small, tmp_path, monkeypatch):
    """Decompression stops at MAX_HEADER bytes: a header that expands past it is refused, not inflated."""
    from lowbit.modelfile import container

    _, _, header, tensors = small
    monkeypatch.setattr(container, "MAX_HEADER", 1 << 16)
    text = json.dumps({**header, "pad": " " * (1 << 20)})  # 1 MiB of spaces compresses to ~1 kB
    path = _write_text(tmp_path / "bomb.lowbit", text, tensors)
    assert path.stat().st_size < (1 << 16)
    with pytest.raises(ModelFileError, match="expands past"):
        lowbit.load(path)


def test_checksum_names_the_problem_and_can_be_skipped(small, tmp_path):
    q, path, _, _ = small
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # last byte of tensor data
    bad = tmp_path / "bad.lowbit"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="SHA-256 checksum mismatch"):
        lowbit.load(bad)
    lowbit.load(bad, verify=False)  # fields are still checked, the checksum is not


def test_loaded_model_runs_without_fx_and_saves_again(small, tmp_path):
    q, path, _, _ = small
    r = lowbit.load(path)
    assert not isinstance(r, fx.GraphModule) and isinstance(r, nn.Module)
    x = model_input(q, torch.randn(4, 1, 8, 8))
    r2 = lowbit.load(lowbit.save(r, tmp_path / "again.lowbit"))
    with torch.no_grad():
        assert torch.equal(q(x), r(x)) and torch.equal(r(x), r2(x))
    assert r2.lowbit_meta == r.lowbit_meta and r.lowbit_meta["method"] == "static"
    with safe_open(str(path), framework="pt") as a, safe_open(str(tmp_path / "again.lowbit"), framework="pt") as b:
        assert a.metadata() == b.metadata()  # same header, same checksum: the same tensors
    assert read(path)[0] == read(tmp_path / "again.lowbit")[0]


class _FloatLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(6, 16)
        self.ln = nn.LayerNorm(16)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 1,
                                         enable_nested_tensor=False)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        h = self.ln(self.emb(x))
        a, _ = self.mha(h, h, h, need_weights=False)
        h, _ = self.lstm(h + a)
        return self.fc(self.enc(h).mean(dim=1))


@pytest.mark.parametrize("method", ["dynamic", "static", "float16"])
def test_float_torch_modules_are_saved(method, tmp_path):
    """LayerNorm, MultiheadAttention, LSTM and TransformerEncoder left float are saved (type from the
    allow-list, constructor arguments, parameters as tensors) and load to the same outputs. The graph-free
    methods quantize the attention and recurrent layers too, and the file is their captured graph."""
    torch.manual_seed(1)
    m = _FloatLayers().eval()
    x = torch.randn(8, 5, 6)
    q = lowbit.quantize(m, method, calib=x, **({"progress": False} if method == "static" else {}))
    r = lowbit.load(lowbit.save(q, tmp_path / "f.lowbit"))
    with torch.no_grad():
        assert torch.equal(q(x), r(x))
    kinds = {type(mod) for mod in r.modules()}
    if method == "static":
        assert {nn.LayerNorm, nn.MultiheadAttention, nn.LSTM, nn.TransformerEncoder} <= kinds
    else:
        assert not kinds & {nn.MultiheadAttention, nn.LSTM, nn.TransformerEncoder, nn.Linear}
    _refused_outside_allow_list(tmp_path)


def _refused_outside_allow_list(tmp_path):
    """A float module outside the allow-list is refused when saving, naming it, and writes nothing."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bil = nn.Bilinear(4, 4, 3)

        def forward(self, x):
            return self.bil(x, x)

    q = lowbit.quantize(Net().eval(), "static", calib=torch.randn(4, 4), allow_float=True, progress=False)
    with pytest.raises(ModelFileError, match="'bil'.*Bilinear"):
        lowbit.save(q, tmp_path / "b.lowbit")
    assert not (tmp_path / "b.lowbit").exists()
