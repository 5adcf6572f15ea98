"""Reference models (shapes, fx tracing, sizes) and training / checkpoints on digits (offline, fast)."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
import torch.fx

from lowbit import models, train
from lowbit.data import load_dataset

SHAPES = {"digits": (1, 8), "mnist": (1, 28), "cifar": (3, 32)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: the suite runs as 2 xdist workers on 2 cores, and oversubscribed OpenMP
    threads make tiny convolutions many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


# ---------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("name", models.available_models())
def test_model_builds_forwards_and_traces(name, shape):
    c, s = SHAPES[shape]
    torch.manual_seed(0)
    m = models.build(name, c, 10, s).eval()
    x = torch.randn(3, c, s, s)
    out = m(x)
    assert out.shape == (3, 10)
    gm = torch.fx.symbolic_trace(m).eval()
    assert torch.equal(gm(x), out)
    assert m.lowbit_arch == {"model": name, "in_channels": c, "num_classes": 10, "input_size": s}
    allowed = (
        torch.nn.Conv2d, torch.nn.Linear, torch.nn.BatchNorm2d, torch.nn.ReLU, torch.nn.ReLU6, torch.nn.MaxPool2d,
        torch.nn.AvgPool2d, torch.nn.AdaptiveAvgPool2d, torch.nn.Flatten, torch.nn.Identity,
    )  # fmt: skip
    for node in gm.graph.nodes:
        if node.op == "call_module":
            assert isinstance(gm.get_submodule(node.target), allowed), node.target


@pytest.mark.parametrize("name", models.available_models())
def test_model_class_count_and_determinism(name):
    torch.manual_seed(1)
    a = models.build(name, 3, 100, 32)
    torch.manual_seed(1)
    b = models.build(name, 3, 100, 32)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 100)


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_small_cnn_size(shape):
    c, s = SHAPES[shape]
    n = sum(p.numel() for p in models.build("small_cnn", c, 10, s).parameters())
    assert 200_000 <= n <= 450_000, n


def test_tiny_cnn16_is_under_20k_parameters():
    """The binary study's tiny net: at most 20 K parameters on MNIST, 16 channels in every conv."""
    m = models.build("tiny_cnn16", 1, 10, 28)
    assert 10_000 <= sum(p.numel() for p in m.parameters()) <= 20_000
    assert [c.out_channels for c in m.modules() if isinstance(c, torch.nn.Conv2d)] == [16, 16, 16, 16]


def test_mobilenet_is_depthwise_separable():
    m = models.build("mobilenet", 3, 10, 32)
    dw = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d) and mod.groups > 1]
    assert dw and all(mod.groups == mod.in_channels == mod.out_channels for mod in dw)
    assert any(isinstance(mod, torch.nn.ReLU6) for mod in m.modules())


def test_resnet20_depth_and_shortcuts():
    m = models.build("resnet20", 3, 10, 32)
    convs = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Conv2d) and "shortcut" not in n]
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    assert len(convs) + len(linears) == 20
    shortcuts = [mod for n, mod in m.named_modules() if n.endswith("shortcut.0")]
    assert len(shortcuts) == 2 and all(s.kernel_size == (1, 1) and s.stride == (2, 2) for s in shortcuts)


def test_unknown_model_lists_names():
    with pytest.raises(ValueError) as e:
        models.build("vgg16", 3, 10, 32)
    for name in ("small_cnn", "resnet20", "mobilenet"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match="input_size"):
        models.build("small_cnn", 3, 10, 0)


# -------------------------------------------------------------------------------------- training


def test_short_training_on_digits_beats_chance(digits):
    torch.manual_seed(0)
    m = models.build("small_cnn", 1, 10, 8)
    before = train.accuracy(m, digits.test)
    hist = train.train(m, digits, epochs=2, batch_size=32, seed=0, progress=False)
    assert len(hist["loss"]) == len(hist["test_acc"]) == 2
    assert hist["loss"][1] < hist["loss"][0]
    assert hist["final_test_acc"] == hist["test_acc"][-1] > 85.0 > before + 30
    assert hist["final_test_acc"] == pytest.approx(train.accuracy(m, digits.test))


def test_training_is_deterministic(digits):
    def run() -> dict:
        torch.manual_seed(0)
        m = models.build("small_cnn", 1, 10, 8)
        h = train.train(m, digits, epochs=1, batch_size=64, seed=7, progress=False)
        return {"loss": h["loss"], "state": m.state_dict()}

    a, b = run(), run()
    assert a["loss"] == b["loss"]
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])


def test_train_threads_restored(digits):
    torch.set_num_threads(1)
    m = models.build("small_cnn", 1, 10, 8)
    hist = train.train(m, digits, epochs=0, progress=False, threads=2)
    assert hist["threads"] == 2 and torch.get_num_threads() == 1
    assert hist["loss"] == [] and 0.0 <= hist["final_test_acc"] <= 100.0


def test_accuracy_restores_mode_and_counts(digits):
    m = models.build("small_cnn", 1, 10, 8).train()
    acc = train.accuracy(m, digits.test, batch_size=7)
    assert m.training and 0.0 <= acc <= 100.0
    x, y = digits.test.tensors

    class Oracle(torch.nn.Module):  # perfect "model": one-hot of the true label, looked up by row
        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            idx = (inp.reshape(len(inp), 1, -1) - x.reshape(1, len(x), -1)).abs().sum(-1).argmin(1)
            return torch.nn.functional.one_hot(y[idx], 10).float()

    assert train.accuracy(Oracle(), digits.test) == 100.0


# ----------------------------------------------------------------------------------- checkpoints


def _meta(**extra) -> dict:
    return {"dataset": "digits", "accuracy": 12.5, "epochs": 0, "seed": 0, **extra}


def test_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(3)
    m = models.build("resnet20", 1, 10, 8)
    m.train()
    m(torch.randn(8, 1, 8, 8))  # move BN running stats off their defaults
    m.eval()
    path = train.save_checkpoint(tmp_path / "sub" / "r.pt", m, _meta())
    loaded, meta = train.load_checkpoint(path)
    assert not loaded.training
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(loaded(x), m(x))
    assert meta["model"] == "resnet20" and meta["input_size"] == 8 and meta["accuracy"] == 12.5
    from lowbit import __version__

    assert meta["lowbit_version"] == __version__


def test_atomic_save_leaves_no_temp_files(tmp_path, monkeypatch):
    m = models.build("small_cnn", 1, 10, 8)
    path = tmp_path / "c.pt"
    train.save_checkpoint(path, m, _meta())
    train.save_checkpoint(path, m, _meta(accuracy=50.0))  # overwrite
    assert os.listdir(tmp_path) == ["c.pt"]
    good = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        train.save_checkpoint(path, m, _meta())
    assert os.listdir(tmp_path) == ["c.pt"] and path.read_bytes() == good  # old file intact
    monkeypatch.undo()
    with pytest.raises(TypeError, match="JSON"):
        train.save_checkpoint(tmp_path / "d.pt", m, _meta(bad=object()))
    assert os.listdir(tmp_path) == ["c.pt"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "not_lowbit", "wrong_arch"])
def test_corrupt_checkpoint_error(tmp_path, damage):
    path = tmp_path / "bad.pt"
    m = models.build("small_cnn", 1, 10, 8)
    train.save_checkpoint(path, m, _meta())
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(4096))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "not_lowbit":
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        train.save_checkpoint(path, m, _meta(model="resnet20"))
    with pytest.raises(ValueError, match="bad.pt"):
        train.load_checkpoint(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        train.load_checkpoint(tmp_path / "nope.pt")


def test_default_checkpoint_path():
    assert str(train.default_checkpoint_path("small_cnn", "digits")) == os.path.join("runs", "small_cnn-digits.pt")
    assert train.default_checkpoint_path("resnet20", "mnist", root="x").name == "resnet20-mnist.pt"


def test_train_or_load_caches(tmp_path, monkeypatch):
    """lowbit's own cache (no checkpoint named): reused when it matches, retrained when it does not."""
    monkeypatch.chdir(tmp_path)
    ck = train.default_checkpoint_path("small_cnn", "digits")
    m1, splits, meta1 = train.train_or_load("small_cnn", "digits", epochs=1, progress=False)
    assert ck.is_file() and meta1["epochs"] == 1 and meta1["dataset"] == "digits"
    assert meta1["accuracy"] == pytest.approx(train.accuracy(m1, splits.test))

    def no_training(*a, **k):
        raise AssertionError("should have loaded the checkpoint")

    monkeypatch.setattr(train, "train", no_training)
    m2, _, meta2 = train.train_or_load("small_cnn", "digits", epochs=1, progress=False)
    x = splits.test.tensors[0][:10]
    assert meta2 == meta1 and torch.equal(m1(x), m2(x))
    with pytest.raises(AssertionError, match="should have loaded"):  # different seed: retrains
        train.train_or_load("small_cnn", "digits", epochs=1, seed=1, progress=False)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    ck.write_bytes(b"corrupt")  # unusable cache: retrained with a warning
    with pytest.warns(UserWarning, match="retraining"):
        _, _, meta3 = train.train_or_load("small_cnn", "digits", epochs=1, progress=False)
    assert meta3["accuracy"] == meta1["accuracy"]  # same seed, same result


def test_named_checkpoint_is_used_as_is_and_never_overwritten(tmp_path, monkeypatch):
    """Issue 6: a checkpoint the user names is used as is (its epochs differ from the default here) or
    refused with a clear error; its bytes never change. A named path that does not exist is trained."""
    ck = tmp_path / "mine.pt"
    _, _, meta = train.train_or_load("small_cnn", "digits", epochs=1, checkpoint=ck, progress=False)
    assert meta["epochs"] == 1 != train.default_hparams("small_cnn", "digits")["epochs"]
    before = ck.read_bytes()

    def no_training(*a, **k):
        raise AssertionError("retrained the user's checkpoint")

    monkeypatch.setattr(train, "train", no_training)
    _, _, used = train.train_or_load("small_cnn", "digits", checkpoint=ck, progress=False)  # default epochs
    assert used == meta
    for kw, needle in (({"epochs": 3}, r"epochs 1 \(asked 3\)"), ({"seed": 1}, r"seed 0 \(asked 1\)"),
                       ({"lr": 0.5}, "lr")):
        with pytest.raises(ValueError, match=needle):
            train.train_or_load("small_cnn", "digits", checkpoint=ck, progress=False, **kw)
    with pytest.raises(ValueError, match="model 'small_cnn'"):
        train.train_or_load("resnet20", "digits", checkpoint=ck, progress=False)
    assert ck.read_bytes() == before
    ck.write_bytes(b"corrupt")  # a damaged named checkpoint is an error, not retrained over
    with pytest.raises(ValueError, match="mine.pt"):
        train.train_or_load("small_cnn", "digits", checkpoint=ck, progress=False)
    assert ck.read_bytes() == b"corrupt"


def test_default_hparams():
    hp = train.default_hparams("small_cnn", "digits")
    assert 15 <= hp["epochs"] <= 30 and hp["lr"] > 0 and hp["batch_size"] > 0 and hp["threads"] == 1
    assert train.default_hparams("resnet20", "cifar10")["threads"] is None


# -------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    train.add_train_arguments(p)
    return p


def test_cli_defaults():
    a = _parser().parse_args(["small_cnn"])
    assert (a.model, a.data, a.data_dir, a.epochs, a.seed, a.out, a.lr, a.batch_size, a.download) == (
        "small_cnn", "digits", None, None, 0, None, None, None, False,
    )  # fmt: skip


def test_cli_train(tmp_path, capsys):
    out = tmp_path / "cli.pt"
    args = _parser().parse_args(["small_cnn", "--epochs", "1", "--out", str(out), "--batch-size", "64"])
    args.progress = False
    assert train.cli_train(args) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and str(out) in printed
    model, meta = train.load_checkpoint(out)
    assert meta["epochs"] == 1 and meta["batch_size"] == 64 and meta["dataset"] == "digits"


def test_cli_train_missing_data(tmp_path, capsys, monkeypatch):
    from lowbit import data

    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    monkeypatch.setattr(data, "_default_roots", lambda: [tmp_path / "none"])
    args = _parser().parse_args(["small_cnn", "--data", "mnist", "--data-dir", str(tmp_path)])
    assert train.cli_train(args) == 2
    assert "--download" in capsys.readouterr().err
