"""An outside peer for ``lowbit study binary``: the same binary architectures trained with Larq.

Larq (on tensorflow-cpu) is not a lowbit dependency; run this in its own environment::

    python3.11 -m venv /tmp/larq && /tmp/larq/bin/pip install larq tensorflow-cpu tf-keras
    TF_USE_LEGACY_KERAS=1 /tmp/larq/bin/python benchmarks/larq_binary.py --models tiny_cnn,small_cnn \\
        --seeds 3 --epochs 2 --train-samples 6000

The network mirrors lowbit's binary form of ``small_cnn`` / ``tiny_cnn16`` / ``tiny_cnn`` (src/lowbit/models.py): the first
conv takes the float image with float weights (lowbit: int8), every later conv and the hidden dense layer
take ``ste_sign`` inputs and ``ste_sign`` weights clipped to [-1, 1] (``weight_clip``), BatchNorm before
each sign, max-pooling at the same places, padding with -1 (``pad_values=-1``), and the last dense layer
takes signs with float weights (lowbit: int8). Larq trains from scratch (Adam, lr 1e-3 with cosine decay);
lowbit starts from the trained float network — the report says so. MNIST is read from the idx files
(``../shared/data/mnist`` relative to the checkout, or ``--data-dir``), normalized like lowbit's loader; the
first ``--train-samples`` training images are used, the full test set is evaluated.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # larq needs Keras 2 (tf-keras)

WIDTHS = {"small_cnn": ((32, 32, 64, 64), 256), "tiny_cnn": ((2, 4, 4, 8), 16), "tiny_cnn16": ((16, 16, 16, 16), 32)}
POOL_AFTER = {0, 1, 3}  # lowbit's small_cnn on 28x28: three ceil-mode pools, after conv 1, 2 and 4
MEAN, STD = 0.1307, 0.3081


def read_idx(path: Path) -> np.ndarray:
    data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


Split = tuple[np.ndarray, np.ndarray]


def load_mnist(folder: Path, n_train: int | None) -> tuple[Split, Split]:
    def x(name: str) -> np.ndarray:
        return ((read_idx(folder / name).astype(np.float32) / 255.0 - MEAN) / STD)[..., None]

    def y(name: str) -> np.ndarray:
        return read_idx(folder / name).astype(np.int64)

    xtr, ytr = x("train-images-idx3-ubyte.gz"), y("train-labels-idx1-ubyte.gz")
    if n_train is not None:
        xtr, ytr = xtr[:n_train], ytr[:n_train]
    return (xtr, ytr), (x("t10k-images-idx3-ubyte.gz"), y("t10k-labels-idx1-ubyte.gz"))


def build(name: str):  # noqa: ANN201  (a tf.keras model)
    import larq as lq
    import tensorflow as tf

    widths, hidden = WIDTHS[name]
    binary = {"input_quantizer": "ste_sign", "kernel_quantizer": "ste_sign", "kernel_constraint": "weight_clip",
              "use_bias": False}
    layers = [tf.keras.Input((28, 28, 1))]
    for i, w in enumerate(widths):
        if i == 0:
            layers.append(lq.layers.QuantConv2D(w, 3, padding="same", use_bias=False))
        else:
            layers.append(lq.layers.QuantConv2D(w, 3, padding="same", pad_values=-1.0, **binary))
        layers.append(tf.keras.layers.BatchNormalization(momentum=0.9, scale=True))
        if i in POOL_AFTER:
            layers.append(tf.keras.layers.MaxPool2D(2, 2, padding="same"))
    layers += [tf.keras.layers.Flatten(), lq.layers.QuantDense(hidden, **binary),
               tf.keras.layers.BatchNormalization(momentum=0.9),
               lq.layers.QuantDense(10, input_quantizer="ste_sign")]
    return tf.keras.Sequential(layers)


def run(name: str, seed: int, data, epochs: int, batch: int) -> tuple[float, float]:  # noqa: ANN001
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    (xtr, ytr), (xte, yte) = data
    model = build(name)
    steps = epochs * -(-len(xtr) // batch)
    lr = tf.keras.optimizers.schedules.CosineDecay(1e-3, steps)
    model.compile(tf.keras.optimizers.Adam(lr), tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    t0 = time.perf_counter()
    model.fit(xtr, ytr, batch_size=batch, epochs=epochs, verbose=0, shuffle=True)
    _, acc = model.evaluate(xte, yte, batch_size=1000, verbose=0)
    return 100.0 * float(acc), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="small_cnn,tiny_cnn16")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--train-samples", type=int, default=None)
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist"))
    args = ap.parse_args()
    import larq
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    data = load_mnist(Path(args.data_dir), args.train_samples)
    print(f"larq {larq.__version__}, tensorflow {tf.__version__}; {len(data[0][0])} training samples, "
          f"{args.epochs} epoch(s) from scratch, batch {args.batch_size}, 1 thread")
    print("| model | Larq accuracy % (mean ± std) | seeds | train s/run |")
    print("|---|---|---|---|")
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        res = [run(name, s, data, args.epochs, args.batch_size) for s in range(args.seeds)]
        accs = [a for a, _ in res]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {name} | {statistics.fmean(accs):.2f} ± {std:.2f} | {len(accs)} | "
              f"{statistics.fmean(t for _, t in res):.0f} |", flush=True)


if __name__ == "__main__":
    main()
