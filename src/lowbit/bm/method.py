"""The ``bm`` method: ``lowbit.quantize(model, "bm", calib=..., train=..., test=...)`` and ``compare``.

On lowbit's prepared graph (BatchNorm folded, ReLU fused), :func:`lowbit.bm.train_layerwise` converts the
chosen conv/linear layers to BM layers one by one with training after each, fine-tunes, then the integer
BM model is built as the static method builds int8 models (calibrated uint8 codes between layers; BM
layers -> ``lowbit.nn.QBMConv2d`` / ``QBMLinear``; layers not converted -> int8). ``lowbit bm`` runs the same
recipe on the model itself, BatchNorm kept during training (see lowbit.bm.training).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.utils.data import TensorDataset

from lowbit.data import DatasetSplits
from lowbit.methods.base import Method, QuantConfig, TrainingData, register
from lowbit.methods.common import calibrate_activations
from lowbit.methods.integer_graph import build_integer_graph

__all__ = ["BMConfig", "BMMethod"]


@dataclass
class BMConfig(QuantConfig):
    """Options of the ``bm`` method.

    layers: comma-separated layer names / glob patterns to convert (None: every conv/linear layer).
    epochs_per_layer, finetune_epochs, train_fraction, lr, finetune_lr, batch_size, temperature, seed,
    threads: the layer-by-layer training (:class:`lowbit.bm.BMTrainConfig`).
    code_bits: width of the integer log-domain codes (16 or 8); log_step_bits: f of the log step 2^-f
    octave (None: 8 for 16-bit codes, 4 for 8-bit codes).
    """

    layers: str | None = None
    epochs_per_layer: int = 1
    finetune_epochs: int = 2
    train_fraction: float = 1.0
    lr: float = 1e-3
    finetune_lr: float | None = None
    batch_size: int = 64
    temperature: float = 0.0
    seed: int = 0
    threads: int | None = None
    code_bits: int = 16
    log_step_bits: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.code_bits not in (8, 16):
            raise ValueError(f"code_bits must be 8 or 16, got {self.code_bits!r}")
        self.train_config()  # the training options are checked here, before any work

    def train_config(self) -> Any:
        from .training import BMTrainConfig

        return BMTrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(BMTrainConfig)
                                if f.name != "eps"})


def _dataset(d: Any, what: str) -> TensorDataset:
    if isinstance(d, TensorDataset):
        return d
    if isinstance(d, (tuple, list)) and len(d) == 2 and all(isinstance(t, torch.Tensor) for t in d):
        return TensorDataset(d[0], d[1])
    if isinstance(d, torch.utils.data.Dataset):
        xs, ys = zip(*(d[i] for i in range(len(d))), strict=True)  # type: ignore[arg-type]
        return TensorDataset(torch.stack(xs), torch.as_tensor(ys))
    raise TypeError(f"bm: {what} data must be a dataset of (x, y) or an (X, Y) pair of tensors")


def _splits(data: TrainingData) -> DatasetSplits:
    train = _dataset(data.train, "training")
    test = _dataset(data.test, "test") if data.test is not None else train
    x = train.tensors[0]
    return DatasetSplits(name="training data", train=train, calib=train, test=test,
                         num_classes=int(train.tensors[1].max()) + 1, input_shape=tuple(x.shape[1:]),  # type: ignore
                         mean=(), std=())


@register
class BMMethod(Method):
    name = "bm"
    order = 80
    summary = "bipolar morphological network: layer-by-layer BM training, integer log-domain max-plus"
    config_cls = BMConfig
    needs_calibration = True
    needs_training_data = True

    def convert(self, prepared: Any, calib: list[torch.Tensor], data: TrainingData | None = None) -> fx.GraphModule:
        from .convert import set_options
        from .training import train_layerwise

        if data is None or data.train is None:
            raise ValueError("method 'bm' trains the model: it needs labelled training data")
        cfg = self.config
        assert isinstance(cfg, BMConfig)
        bmm, hist = train_layerwise(prepared.gm, _splits(data), cfg.train_config(), progress=cfg.progress)
        set_options(bmm, code_bits=cfg.code_bits, log_step_bits=cfg.log_step_bits)
        act = calibrate_activations(bmm, calib, cfg.activation_observer, progress=cfg.progress)
        gm, meta = build_integer_graph(bmm, act, cfg)
        meta["bm"] = {"layers": hist["layers"], "code_bits": cfg.code_bits, "float_bm_acc": hist["bm_acc"],
                      "stages": [dataclasses.asdict(s) if dataclasses.is_dataclass(s) else s
                                 for s in hist["stages"]]}
        gm.lowbit_meta = meta
        return gm
