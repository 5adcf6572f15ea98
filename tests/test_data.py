"""Datasets: digits splits, IDX/CIFAR parsing, file resolution, errors. Never touches the network."""

from __future__ import annotations

import gzip
import pickle
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit import data
from lowbit.data import load_dataset, make_loader, read_idx

REAL_MNIST = Path("/work/shared/data/mnist")
_REAL_DEFAULT_ROOTS = data._default_roots


@pytest.fixture(autouse=True)
def _isolated_lookup(monkeypatch, tmp_path_factory):
    """No LOWBIT_DATA from the environment and no fallback roots unless a test asks for them."""
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    nowhere = tmp_path_factory.mktemp("nowhere")
    monkeypatch.setattr(data, "_default_roots", lambda: [nowhere / "shared" / "data"])


def _rows(t: torch.Tensor) -> list[bytes]:
    return [r.numpy().tobytes() for r in t.reshape(len(t), -1)]


# ---------------------------------------------------------------------------------------- digits


def test_digits_split_sizes_and_format():
    s = load_dataset("digits")
    assert (len(s.train), len(s.calib), len(s.test)) == (1077, 180, 540)
    assert s.input_shape == (1, 8, 8) and s.num_classes == 10 and s.name == "digits"
    assert (s.in_channels, s.input_size) == (1, 8)
    for ds in (s.train, s.calib, s.test):
        x, y = ds.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8)
        assert set(y.tolist()) == set(range(10))  # stratified: every class in every split
    x = s.train.tensors[0]
    assert abs(float(x.mean())) < 0.1 and 0.8 < float(x.std()) < 1.2


def test_digits_splits_partition_the_dataset():
    """train + calib + test is exactly the bundled set (as a multiset), so calib and test are disjoint."""
    from sklearn.datasets import load_digits

    s = load_dataset("digits", seed=3)
    full = data.normalize(torch.from_numpy(load_digits().images[:, None].astype(np.float32)), s.mean, s.std, 16.0)
    got = Counter(_rows(s.train.tensors[0]) + _rows(s.calib.tensors[0]) + _rows(s.test.tensors[0]))
    assert got == Counter(_rows(full))
    # and labels stay attached to their images
    lab = {r: int(y) for r, y in zip(_rows(full), load_digits().target, strict=True)}
    for ds in (s.calib, s.test):
        for r, y in zip(_rows(ds.tensors[0]), ds.tensors[1].tolist(), strict=True):
            assert lab[r] == y


def test_digits_deterministic_and_seed_dependent():
    a, b, c = load_dataset("digits", seed=0), load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    for part in ("train", "calib", "test"):
        assert torch.equal(getattr(a, part).tensors[0], getattr(b, part).tensors[0])
        assert torch.equal(getattr(a, part).tensors[1], getattr(b, part).tensors[1])
    assert not torch.equal(a.test.tensors[0], c.test.tensors[0])


def test_digits_calib_size():
    s = load_dataset("digits", calib_size=50)
    assert (len(s.train), len(s.calib), len(s.test)) == (1207, 50, 540)
    with pytest.raises(ValueError, match="calib_size"):
        load_dataset("digits", calib_size=0)


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError) as e:
        load_dataset("imagenet")
    for name in data.KNOWN_DATASETS:
        assert name in str(e.value)


def test_dataset_name_aliases():
    assert load_dataset("Digits").name == "digits"


def test_make_loader_seeded_order():
    ds = torch.utils.data.TensorDataset(torch.arange(100))
    order = lambda seed: torch.cat([b[0] for b in make_loader(ds, 16, shuffle=True, seed=seed)])
    assert torch.equal(order(5), order(5))
    assert not torch.equal(order(5), order(6))
    assert torch.equal(torch.cat([b[0] for b in make_loader(ds, 16, shuffle=False)]), torch.arange(100))


# ------------------------------------------------------------------------------------- IDX files


def _idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    header = struct.pack(">HBB", 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.tobytes()


def _write_tiny_mnist(folder: Path, n_train: int = 20, n_test: int = 10, gz: bool = True, seed: int = 0) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for name, arr in arrays.items():
        raw = _idx_bytes(arr)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return arrays


def test_read_idx_roundtrip_dtypes(tmp_path):
    a = np.arange(24, dtype=">i4").reshape(2, 3, 4)
    (tmp_path / "x.idx").write_bytes(_idx_bytes(a, 0x0C))
    out = read_idx(tmp_path / "x.idx")
    assert out.shape == (2, 3, 4) and np.array_equal(out, a) and out.flags.writeable


def test_tiny_mnist_gz(tmp_path):
    arrays = _write_tiny_mnist(tmp_path)
    s = load_dataset("mnist", data_dir=tmp_path, calib_size=5)
    assert (len(s.train), len(s.calib), len(s.test)) == (20, 5, 10)
    assert s.source == str(tmp_path)
    assert s.input_shape == (1, 28, 28)
    want = (arrays["train-images-idx3-ubyte"].astype(np.float32) / 255 - 0.1307) / 0.3081
    assert np.allclose(s.train.tensors[0][:, 0].numpy(), want, atol=1e-5)
    assert s.train.tensors[1].tolist() == list(np.arange(20) % 10)
    # calibration: a subset of train, never test
    train_rows = set(_rows(s.train.tensors[0]))
    assert all(r in train_rows for r in _rows(s.calib.tensors[0]))
    assert not set(_rows(s.calib.tensors[0])) & set(_rows(s.test.tensors[0]))
    # deterministic in the seed
    again = load_dataset("mnist", data_dir=tmp_path, calib_size=5)
    assert torch.equal(again.calib.tensors[0], s.calib.tensors[0])


def test_tiny_mnist_uncompressed(tmp_path):
    _write_tiny_mnist(tmp_path, n_train=12, gz=False)
    assert len(load_dataset("mnist", data_dir=tmp_path / ".", calib_size=3).train) == 12


@pytest.mark.parametrize("damage", ["truncated_gz", "bad_magic", "short_payload", "not_gzip_garbage"])
def test_corrupt_idx_raises_naming_file(tmp_path, damage):
    _write_tiny_mnist(tmp_path)
    victim = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(victim.read_bytes())
    if damage == "truncated_gz":
        victim.write_bytes(victim.read_bytes()[:-40])
    elif damage == "bad_magic":
        victim.write_bytes(gzip.compress(b"\x00\x00\x07\x03" + raw[4:]))
    elif damage == "short_payload":
        victim.write_bytes(gzip.compress(raw[:-100]))
    else:
        victim.write_bytes(b"\x1f\x8b this is not gzip at all")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", data_dir=tmp_path)


def test_label_count_mismatch(tmp_path):
    _write_tiny_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros(3, np.uint8))))
    with pytest.raises(ValueError, match="t10k-labels"):
        load_dataset("mnist", data_dir=tmp_path)


def test_lowbit_data_env_resolution(tmp_path, monkeypatch):
    parent = tmp_path / "root"
    _write_tiny_mnist(parent / "mnist", n_train=14)
    monkeypatch.setenv("LOWBIT_DATA", str(parent))  # a parent holding mnist/
    assert len(load_dataset("mnist", calib_size=2).train) == 14
    monkeypatch.setenv("LOWBIT_DATA", str(parent / "mnist"))  # the folder with the files
    assert len(load_dataset("mnist", calib_size=2).train) == 14
    # data_dir comes first
    _write_tiny_mnist(tmp_path / "explicit", n_train=16)
    assert len(load_dataset("mnist", data_dir=tmp_path / "explicit", calib_size=2).train) == 16
    # an unusable data_dir falls through to LOWBIT_DATA, with a warning saying so
    with pytest.warns(UserWarning, match="no usable files"):
        s = load_dataset("mnist", data_dir=tmp_path / "empty", calib_size=2)
    assert len(s.train) == 14 and s.source == str(parent / "mnist")


def test_shared_data_fallback(tmp_path, monkeypatch):
    shared = tmp_path / "shared" / "data"
    _write_tiny_mnist(shared / "mnist", n_train=18)
    monkeypatch.setattr(data, "_default_roots", lambda: [shared])
    assert len(load_dataset("mnist", calib_size=2).train) == 18


def test_missing_mnist_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("mnist", data_dir=tmp_path / "nothing-here")
    msg = str(e.value)
    assert "nothing-here" in msg and "--data-dir" in msg and "--download" in msg


def test_missing_cifar_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="--download"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_cwd_relative_shared_data(tmp_path, monkeypatch):
    """The real fallback: ../shared/data/mnist relative to the working directory."""
    monkeypatch.setattr(data, "_default_roots", _REAL_DEFAULT_ROOTS)
    _write_tiny_mnist(tmp_path / "shared" / "data" / "mnist", n_train=22)
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    assert len(load_dataset("mnist", calib_size=2).train) == 22
    roots = [p.resolve() for p in _REAL_DEFAULT_ROOTS()]
    assert (data._REPO_ROOT / ".." / "shared" / "data").resolve() in roots


# ------------------------------------------------------------------------------------ CIFAR files


def _write_tiny_cifar10(folder: Path, per_batch: int = 4) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)


def test_tiny_cifar10(tmp_path):
    _write_tiny_cifar10(tmp_path / "cifar-10-batches-py")
    s = load_dataset("cifar10", data_dir=tmp_path, calib_size=3)
    assert (len(s.train), len(s.calib), len(s.test)) == (20, 3, 4)
    assert s.input_shape == (3, 32, 32) and s.num_classes == 10
    assert s.train.tensors[0].dtype == torch.float32 and s.train.tensors[1].dtype == torch.int64


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar_pickle_is_restricted(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_tiny_cifar10(folder)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f)
    with pytest.raises(ValueError, match="data_batch_3"):
        load_dataset("cifar10", data_dir=tmp_path)


# ------------------------------------------------------------------------------------ real MNIST


@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason=f"real MNIST files not present at {REAL_MNIST}")
def test_real_mnist(monkeypatch):
    if (data._REPO_ROOT / ".." / "shared" / "data" / "mnist").is_dir():
        monkeypatch.setattr(data, "_default_roots", _REAL_DEFAULT_ROOTS)
        s = load_dataset("mnist", seed=0, calib_size=500)  # found via the repo-relative fallback
    else:
        s = load_dataset("mnist", data_dir=REAL_MNIST, seed=0, calib_size=500)
    assert (len(s.train), len(s.calib), len(s.test)) == (60000, 500, 10000)
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10
    x, y = s.train.tensors
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.bincount(y, minlength=10).min() > 5000
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01
    assert s.test.tensors[1].shape == (10000,)
