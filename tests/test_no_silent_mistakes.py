"""Issue 6, "no silent mistakes": options parsed by type, arguments checked before any work, outputs
checked first, the user's checkpoint never overwritten, multi-input models, all-zero layers, NaN in
.pt2 archives, package.module:function from the current folder, LOWBIT_ISA typos."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import lowbit
from lowbit import kernels
from lowbit.cli import main
from lowbit.evaluate import FloatIO, model_input
from lowbit.modelfile.container import read


@pytest.fixture()
def ckpt(digits_cnn, tmp_path, monkeypatch):
    """The trained digits CNN as the user's checkpoint (trained for 1 epoch, per its meta: not the
    default); cwd moved to a temp folder."""
    from lowbit.train import save_checkpoint

    model, _, meta = digits_cnn
    path = tmp_path / "mine.pt"
    save_checkpoint(path, model, {**meta, "epochs": 1})
    monkeypatch.chdir(tmp_path)
    return path


@pytest.fixture()
def no_work(monkeypatch):
    """Training, quantizing and measuring all fail the test if they start."""
    import importlib

    def started(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    train, api, compare = (importlib.import_module(f"lowbit.{m}") for m in ("train", "methods.api", "compare"))
    for mod, name in ((train, "train"), (train, "train_or_load"), (api, "quantize"), (compare, "compare"),
                      (lowbit, "quantize")):
        monkeypatch.setattr(mod, name, started, raising=False)


def _config(path):
    return read(path)[0]["meta"]["config"]


def test_options_are_parsed_by_field_type(ckpt, tmp_path, capsys):
    out = tmp_path / "q.lowbit"
    argv = ["quantize", "small_cnn", "--checkpoint", str(ckpt), "--method", "static", "--out", str(out)]
    assert main([*argv, "--option", "per_channel=False", "--option", "calib_samples=64"]) == 0
    cfg = _config(out)
    assert cfg["weight_granularity"] == "per_tensor" and cfg["calib_samples"] == 64  # per_channel: its shorthand
    argv[5] = "dynamic"
    assert main([*argv, "--option", "per_channel=YES"]) == 0 and _config(out)["weight_granularity"] == "per_channel"


@pytest.mark.parametrize("option,needle", [
    ("per_channel=maybe", "per_channel='maybe'.*true/false"),
    ("statc.per_channel=false", "unknown method 'statc'.*static"),
    ("calib_samples=abc", "calib_samples='abc'.*integer"),
    ("calib_samples=0", "calib_samples.*>= 1"),
    ("bogus=1", "unknown option.*bogus.*known: .*calib_samples"),
    ("activation_observer=klx", "activation_observer.*unknown observer"),
    ("dynamic.per_channel=false", "runs static, not dynamic"),
])
def test_bad_options_are_errors_before_any_work(option, needle, ckpt, tmp_path, capsys, no_work):
    out = tmp_path / "q.lowbit"
    rc = main(["quantize", "small_cnn", "--checkpoint", str(ckpt), "--method", "static", "--option", option,
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert pytest.importorskip("re").search(needle, err), err
    assert not out.exists()


def test_python_options_are_type_checked(digits_cnn):
    model, splits, _ = digits_cnn
    with pytest.raises(ValueError, match="per_channel='no'.*true/false"):
        lowbit.quantize(model, "dynamic", calib=splits.calib, per_channel="no")
    with pytest.raises(ValueError, match="calib_samples"):
        lowbit.quantize(model, "static", calib=splits.calib, config={"calib_samples": "100"})


@pytest.mark.parametrize("argv", [
    ["compare", "small_cnn", "--threads", "0"],
    ["compare", "small_cnn", "--threads", "-1"],
    ["compare", "small_cnn", "--batch-size", "0"],
    ["compare", "small_cnn", "--batch-size", "-1"],
    ["compare", "small_cnn", "--repeats", "0"],
    ["compare", "small_cnn", "--lambdas", ""],
    ["demo", "--lambdas", ""],
    ["demo", "--threads", "0"],
    ["eval", "m.lowbit", "--threads", "0"],
    ["eval", "m.lowbit", "--batch-size", "0"],
    ["bench", "kernels", "--threads", "0"],
    ["train", "small_cnn", "--batch-size", "0"],
    ["train", "small_cnn", "--epochs", "-1"],
    ["compare", "small_cnn", "--methods", ""],
    ["compare", "small_cnn", "--epochs", "2"],
])
def test_bad_arguments_fail_before_any_work(argv, ckpt, capsys, no_work):
    if argv[0] == "compare":
        argv = [*argv, "--checkpoint", str(ckpt)]
    if argv[0] == "eval":  # a model that would run: only the argument is wrong
        from lowbit.graph import prepare

        lowbit.save(prepare(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), torch.zeros(1, 1, 8, 8)).gm, argv[1])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err


def test_keep_float_pattern_that_matches_nothing_warns(digits_cnn, capsys, ckpt, tmp_path):
    model, splits, _ = digits_cnn
    with pytest.warns(UserWarning, match="keep_float pattern 'clasifier.\\*' matches no layer"):
        lowbit.quantize(model, "dynamic", calib=splits.calib, keep_float=("clasifier.*",))
    with pytest.warns(UserWarning, match="overrides pattern 'fx\\*'"):
        lowbit.quantize(model, "dynamic", calib=splits.calib, overrides={"fx*": {"per_channel": False}})


def test_lowbit_isa_typo_is_an_error(monkeypatch, capsys):
    monkeypatch.setenv("LOWBIT_ISA", "bogus")
    monkeypatch.setattr(kernels, "_env_checked", False)
    assert main(["info"]) == 2
    assert "LOWBIT_ISA='bogus'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="LOWBIT_ISA"):
        w = kernels.pack_int8(torch.ones(2, 4, dtype=torch.int8))
        kernels.int8_linear(torch.zeros(1, 4, dtype=torch.uint8), 0, w)
    monkeypatch.setenv("LOWBIT_ISA", "avx2")
    kernels.check_environment()
    monkeypatch.setenv("LOWBIT_KERNELS", "nativ")
    with pytest.raises(ValueError, match="LOWBIT_KERNELS"):
        kernels.check_environment()


def test_compare_checks_outputs_before_measuring(ckpt, tmp_path, capsys, no_work):
    folder = tmp_path / "outdir"
    folder.mkdir()
    assert main(["compare", "small_cnn", "--checkpoint", str(ckpt), "--out", str(folder)]) == 2
    assert "is a folder" in capsys.readouterr().err
    blocker = tmp_path / "rep"
    blocker.write_text("not a folder")
    assert main(["compare", "small_cnn", "--checkpoint", str(ckpt), "--report-dir", str(blocker),
                 "--out", str(tmp_path / "c.lowbit")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["quantize", "small_cnn", "--checkpoint", str(ckpt), "--method", "dynamic",
                 "--out", str(ckpt)]) == 2
    assert "input" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.pt", "outdir", "rep"]


def test_quantize_writes_no_file_for_a_model_that_cannot_run(ckpt, tmp_path, capsys, monkeypatch):
    from lowbit.nn import QConv

    def broken(self, x):
        raise RuntimeError("kernel failure")

    monkeypatch.setattr(QConv, "forward", broken)
    monkeypatch.setenv("LOWBIT_PLAN", "0")  # the layers run node by node (a plan would not call them)
    out = tmp_path / "q.lowbit"
    assert main(["quantize", "small_cnn", "--checkpoint", str(ckpt), "--method", "static", "--out", str(out)]) == 2
    assert "kernel failure" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))


def test_named_checkpoint_is_used_as_is_from_the_cli(ckpt, tmp_path, capsys, monkeypatch):
    import lowbit.train

    before = ckpt.read_bytes()

    def no_training(*a, **k):
        raise AssertionError("retrained over the user's checkpoint")

    monkeypatch.setattr(lowbit.train, "train", no_training)
    out = tmp_path / "q.lowbit"
    assert main(["quantize", "small_cnn", "--checkpoint", str(ckpt), "--method", "dynamic", "--out", str(out)]) == 0
    assert main(["quantize", "small_cnn", "--checkpoint", str(ckpt), "--epochs", "3", "--method", "dynamic",
                 "--out", str(out)]) == 2
    assert "used as is" in capsys.readouterr().err
    assert ckpt.read_bytes() == before


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(8, 16), nn.Linear(4, 16), nn.Linear(16, 3)

    def forward(self, x, y):
        return self.fc(torch.relu(self.a(x)) + self.b(y))


@pytest.mark.parametrize("method", ["static", "full_integer"])
def test_multi_input_models(method, tmp_path):
    torch.manual_seed(2)
    m = _TwoInputs().eval()
    x, y = torch.randn(64, 8), torch.randn(64, 4)
    calib = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    q = lowbit.quantize(m, method, calib=calib, example_input=(x[:1], y[:1]), progress=False)
    with torch.no_grad():
        ref, out = m(x, y), FloatIO(q)(x, y)
    assert ((out - ref).norm() / ref.norm()).item() < 0.05
    if method == "full_integer":
        assert [i["dtype"] for i in q.lowbit_meta["input"]] == ["uint8", "uint8"]
    labelled = torch.utils.data.TensorDataset(x, y, torch.zeros(64, dtype=torch.long))
    q2 = lowbit.quantize(m, method, calib=labelled, example_input=(x[:1], y[:1]), progress=False)
    r = lowbit.load(lowbit.save(q2, tmp_path / "two.lowbit"))
    xs = model_input(q2, (x, y))
    with torch.no_grad():
        assert torch.equal(q2(*xs), r(*xs)) and torch.equal(q(*xs), q2(*xs))


def test_all_zero_layer_and_calibration():
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        m[2].weight.zero_()
        m[2].bias.zero_()
    x = torch.randn(32, 8)
    q = lowbit.quantize(m, "static", calib=x, progress=False)
    layer = q.get_submodule("2")
    assert torch.equal(layer.weight_scale, torch.ones(4)) and not layer.weight_q.any()
    with torch.no_grad():
        assert torch.allclose(FloatIO(q)(x), m(x), atol=0.02)
    z = lowbit.quantize(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)).eval(), "full_integer",
                        calib=torch.zeros(16, 8), progress=False)
    assert z.lowbit_meta["input"]["scale"] == 1.0


def test_layer_named_error_for_an_unrepresentable_layer():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        m[2].weight.fill_(1e-30)
    with pytest.raises(ValueError, match="layer '2'.*requantization multiplier"):
        lowbit.quantize(m, "static", calib=torch.randn(16, 8), progress=False)


def test_nan_in_pt2_is_named(tmp_path):
    from lowbit.graph import ModelLoadError, load_model

    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with torch.no_grad():
        m[2].weight[0, 0] = float("nan")
    path = tmp_path / "nan.pt2"
    torch.export.save(torch.export.export(m, (torch.randn(1, 4),)), str(path))
    with pytest.raises(ModelLoadError, match="'2.weight' contains NaN"):
        load_model(str(path))


def test_factory_found_in_the_current_folder(tmp_path, monkeypatch):
    """``pkg.mod:fn`` works from the installed script, whose sys.path lacks the current folder."""
    from lowbit.graph import load_model

    pkg = tmp_path / "i6_user_nets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text("from torch import nn\n\ndef make():\n    return nn.Linear(3, 2)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    try:
        assert isinstance(load_model("i6_user_nets.nets:make"), nn.Linear)
    finally:
        for name in [n for n in sys.modules if n.startswith("i6_user_nets")]:
            del sys.modules[name]
