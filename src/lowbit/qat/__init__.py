"""Quantization-aware training on any training loop.

::

    qm = lowbit.qat.prepare(model, "lsq", calib=x_calib, bits=(4, 4))   # an ordinary nn.Module
    for x, y in loader:                                                  # your own loop
        loss = F.cross_entropy(qm(x), y); opt.zero_grad(); loss.backward(); opt.step()
    int_model = lowbit.qat.convert(qm)                                   # integer kernels
    lowbit.save(int_model, "model.lowbit")

See :func:`prepare`, :func:`convert` (also partial: ``upto=k``) and docs/methods.md.
"""

from .convert import convert, integer_layer_count
from .modules import PoolRequant, QATLayer
from .prepare import prepare, prepare_graph, qat_info

__all__ = ["PoolRequant", "QATLayer", "convert", "integer_layer_count", "prepare", "prepare_graph", "qat_info"]
