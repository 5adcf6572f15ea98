"""What a saved model holds: ``lowbit info FILE``.

Per integer layer: the kernel family, the weight levels, how the codes are stored and the bits each weight
takes in the file; in total the bits per weight of the weight codes alone and with the per-channel scales
and biases, the file size and the method. Read from the checked file (:func:`lowbit.modelfile.container.read`),
nothing is executed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lowbit.formats.levels import format_from_dict
from lowbit.modelfile.container import read
from lowbit.modelfile.header import check_fields, check_meta, split_tensors

__all__ = ["describe_file", "format_file_info"]

_CODE_TENSORS = ("weight_q", "weight_packed", "weight_radix")
_SIDE_TENSORS = ("weight_scale", "bias_q", "bias")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def describe_file(path: str | os.PathLike[str], verify: bool = True) -> dict[str, Any]:
    """``{"path", "bytes", "method", "layers": [...], "weights", "code_bits_per_weight",
    "bits_per_weight"}`` of a lowbit model file (layers with integer weights only)."""
    header, tensors = read(path, verify)
    check_fields(header)
    meta = check_meta(header["meta"])
    per_module, _ = split_tensors(tensors, header["modules"])
    layers = []
    for name, spec in header["modules"].items():
        ts = per_module.get(name, {})
        codes = [k for k in _CODE_TENSORS if k in ts]
        if not codes:
            continue
        attrs = spec.get("attrs", {}) if isinstance(spec, dict) else {}
        w = attrs.get("weight") or {}
        n = ts[codes[0]].numel() if codes[0] == "weight_q" else 1
        if w.get("shape"):
            n = 1
            for s in w["shape"]:
                n *= int(s)
        fmt = format_from_dict(w["format"]) if "format" in w else None
        code_bytes = sum(_nbytes(ts[k]) for k in codes)
        side = sum(_nbytes(ts[k]) for k in _SIDE_TENSORS if k in ts)
        layers.append({"layer": name, "class": spec.get("class"), "kernel": w.get("kernel", "int8"),
                       "levels": fmt.n_levels if fmt else 256, "storage": codes[0].removeprefix("weight_"),
                       "weights": n, "code_bytes": code_bytes, "side_bytes": side,
                       "bits_per_weight": 8.0 * code_bytes / max(n, 1)})
    total = sum(r["weights"] for r in layers)
    code = sum(r["code_bytes"] for r in layers)
    side = sum(r["side_bytes"] for r in layers)
    return {"path": str(path), "bytes": Path(path).stat().st_size, "method": meta.get("method"), "layers": layers,
            "weights": total, "code_bits_per_weight": 8.0 * code / max(total, 1),
            "bits_per_weight": 8.0 * (code + side) / max(total, 1)}


def format_file_info(info: dict[str, Any]) -> str:
    """The table ``lowbit info FILE`` prints."""
    lines = [f"{info['path']}: {info['bytes']:,} bytes, method {info['method']}"]
    if not info["layers"]:
        return lines[0] + "\nno layers with integer weights"
    lines.append(f"{'layer':28s} {'kernel':7s} {'levels':>6s} {'storage':8s} {'weights':>9s} {'bits/weight':>11s}")
    for r in info["layers"]:
        lines.append(f"{r['layer'][:28]:28s} {r['kernel']:7s} {r['levels']:6d} {r['storage']:8s} {r['weights']:9,d} "
                     f"{r['bits_per_weight']:11.3f}")
    lines.append(f"{info['weights']:,} integer weights: {info['code_bits_per_weight']:.3f} bits per weight "
                 f"({info['bits_per_weight']:.3f} with the per-channel scales and biases)")
    return "\n".join(lines)
