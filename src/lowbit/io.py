"""One-file model format: safetensors tensors, a JSON header describing the graph, a SHA-256 checksum.

The header (safetensors metadata key ``lowbit``) holds the format version, the meta (method,
configuration, input/output formats), every module as a checked spec and the graph as a list of
nodes; ``lowbit_sha256`` is the SHA-256 of the header and all tensors. :func:`load` rebuilds the
model without the original model's code, so the file size is the real deployable size.

Guarantees (see :mod:`lowbit.modelfile`):

* loading never runs code from the file: no pickle, no code generated from its strings; the graph is
  interpreted by :class:`~lowbit.modelfile.LoadedModel` and may only call lowbit's modules,
  allow-listed torch.nn modules (constructor arguments type-checked) and allow-listed functions and
  tensor methods;
* every header field is checked by type and range, every tensor by name, dtype and shape, and the
  checksum over header and tensors (``verify=False`` skips only the checksum): any corruption is a
  :class:`ModelFileError` naming what is wrong;
* writes are atomic (:mod:`lowbit.files`) and never replace a file named as an input.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

import lowbit
from lowbit import files
from lowbit.kernels.threads import guard_model
from lowbit.modelfile import LoadedModel, ModelFileError, Node
from lowbit.modelfile.container import FORMAT_VERSION, read, to_bytes
from lowbit.modelfile.header import check_fields, check_meta, module_paths, split_tensors
from lowbit.modelfile.modules import build_module, module_spec
from lowbit.modelfile.program import parse_nodes, program_from_fx

__all__ = ["FORMAT_VERSION", "LoadedModel", "ModelFileError", "file_size", "load", "read_header", "save"]


def _program(model: nn.Module) -> tuple[list[Node], dict[str, nn.Module], dict[str, torch.Tensor]]:
    if isinstance(model, LoadedModel):
        return model.lowbit_nodes, model.called_modules(), model.constants()
    if isinstance(model, fx.GraphModule):
        return program_from_fx(model)
    raise TypeError("lowbit.save takes a model returned by lowbit.quantize or lowbit.load, "
                    f"not a {type(model).__name__}")


def _json_default(o: Any) -> Any:
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _plain(v: Any) -> Any:
    """The meta as plain JSON values (tuples -> lists, 1-element tensors -> numbers)."""
    import json

    return json.loads(json.dumps(v, default=_json_default, allow_nan=False))


def to_file_bytes(model: nn.Module) -> bytes:
    """The bytes :func:`save` writes for ``model``."""
    nodes, modules, constants = _program(model)
    specs: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {f"::{k}": v for k, v in constants.items()}
    for path, m in modules.items():
        spec, ts = module_spec(path, m)
        specs[path] = spec
        tensors.update({f"{path}::{k}": v for k, v in ts.items() if v is not None})
    names = [n.name for n in nodes]
    header = {
        "format_version": FORMAT_VERSION,
        "lowbit_version": lowbit.__version__,
        "meta": _plain(getattr(model, "lowbit_meta", {})),
        "modules": specs,
        "nodes": [n.to_json(names) for n in nodes],
    }
    try:
        return to_bytes(header, tensors)
    except ValueError as e:
        raise ModelFileError(f"cannot save the model: {e}") from None


def save(model: nn.Module, path: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Write a model made by lowbit (any method, the prepared float model, or one read by :func:`load`)
    to one file, atomically. ``inputs``: files the caller read, which ``path`` must not be."""
    files.check_output(path, inputs=inputs)
    data = to_file_bytes(model)
    return files.write_bytes(path, data, inputs=inputs)


def read_header(path: str | os.PathLike[str], verify: bool = True) -> dict[str, Any]:
    """The checked JSON header of a lowbit file (format version, meta, modules, nodes)."""
    header, _ = read(path, verify)
    check_fields(header)
    header["meta"] = check_meta(header["meta"])
    return header


def load(path: str | os.PathLike[str], *, verify: bool = True) -> LoadedModel:
    """Rebuild a model written by :func:`save` (no original model code needed, no code from the file).

    ``verify=False`` skips the SHA-256 check (every field is still checked). Raises
    :class:`ModelFileError` for any problem with the file, FileNotFoundError if it is missing.
    """
    header, tensors = read(path, verify)
    try:
        return _build(header, tensors)
    except ModelFileError as e:
        raise ModelFileError(f"{path}: {e}") from None
    except Exception as e:  # anything else a hostile file provokes is still a file error
        raise ModelFileError(f"{path}: inconsistent lowbit model file: {type(e).__name__}: {e}") from None


def _build(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LoadedModel:
    check_fields(header)
    meta = check_meta(header["meta"])
    specs = header["modules"]
    module_paths(specs)
    per_module, constants = split_tensors(tensors, specs)
    nodes = parse_nodes(header["nodes"], specs, constants)
    used = {n.target for n in nodes if n.op in ("call_module", "get_attr")}
    unused = sorted(set(specs) - used) + sorted(f"::{c}" for c in set(constants) - used)
    if unused:
        raise ModelFileError(f"modules or tensors no node uses: {unused[:5]}")
    modules = {p: build_module(spec, per_module[p], f"{p}") for p, spec in specs.items()}
    model = LoadedModel(nodes, modules, constants, meta)
    return guard_model(model.eval())  # torch single-threaded while it runs (lowbit.kernels.threads)


def file_size(model: nn.Module) -> int:
    """Bytes of the model as lowbit.save writes it."""
    with tempfile.TemporaryDirectory() as d:
        return save(model, Path(d) / "m.lowbit").stat().st_size
