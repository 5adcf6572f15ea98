"""Argument types shared by the ``lowbit`` subcommands: a bad value is refused by argparse, before any
training or measuring starts, with the same meaning in every command (``--threads 0`` is an error
everywhere; thread counts are explicit)."""

from __future__ import annotations

import argparse
from typing import Any


def _int_at_least(least: int, text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = least - 1
    if v < least:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}")
    return v


def positive_int(text: str) -> int:
    """An integer >= 1 (``--threads``, ``--batch-size``, ``--repeats``)."""
    return _int_at_least(1, text)


def non_negative_int(text: str) -> int:
    """An integer >= 0 (``--epochs``)."""
    return _int_at_least(0, text)


def positive_float(text: str) -> float:
    """A finite number > 0 (``--lr``)."""
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (v > 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


def training_device(text: str) -> str:
    """``--device``: ``cpu``, or ``cuda`` / ``cuda:N`` where such a GPU exists (checked before any work)."""
    dev = text.strip()
    if dev == "cpu":
        return dev
    if dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit()):
        index = int(dev[5:]) if ":" in dev else 0
        import torch

        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"--device {dev}: no such CUDA device on this machine")
        return dev
    raise argparse.ArgumentTypeError(f"--device must be cpu, cuda or cuda:N, got {text!r}")


def lambdas(text: str) -> Any:
    """``λS,λT,λA`` as a :class:`lowbit.select.Lambdas` (an empty string is an error, not 1,1,1)."""
    from lowbit.select import Lambdas

    try:
        return Lambdas.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_threads(p: argparse.ArgumentParser, default: int = 1, what: str = "") -> None:
    p.add_argument("--threads", type=positive_int, default=default,
                   help=f"threads{' ' + what if what else ''} (an integer >= 1; default {default})")
