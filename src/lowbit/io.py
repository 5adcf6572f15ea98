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
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

import lowbit
from lowbit import files
from lowbit.kernels.threads import guard_model
from lowbit.modelfile import LoadedModel, ModelFileError, Node
from lowbit.modelfile.aliases import dedupe, resolve
from lowbit.modelfile.container import FORMAT_VERSION, read, to_bytes
from lowbit.modelfile.header import check_fields, check_meta, module_paths, split_tensors
from lowbit.modelfile.modules import build_module, module_spec
from lowbit.modelfile.program import parse_nodes, program_from_fx
from lowbit.modelfile.weights import load_into, weights_parts
from lowbit.runtime import install as install_executor

__all__ = ["FORMAT_VERSION", "LoadedModel", "ModelFileError", "file_size", "load", "read_header", "save"]


def _program(model: nn.Module) -> tuple[list[Node], dict[str, nn.Module], dict[str, torch.Tensor]]:
    if isinstance(model, LoadedModel):
        return model.lowbit_nodes, model.called_modules(), model.constants()
    if isinstance(model, fx.GraphModule):
        return program_from_fx(model)
    raise TypeError("lowbit.save takes a model returned by lowbit.quantize or lowbit.load, "
                    f"not a {type(model).__name__}")


def _is_graph(model: nn.Module) -> bool:
    return isinstance(model, (LoadedModel, fx.GraphModule))


def _example_record(example: Any) -> list[dict[str, Any]]:
    """dtype, shape and value range of each example input (``lowbit eval`` makes inputs like them)."""
    xs = example if isinstance(example, (tuple, list)) else (example,)
    return [{"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
             "min": float(t.min()) if t.numel() else 0.0, "max": float(t.max()) if t.numel() else 0.0} for t in xs]


def _capture_or_weights(model: nn.Module, example: Any, weights_only: bool) -> nn.Module | None:
    """The captured graph of a model quantized without one (None: save it as a weights-only file)."""
    from lowbit.graph.capture import CaptureError, capture

    if weights_only:
        return None
    example = example if example is not None else getattr(model, "lowbit_example", None)
    if example is None:
        raise ValueError("this model was quantized without an example input, so it cannot be captured as a graph: "
                         "pass example_input= (one input batch) to lowbit.save or lowbit.quantize, or save it with "
                         "weights_only=True")
    try:
        gm = capture(model, example)
    except CaptureError as e:
        warnings.warn(f"{e}; saved as a weights-only file instead: load it with lowbit.load(path, model=...) "
                      "into the float model built by your code", UserWarning, stacklevel=4)
        model.lowbit_meta = {**model.lowbit_meta, "capture_error": str(e)}
        return None
    gm.lowbit_meta = {**model.lowbit_meta, "graph": "captured", "example_inputs": _example_record(example)}
    return gm


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


def to_file_bytes(model: nn.Module, *, example_input: Any = None, weights_only: bool = False) -> bytes:
    """The bytes :func:`save` writes for ``model``."""
    kind = "graph"
    if not _is_graph(model):
        if not isinstance(model, nn.Module) or not isinstance(getattr(model, "lowbit_meta", None), dict):
            raise TypeError("lowbit.save takes a model returned by lowbit.quantize or lowbit.load, "
                            f"not a {type(model).__name__}")
        captured = _capture_or_weights(model, example_input, weights_only)
        if captured is None:
            kind = "weights"
        else:
            model = captured
    elif weights_only:
        raise ValueError("weights_only=True is for models quantized without a graph (dynamic, weight_only, "
                         "float16); this model is a graph already")
    if kind == "weights":
        specs, tensors, extra = weights_parts(model)
        meta, node_list = {**model.lowbit_meta, **extra}, []
    else:
        nodes, modules, constants = _program(model)
        specs = {}
        tensors = {f"::{k}": v for k, v in constants.items()}
        for path, m in modules.items():
            spec, ts = module_spec(path, m)
            specs[path] = spec
            tensors.update({f"{path}::{k}": v for k, v in ts.items() if v is not None})
        names = [n.name for n in nodes]
        meta, node_list = dict(getattr(model, "lowbit_meta", {})), [n.to_json(names) for n in nodes]
        if getattr(model, "lowbit_example", None) is not None and "example_inputs" not in meta:
            meta["example_inputs"] = _example_record(model.lowbit_example)
    tensors, aliases = dedupe(tensors)
    header: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "lowbit_version": lowbit.__version__,
        "meta": _plain(meta),
        "modules": specs,
        "nodes": node_list,
    }
    if kind != "graph":
        header["kind"] = kind
    if aliases:
        header["tensor_aliases"] = aliases
    try:
        return to_bytes(header, tensors)
    except ValueError as e:
        raise ModelFileError(f"cannot save the model: {e}") from None


def save(model: nn.Module, path: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str]] = (),
         example_input: Any = None, weights_only: bool = False) -> Path:
    """Write a model made by lowbit (any method, the prepared float model, or one read by :func:`load`)
    to one file, atomically. ``inputs``: files the caller read, which ``path`` must not be.

    A model quantized without a graph (``dynamic``, ``weight_only``, ``float16`` on any nn.Module) is
    captured with torch.export (on ``example_input``, by default the one given to lowbit.quantize) and
    saved as a self-contained graph, which :func:`load` runs without the model's code. When it cannot be
    captured (the reason is warned about and kept in the meta as ``capture_error``), or with
    ``weights_only=True``, the file holds its quantized layers and float tensors only: load it with
    ``lowbit.load(path, model=float_model)`` into the model your code builds.
    """
    files.check_output(path, inputs=inputs)
    data = to_file_bytes(model, example_input=example_input, weights_only=weights_only)
    return files.write_bytes(path, data, inputs=inputs)


def read_header(path: str | os.PathLike[str], verify: bool = True) -> dict[str, Any]:
    """The checked JSON header of a lowbit file (format version, meta, modules, nodes)."""
    header, _ = read(path, verify)
    check_fields(header)
    header["meta"] = check_meta(header["meta"])
    return header


def load(path: str | os.PathLike[str], *, verify: bool = True, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model written by :func:`save` (no original model code needed, no code from the file).

    A graph file (the usual kind) is run by lowbit's executor (:class:`LoadedModel`). A weights-only
    file (a model quantized without a graph that could not be captured) needs ``model``: the float
    model your code builds (any weights); its layers are checked against the file, replaced by the
    file's quantized layers and its float tensors loaded — the model is modified in place and returned.
    ``verify=False`` skips the SHA-256 check (every field is still checked). Raises
    :class:`ModelFileError` for any problem with the file, FileNotFoundError if it is missing.
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be the float nn.Module of a weights-only file, got {type(model).__name__}")
    header, tensors = read(path, verify)
    try:
        return _build(header, tensors, model)
    except ModelFileError as e:
        raise ModelFileError(f"{path}: {e}") from None
    except Exception as e:  # anything else a hostile file provokes is still a file error
        raise ModelFileError(f"{path}: inconsistent lowbit model file: {type(e).__name__}: {e}") from None


def _build(header: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module | None) -> nn.Module:
    check_fields(header)
    meta = check_meta(header["meta"])
    tensors = resolve(tensors, header.get("tensor_aliases", {}))
    if header.get("kind", "graph") == "weights":
        if model is None:
            raise ModelFileError("this is a weights-only file (the model could not be captured as a graph: "
                                 f"{str(meta.get('capture_error', 'saved with weights_only=True'))[:300]}); load it "
                                 "with lowbit.load(path, model=float_model), the float model your code builds")
        return load_into(model, header, tensors, meta)
    if model is not None:
        raise ModelFileError("this file holds the whole model as a graph; load it without model=")
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
    install_executor(model)  # model(x) runs a native plan when every op has one (lowbit.runtime)
    return guard_model(model.eval())  # torch single-threaded while it runs (lowbit.kernels.threads)


def file_size(model: nn.Module) -> int:
    """Bytes of the model as lowbit.save writes it."""
    with tempfile.TemporaryDirectory() as d:
        return save(model, Path(d) / "m.lowbit").stat().st_size
