"""Operation counts of a model for one input sample: multiplications, additions, maxima, table look-ups
and shifts, per layer and in total (``lowbit info FILE``, the compare report).

Counted from the modules that run (forward hooks on one batch-1 input), by what each one computes:

- conv / linear layers (float, float16, int8 static or dynamic): ``MAC = outputs x terms per output``
  multiplications and as many additions; an int8 requantization or float rescale adds one
  multiplication per output, dynamic quantization of the input one per input element;
- integer BM layers (QBMConv2d / QBMLinear), per output with K terms and B branches (4, or 2 when the
  input has no negative part): ``B*K`` additions (log sums) + B (branch sum and bias), ``B*(K-1)``
  maxima, ``B`` exp look-ups and ``B + 1`` shifts (exp and output rounding); one log look-up per input
  element; **no multiplication**;
- float BM layers (BMConv2d / BMLinear): the same additions and maxima, the exp / log as look-ups;
- max pooling: maxima; average pooling: additions and one multiplication per output; ReLU / clamps:
  maxima; QAdd: 2 multiplications and 3 additions per element; Quantize / Dequantize: one
  multiplication per element. Function calls (a float ``+``, flatten) are not counted.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["KINDS", "count_ops", "format_ops", "format_count", "cli_info_file"]

KINDS = ("mul", "add", "max", "lookup", "shift")
Counts = dict[str, int]


def _zero() -> Counts:
    return dict.fromkeys(KINDS, 0)


def _terms_conv(weight_shape: tuple[int, ...]) -> int:
    return int(math.prod(weight_shape[1:]))


def _mac(out: torch.Tensor, terms: int, extra_mul_per_out: int = 0) -> Counts:
    n = out.numel()
    c = _zero()
    c["mul"] = n * terms + n * extra_mul_per_out
    c["add"] = n * terms
    return c


def _bm(x: torch.Tensor, out: torch.Tensor, terms: int, branches: int, integer: bool) -> Counts:
    n = out.numel()
    c = _zero()
    c["add"] = n * (branches * terms + branches)
    c["max"] = n * branches * (terms - 1)
    c["lookup"] = n * branches + x.numel()
    if integer:
        c["shift"] = n * (branches + 1)
    return c


def _module_counts(m: nn.Module, x: torch.Tensor, out: torch.Tensor) -> Counts | None:
    from lowbit.bm.layers import BMConv2d, BMLinear
    from lowbit.graph import Fused
    from lowbit.nn import (
        Dequantize,
        DynamicQConv,
        DynamicQLinear,
        F16Layer,
        QAdd,
        QAvgPool2d,
        QBMConv2d,
        QBMLinear,
        QClamp,
        QConv,
        QLinear,
        Quantize,
    )

    if isinstance(m, Fused):
        m = m.layer
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
        return _mac(out, _terms_conv(tuple(m.weight.shape)))
    if isinstance(m, F16Layer):
        return _mac(out, _terms_conv(tuple(m.weight.shape)))
    if isinstance(m, (QLinear, QConv)):
        return _mac(out, _terms_conv(tuple(m.weight_q.shape)), 1)
    if isinstance(m, (DynamicQLinear, DynamicQConv)):
        c = _mac(out, _terms_conv(tuple(m.weight_q.shape)), 1)
        c["mul"] += x.numel()
        return c
    if isinstance(m, (QBMLinear, QBMConv2d)):
        return _bm(x, out, _terms_conv(tuple(m.cpos.shape)), 4 if m.signed_input else 2, True)
    if isinstance(m, (BMLinear, BMConv2d)):
        return _bm(x, out, _terms_conv(tuple(m.v_pos.shape)), 4 if bool((x < 0).any()) else 2, False)
    if isinstance(m, (nn.MaxPool2d, nn.MaxPool1d)):
        ks = m.kernel_size
        k = math.prod(ks) if isinstance(ks, tuple) else (ks * ks if isinstance(m, nn.MaxPool2d) else ks)
        c = _zero()
        c["max"] = out.numel() * (k - 1)
        return c
    if isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d, QAvgPool2d)):
        c = _zero()
        window = max(1, x.numel() // max(1, out.numel()))
        c["add"] = out.numel() * (window - 1)
        c["mul"] = out.numel()
        return c
    if isinstance(m, (nn.ReLU, nn.ReLU6, QClamp)):
        c = _zero()
        c["max"] = out.numel()
        return c
    if isinstance(m, QAdd):
        c = _zero()
        c["mul"], c["add"] = 2 * out.numel(), 3 * out.numel()
        return c
    if isinstance(m, (Quantize, Dequantize)):
        c = _zero()
        c["mul"] = out.numel()
        return c
    return None


def count_ops(model: nn.Module, example: Any) -> dict[str, Any]:
    """``{"total": counts, "layers": [(name, type, counts)], "uncounted": [names]}`` for one sample.

    ``example``: one input batch in the model's own input format (a float batch for float-input models);
    its first sample is used; a tuple of batches for a model with several inputs."""
    x0 = tuple(t[:1] for t in example) if isinstance(example, (tuple, list)) else (example[:1],)
    rows: list[tuple[str, str, Counts]] = []
    uncounted: list[str] = []
    hooks = []
    from lowbit.graph import Fused

    for name, m in model.named_modules():
        if not name or (list(m.children()) and not isinstance(m, Fused)):
            continue

        def hook(mod: nn.Module, inp: Any, out: Any, name: str = name) -> None:
            xin = inp[0] if inp and isinstance(inp[0], torch.Tensor) else None
            if xin is None or not isinstance(out, torch.Tensor):
                return
            c = _module_counts(mod, xin, out)
            if c is None:
                uncounted.append(name)
            else:
                rows.append((name, type(mod).__name__, c))

        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*x0)
    finally:
        for h in hooks:
            h.remove()
    total = _zero()
    for _, _, c in rows:
        for k in KINDS:
            total[k] += c[k]
    return {"total": total, "layers": rows, "uncounted": sorted(set(uncounted))}


def format_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


def format_ops(ops: dict[str, Any], per_layer: bool = True) -> str:
    """A plain-text table of :func:`count_ops` (per layer, then the total)."""
    head = f"{'layer':28s} {'type':16s} " + " ".join(f"{k:>9s}" for k in KINDS)
    out = [head, "-" * len(head)]
    if per_layer:
        for name, typ, c in ops["layers"]:
            out.append(f"{name[:28]:28s} {typ[:16]:16s} " + " ".join(f"{format_count(c[k]):>9s}" for k in KINDS))
    out.append(f"{'total':28s} {'':16s} " + " ".join(f"{format_count(ops['total'][k]):>9s}" for k in KINDS))
    if ops["uncounted"]:
        out.append("not counted: " + ", ".join(ops["uncounted"]))
    return "\n".join(out)


def _input_shape(meta: dict[str, Any], text: str | None) -> tuple[int, ...]:
    if text is not None:
        try:
            shape = tuple(int(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"--input-shape takes comma-separated integers (C,H,W), got {text!r}") from None
        if any(v < 1 for v in shape):
            raise ValueError(f"--input-shape takes sizes >= 1 (C,H,W), got {text!r}")
        return shape
    shape = tuple(meta.get("input_shape") or ())
    if not shape or any(v < 1 for v in shape):
        raise ValueError("the model file does not record its input shape: pass --input-shape C,H,W")
    return shape


def cli_info_file(args: Any) -> int:
    """``lowbit info FILE``: the model's method and its operations per sample, per layer."""
    import lowbit
    from lowbit.evaluate import model_input
    from lowbit.modelfile.container import read

    verify = not getattr(args, "no_verify", False)
    header, _ = read(args.file, verify)
    meta = header.get("meta") or {}
    text = getattr(args, "input_shape", None)
    if header.get("kind", "graph") == "weights":
        print("\noperation count: not available for a weights-only file (it needs the float model's code)")
        return 0
    if not text and not meta.get("input_shape"):  # older files: the table above is all we can say
        print("\noperation count: the file does not record its input shape (pass --input-shape C,H,W)")
        return 0
    shape = _input_shape(meta, text)
    model = lowbit.load(args.file, verify=verify)
    ops = count_ops(model, model_input(model, torch.zeros(1, *shape)))
    print(f"\n{args.file}: method {meta.get('method', '?')}, input {list(shape)}; operations per sample:")
    print(format_ops(ops))
    return 0
