"""lowbit's model file: a checked container, a closed vocabulary, and an executor of its own.

Reading a file never runs code from it: no pickle, no code generated from its strings. The graph is a
node list checked against allow-lists and interpreted by :class:`LoadedModel`; the modules are
lowbit's own or allow-listed torch.nn classes with type-checked constructor arguments; a SHA-256 over
header and tensors catches corruption. :mod:`lowbit.io` is the public face (``save``, ``load``).
"""

from .errors import ModelFileError
from .program import LoadedModel, Node

__all__ = ["LoadedModel", "ModelFileError", "Node"]
