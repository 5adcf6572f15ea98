"""Binary networks: ±1 weights and activations trained with the straight-through sign (``binary_ste``) or
lowbit's reading of UBQ (``ubq``), with gradual freezing, executed on packed XNOR-popcount kernels.

::

    qm = lowbit.binary.prepare(model, "ubq", calib=x_calib)     # fake-binary nn.Module (BatchNorm before signs)
    lowbit.binary.train(qm, train_set, test_set)                 # the stages of gradual freezing
    bm = lowbit.binary.convert(qm)                               # packed signs between layers
    lowbit.save(bm, "model.lowbit")                              # 1 bit per binary weight

``lowbit.quantize(model, "ubq", calib=..., train=..., test=...)`` does the three steps. See
:mod:`lowbit.binary.prepare`, :mod:`lowbit.binary.stages`, :mod:`lowbit.binary.convert` and docs/methods.md.
"""

from .convert import convert
from .modules import BinaryLayer, SignBatchNorm
from .prepare import binary_info, prepare, prepare_graph
from .stages import begin_all, begin_stage, end_stage, stage_count
from .train import train

__all__ = [
    "BinaryLayer",
    "SignBatchNorm",
    "begin_all",
    "begin_stage",
    "binary_info",
    "convert",
    "end_stage",
    "prepare",
    "prepare_graph",
    "stage_count",
    "train",
]
