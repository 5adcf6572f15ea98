"""Datasets for training, calibrating and evaluating quantized networks.

Every loader returns a :class:`DatasetSplits`: float32 tensors ``N x C x H x W`` normalized with the
dataset's per-channel mean/std, int64 labels, and three splits:

* ``train``: what the reference model is trained on.
* ``calib``: the calibration set quantizers may look at (activation ranges, GPTQ/AdaRound-style
  reconstruction, ...). It never overlaps ``test``.
* ``test``: what every accuracy number is measured on.

Where calibration comes from:

* ``digits`` (scikit-learn's bundled 8x8 digits, offline): one deterministic stratified split of the
  1797 images into disjoint train (~60%), calibration (~10%, at most ``calib_size``) and test (~30%)
  parts. The calibration images are held out from training too, so they are "unseen" data, as a
  deployment-time calibration set would be.
* ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``: the canonical train/test split;
  calibration is a seeded random subset of ``calib_size`` *training* images (the usual
  post-training-quantization practice: calibration data comes from the training distribution and
  test images are never touched).

Files are never downloaded unless ``download=True`` (the CLI's ``--download``), which needs
torchvision; otherwise local files are parsed here without torchvision (IDX for the MNIST family,
the "python version" pickles for CIFAR, read with a restricted unpickler).
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "DatasetSplits",
    "KNOWN_DATASETS",
    "load_dataset",
    "make_loader",
    "read_idx",
    "normalize",
]

KNOWN_DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100")

# Per-channel statistics of the training images scaled to [0, 1]. digits: pixel values 0..16 / 16,
# statistics of the whole bundled set (seed independent, so checkpoints do not depend on the split).
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.3053,), (0.3760,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

_NUM_CLASSES = {"digits": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}

_ALIASES = {
    "fashionmnist": "fashion_mnist",
    "fmnist": "fashion_mnist",
    "cifar_10": "cifar10",
    "cifar_100": "cifar100",
}

# Repository root (src/lowbit/data.py -> parents[2]); used for the ../shared/data fallback.
_REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class DatasetSplits:
    """Normalized train / calibration / test tensors of one dataset.

    ``input_shape`` is ``(C, H, W)``; ``mean``/``std`` are the per-channel statistics the images were
    normalized with (``x = (pixel/255 - mean) / std``; digits use ``pixel/16``). ``calib`` never
    overlaps ``test`` (for digits it is also disjoint from ``train``; for the other datasets it is a
    subset of ``train``), see the module docstring. ``source``: the folder the files were read from.
    """

    name: str
    train: TensorDataset
    calib: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""  # where the files were read from ("sklearn" for digits)

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]

    @property
    def input_size(self) -> int:
        """Spatial side length (the datasets here are square)."""
        return self.input_shape[1]

    def summary(self) -> str:
        c, h, w = self.input_shape
        return (
            f"{self.name}: {len(self.train)} train / {len(self.calib)} calib / {len(self.test)} test, "
            f"{c}x{h}x{w}, {self.num_classes} classes"
        )


def _canonical_name(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in KNOWN_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(KNOWN_DATASETS)}")
    return key


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], scale: float) -> torch.Tensor:
    """``(images / scale - mean) / std`` per channel, as float32 (in place where possible)."""
    x = images.to(torch.float32)
    if x.data_ptr() == images.data_ptr():
        x = x.clone()
    c = x.shape[1]
    m = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
    x.div_(scale).sub_(m).div_(s)
    return x


def make_loader(ds: torch.utils.data.Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A single-process DataLoader whose shuffling order is fixed by ``seed``."""
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=0)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    calib_size: int = 500,
    download: bool = False,
) -> DatasetSplits:
    """Load ``name`` (one of :data:`KNOWN_DATASETS`) as normalized train/calib/test splits.

    File lookup (all but digits, which is bundled with scikit-learn): ``data_dir``, then the
    ``LOWBIT_DATA`` environment variable (the folder holding the files, or a parent with a
    per-dataset subfolder such as ``mnist/``), then ``../shared/data/<dataset>`` relative to the
    current directory and to the repository root. Nothing is downloaded unless ``download`` is true.
    """
    key = _canonical_name(name)
    if calib_size < 1:
        raise ValueError(f"calib_size must be >= 1, got {calib_size}")
    if key == "digits":
        return _load_digits(seed, calib_size)
    if key in ("mnist", "fashion_mnist"):
        (xtr, ytr), (xte, yte), source = _load_idx_family(key, data_dir, download)
        xtr, xte = xtr[:, None], xte[:, None]
    else:
        (xtr, ytr), (xte, yte), source = _load_cifar(key, data_dir, download)
    splits = _assemble(key, xtr, ytr, xte, yte, seed, calib_size, scale=255.0)
    splits.source = str(source)
    return splits


# ----------------------------------------------------------------------------------------- digits


def _load_digits(seed: int, calib_size: int) -> DatasetSplits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.asarray(d.images, dtype=np.float32)  # (1797, 8, 8), values 0..16
    labels = np.asarray(d.target, dtype=np.int64)
    n = len(labels)
    idx = np.arange(n)
    rest, test_idx = train_test_split(idx, test_size=0.3, random_state=seed, stratify=labels)
    n_calib = min(calib_size, round(0.1 * n))
    train_idx, calib_idx = train_test_split(rest, test_size=n_calib, random_state=seed, stratify=labels[rest])
    mean, std = _STATS["digits"]
    x = normalize(torch.from_numpy(images[:, None]), mean, std, scale=16.0)
    y = torch.from_numpy(labels)

    def part(ix: np.ndarray) -> TensorDataset:
        t = torch.from_numpy(np.sort(ix))
        return TensorDataset(x[t].contiguous(), y[t].contiguous())

    return DatasetSplits(
        name="digits",
        train=part(train_idx),
        calib=part(calib_idx),
        test=part(test_idx),
        num_classes=10,
        input_shape=(1, 8, 8),
        mean=mean,
        std=std,
        source="sklearn.datasets.load_digits",
    )


def _assemble(
    key: str,
    xtr: np.ndarray,
    ytr: np.ndarray,
    xte: np.ndarray,
    yte: np.ndarray,
    seed: int,
    calib_size: int,
    scale: float,
) -> DatasetSplits:
    """uint8 N x C x H x W arrays -> normalized splits; calibration = seeded subset of train."""
    mean, std = _STATS[key]
    num_classes = _NUM_CLASSES[key]
    for what, y in (("train", ytr), ("test", yte)):
        if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"{key}: {what} labels outside 0..{num_classes - 1}")
    x_train = normalize(torch.from_numpy(np.ascontiguousarray(xtr)), mean, std, scale)
    del xtr
    x_test = normalize(torch.from_numpy(np.ascontiguousarray(xte)), mean, std, scale)
    y_train = torch.from_numpy(ytr.astype(np.int64))
    y_test = torch.from_numpy(yte.astype(np.int64))
    rng = np.random.default_rng(seed)
    n_calib = min(calib_size, len(y_train))
    calib_idx = torch.from_numpy(np.sort(rng.permutation(len(y_train))[:n_calib]))
    c, h, w = x_train.shape[1:]
    return DatasetSplits(
        name=key,
        train=TensorDataset(x_train, y_train),
        calib=TensorDataset(x_train[calib_idx].contiguous(), y_train[calib_idx].contiguous()),
        test=TensorDataset(x_test, y_test),
        num_classes=num_classes,
        input_shape=(int(c), int(h), int(w)),
        mean=mean,
        std=std,
    )


# ------------------------------------------------------------------------------- file resolution


def _env_root() -> Path | None:
    env = os.environ.get("LOWBIT_DATA")
    return Path(env).expanduser() if env else None


def _download_root(data_dir: str | os.PathLike[str] | None) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = _env_root()
    if env is not None:
        return env
    return Path.home() / ".cache" / "lowbit" / "data"


# Subfolders (relative to a data root) each dataset may live in; the torchvision layouts included.
_SUBDIRS: dict[str, tuple[str, ...]] = {
    "mnist": ("mnist", "MNIST/raw"),
    "fashion_mnist": ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw"),
    "cifar10": ("cifar10/cifar-10-batches-py", "cifar-10-batches-py", "cifar10"),
    "cifar100": ("cifar100/cifar-100-python", "cifar-100-python", "cifar100"),
}


def _candidate_dirs(key: str, data_dir: str | os.PathLike[str] | None) -> list[Path]:
    """Folders to look for ``key``'s files in, in search order."""
    out: list[Path] = []

    def root(base: Path, direct: bool) -> None:
        if direct:
            out.append(base)
        out.extend(base / sub for sub in _SUBDIRS[key])

    if data_dir is not None:
        root(Path(data_dir).expanduser(), direct=True)
    env = _env_root()
    if env is not None:
        # Fashion-MNIST files have the same names as MNIST's: only its own subfolder counts there.
        root(env, direct=key != "fashion_mnist")
    for base in _default_roots():
        root(base, direct=False)
    seen: set[Path] = set()
    unique = []
    for p in out:
        rp = p.resolve() if p.exists() else p.absolute()
        if rp not in seen:
            seen.add(rp)
            unique.append(p)
    return unique


def _default_roots() -> list[Path]:
    """Fallback data roots: ../shared/data relative to the cwd and to the repo root, then the cache."""
    return [
        Path.cwd() / ".." / "shared" / "data",
        _REPO_ROOT / ".." / "shared" / "data",
        Path.home() / ".cache" / "lowbit" / "data",
    ]


def _note_fallback(key: str, data_dir: str | os.PathLike[str] | None, used: Path) -> None:
    """Warn when an explicit ``data_dir`` lacked the files and a later search location was used."""
    if data_dir is None:
        return
    base = Path(data_dir).expanduser().absolute()
    if base != used.absolute() and base not in used.absolute().parents:
        warnings.warn(f"{key}: no usable files in data_dir {data_dir}; using {used}", stacklevel=4)


def _not_found(key: str, looked: list[Path], what: str) -> FileNotFoundError:
    where = "\n  ".join(str(p) for p in looked)
    return FileNotFoundError(
        f"{key} not found (need {what}). Looked in:\n  {where}\n"
        f"Point --data-dir (or the LOWBIT_DATA environment variable) at the folder holding the files, "
        f"or pass --download to fetch them (needs torchvision)."
    )


def _torchvision_download(key: str, root: Path) -> None:
    try:
        import torchvision.datasets as tvd
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"downloading {key} needs torchvision (pip install torchvision); or place the files under "
            f"--data-dir / LOWBIT_DATA yourself"
        ) from e
    cls = {
        "mnist": tvd.MNIST,
        "fashion_mnist": tvd.FashionMNIST,
        "cifar10": tvd.CIFAR10,
        "cifar100": tvd.CIFAR100,
    }[key]
    root.mkdir(parents=True, exist_ok=True)
    for train in (True, False):  # pragma: no cover - needs the network
        cls(str(root), train=train, download=True)


# ------------------------------------------------------------------------------------ IDX (MNIST)

_Split = tuple[np.ndarray, np.ndarray]  # uint8 images, labels

_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _read_bytes(path: Path) -> bytes:
    """File contents, transparently gunzipped (detected by the gzip magic, not the suffix)."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated gzip file ({e})") from e


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse one IDX file (optionally gzipped) into a numpy array, validating header and size.

    Format: two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions, then that many
    big-endian uint32 sizes, then the data. Raises ``ValueError`` naming the file when anything does
    not add up.
    """
    p = Path(path)
    buf = _read_bytes(p)
    if len(buf) < 4:
        raise ValueError(f"{p}: not an IDX file (only {len(buf)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", buf[:4])
    if zero != 0 or dtype_code not in _IDX_TYPES or ndim == 0:
        raise ValueError(f"{p}: bad IDX magic number 0x{buf[:4].hex()}")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise ValueError(f"{p}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", buf[4:header])
    dtype = _IDX_TYPES[dtype_code]
    expected = math.prod(dims) * dtype.itemsize
    if len(buf) - header != expected:
        raise ValueError(
            f"{p}: IDX size mismatch: header says {'x'.join(map(str, dims))} "
            f"({expected} data bytes) but the file holds {len(buf) - header} (truncated or corrupt?)"
        )
    # copy: a writable, native-endian array independent of the file buffer
    return (
        np.frombuffer(buf, dtype=dtype, count=math.prod(dims), offset=header)
        .reshape(dims)
        .astype(dtype.newbyteorder("="))
    )


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    alt = stem.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
    for name in (f"{stem}.gz", stem, f"{alt}.gz", alt):
        p = folder / name
        if p.is_file():
            return p
    return None


def _idx_folder_files(folder: Path) -> dict[str, Path] | None:
    if not folder.is_dir():
        return None
    found = {k: _find_idx_file(folder, stem) for k, stem in _IDX_FILES.items()}
    if any(v is None for v in found.values()):
        return None
    return {k: v for k, v in found.items() if v is not None}


def _load_idx_family(key: str, data_dir: str | os.PathLike[str] | None, download: bool) -> tuple[_Split, _Split, Path]:
    looked = _candidate_dirs(key, data_dir)
    files = next((f for f in map(_idx_folder_files, looked) if f is not None), None)
    if files is None and download:
        root = _download_root(data_dir)
        _torchvision_download(key, root)
        files = next((f for f in map(_idx_folder_files, _candidate_dirs(key, root)) if f is not None), None)
    if files is None:
        names = ", ".join(f"{s}[.gz]" for s in _IDX_FILES.values())
        raise _not_found(key, looked, names)
    folder = files["train_images"].parent
    _note_fallback(key, data_dir, folder)
    arrays = {k: read_idx(p) for k, p in files.items()}
    out = []
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        xp, yp = files[f"{split}_images"], files[f"{split}_labels"]
        if x.dtype != np.uint8 or x.ndim != 3:
            raise ValueError(f"{xp}: expected uint8 images N x H x W, got {x.dtype} {x.shape}")
        if y.dtype != np.uint8 or y.ndim != 1:
            raise ValueError(f"{yp}: expected uint8 labels N, got {y.dtype} {y.shape}")
        if len(x) != len(y):
            raise ValueError(f"{xp} has {len(x)} images but {yp} has {len(y)} labels")
        out.append((x, y))
    if out[0][0].shape[1:] != out[1][0].shape[1:]:
        raise ValueError(f"{key}: train and test images differ in size")
    return out[0], out[1], folder


# ----------------------------------------------------------------------------------------- CIFAR

_CIFAR_FILES = {
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": (["train"], ["test"], b"fine_labels"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and plain containers (no arbitrary code)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # type: ignore[override]
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[label_key], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: corrupt or unexpected CIFAR batch file ({e!r})") from e
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(f"{path}: expected N x 3072 uint8 data and N labels, got {data.shape}, {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(key: str, data_dir: str | os.PathLike[str] | None, download: bool) -> tuple[_Split, _Split, Path]:
    train_names, test_names, label_key = _CIFAR_FILES[key]

    def complete(folder: Path) -> bool:
        return folder.is_dir() and all((folder / n).is_file() for n in train_names + test_names)

    looked = _candidate_dirs(key, data_dir)
    folder = next((f for f in looked if complete(f)), None)
    if folder is None and download:
        root = _download_root(data_dir)
        _torchvision_download(key, root)
        folder = next((f for f in _candidate_dirs(key, root) if complete(f)), None)
    if folder is None:
        raise _not_found(key, looked, "the CIFAR 'python version' files " + ", ".join(train_names + test_names))
    _note_fallback(key, data_dir, folder)
    parts = []
    for names in (train_names, test_names):
        batches = [_load_cifar_batch(folder / n, label_key) for n in names]
        parts.append((np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])))
    return parts[0], parts[1], folder
