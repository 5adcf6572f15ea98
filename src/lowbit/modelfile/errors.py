"""The one error every problem with a model file becomes."""

from __future__ import annotations


class ModelFileError(ValueError):
    """The file is not a lowbit model this version can read; the message says what is wrong."""
