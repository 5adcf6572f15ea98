"""Choosing a quantization method by a weighted objective (docs/methods.md, "Choosing a method").

Every candidate is measured against the float model (the *baseline*, ``U0``) on three axes: file size
``S``, latency ``T`` and accuracy ``A``. The objective is the weighted sum of relative changes

    L = λS·(S − S0)/S0 + λT·(T − T0)/T0 + λA·(A0 − A)/A0

Lower is better; the baseline scores exactly 0. The accuracy term is lowbit's corrected sign: losing
accuracy *raises* L. The seed study (Perm garbage-sorter, TFLite modes) printed its L column with the
accuracy term ``+(A − A0)/A0``, which rewards losing accuracy; ``paper_sign=True`` reproduces that
column, e.g. for the dynamic-range model U1 0.21 instead of lowbit's 0.39.

Units are whatever the rows use (bytes, ms, % or fraction): every term is a ratio, so only the
baseline has to be in the same units as the candidates.

Rows are plain dicts with at least ``method, size_bytes, latency_ms, accuracy``; any other keys
(``backend``, ``threads``, ``note`` …) are carried along untouched. :func:`score` adds ``L`` and
``is_baseline``; :func:`choose` picks the winner; :func:`read_csv` and :func:`cli_select` make the
same available from a CSV file (``lowbit select results.csv``).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "REQUIRED_COLUMNS",
    "Lambdas",
    "objective",
    "score",
    "choose",
    "baseline_index",
    "read_csv",
    "add_select_arguments",
    "cli_select",
]

#: Columns every result row must have; all others are optional and kept as they are.
REQUIRED_COLUMNS: tuple[str, ...] = ("method", "size_bytes", "latency_ms", "accuracy")
_NUMERIC_COLUMNS: tuple[str, ...] = ("size_bytes", "latency_ms", "accuracy")

_LAMBDA_ERROR = "weights λ must be non-negative and not all zero"


@dataclass(frozen=True)
class Lambdas:
    """Weights of the three terms of the objective: file size, latency, accuracy (default 1, 1, 1)."""

    size: float = 1.0
    time: float = 1.0
    acc: float = 1.0

    def __post_init__(self) -> None:
        values = (self.size, self.time, self.acc)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ValueError(f"weights λ must be numbers, got {v!r}")
            if not math.isfinite(v):
                raise ValueError(f"weights λ must be finite, got {v!r}")
        if any(v < 0 for v in values) or all(v == 0 for v in values):
            raise ValueError(f"{_LAMBDA_ERROR}, got {self.size:g},{self.time:g},{self.acc:g}")

    @classmethod
    def parse(cls, text: str) -> Lambdas:
        """Parse ``"λS,λT,λA"``, e.g. ``"1,1,1"`` or ``"0.5, 1, 2"``.

        Raises ValueError for a wrong count, non-numbers, non-finite or negative weights, or all zero.
        """
        if not isinstance(text, str):
            raise ValueError(f"weights λ must be given as a string 'λS,λT,λA', got {text!r}")
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 3:
            raise ValueError(
                f"weights λ must be three comma-separated numbers 'λS,λT,λA' (size, time, accuracy), "
                f"got {len(parts)} in {text!r}"
            )
        values: list[float] = []
        for name, p in zip(("λS", "λT", "λA"), parts, strict=True):
            try:
                v = float(p)
            except ValueError:
                raise ValueError(f"weight {name} is not a number: {p!r} (in {text!r})") from None
            values.append(v)
        return cls(*values)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.size:g},{self.time:g},{self.acc:g}"


def _coerce_lambdas(lambdas: Lambdas | str | Sequence[float] | None) -> Lambdas:
    if lambdas is None:
        return Lambdas()
    if isinstance(lambdas, Lambdas):
        return lambdas
    if isinstance(lambdas, str):
        return Lambdas.parse(lambdas)
    values = list(lambdas)
    if len(values) != 3:
        raise ValueError(f"weights λ must be three numbers (size, time, accuracy), got {values!r}")
    return Lambdas(*values)


def objective(
    size: float,
    latency: float,
    accuracy: float,
    base_size: float,
    base_latency: float,
    base_accuracy: float,
    lambdas: Lambdas = Lambdas(),  # noqa: B008  (frozen, immutable)
    paper_sign: bool = False,
) -> float:
    """The weighted relative change of one candidate against the baseline (lower is better).

    ``L = λS·(S−S0)/S0 + λT·(T−T0)/T0 + λA·(A0−A)/A0``; with ``paper_sign=True`` the accuracy term is
    ``+(A−A0)/A0`` as printed in the seed study. Baselines must be positive and finite.
    """
    lam = _coerce_lambdas(lambdas)
    for name, v in (("base_size", base_size), ("base_latency", base_latency),
                    ("base_accuracy", base_accuracy)):
        if not _is_number(v) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    for name, v in (("size", size), ("latency", latency), ("accuracy", accuracy)):
        if not _is_number(v) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    d_size = (size - base_size) / base_size
    d_time = (latency - base_latency) / base_latency
    if paper_sign:
        d_acc = (accuracy - base_accuracy) / base_accuracy
    else:
        d_acc = (base_accuracy - accuracy) / base_accuracy
    return lam.size * d_size + lam.time * d_time + lam.acc * d_acc


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _truthy(v: Any) -> bool:
    """Flags as written by score() (bool) or read back from a CSV ("True", "1", ...)."""
    if isinstance(v, str):
        return v.strip().lower() in {"true", "1", "yes", "y"}
    return bool(v)


def _to_number(v: Any) -> float | int | None:
    """A finite int/float, or a string holding one; None if it is not a number."""
    if _is_number(v):
        return v if math.isfinite(v) else None
    if isinstance(v, str):
        s = v.strip()
        if s.endswith("%"):
            s = s[:-1].strip()
        try:
            f = float(s)
        except ValueError:
            return None
        return f if math.isfinite(f) else None
    return None


def baseline_index(rows: Sequence[Mapping[str, Any]], baseline: str | None = None) -> int:
    """Index of the baseline row: the row named ``baseline``; else the row flagged ``is_baseline``
    (as :func:`score` marks it); else the first row."""
    if not rows:
        raise ValueError("no result rows")
    if baseline is not None:
        for i, r in enumerate(rows):
            if str(r.get("method")) == baseline:
                return i
        known = ", ".join(str(r.get("method")) for r in rows)
        raise ValueError(f"unknown baseline {baseline!r}; methods are: {known}")
    for i, r in enumerate(rows):
        if _truthy(r.get("is_baseline", False)):
            return i
    return 0


def _validate_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if not rows:
        raise ValueError("no result rows to score")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise ValueError(f"row {i} is not a mapping: {r!r}")
        missing = [c for c in REQUIRED_COLUMNS if c not in r]
        if missing:
            raise ValueError(f"row {i} ({r.get('method', '?')!s}) is missing key(s): {', '.join(missing)}")
        row = dict(r)
        method = str(row["method"])
        if not method:
            raise ValueError(f"row {i} has an empty method name")
        if method in seen:
            raise ValueError(f"duplicate method name {method!r}")
        seen.add(method)
        row["method"] = method
        for c in _NUMERIC_COLUMNS:
            v = _to_number(row[c])
            if v is None:
                raise ValueError(f"row {i} ({method}): {c} is not a finite number: {row[c]!r}")
            if v < 0:
                raise ValueError(f"row {i} ({method}): {c} must not be negative: {row[c]!r}")
            row[c] = v
        out.append(row)
    return out


def score(
    rows: Sequence[Mapping[str, Any]],
    baseline: str | None = None,
    lambdas: Lambdas | str = Lambdas(),  # noqa: B008  (frozen, immutable)
    paper_sign: bool = False,
) -> list[dict[str, Any]]:
    """Score every row against the baseline.

    The baseline is the row whose ``method`` is ``baseline``, or else the first row. Returns copies of
    the rows, in the same order, with ``L`` added (the baseline's is exactly 0.0) and ``is_baseline``
    set (True for the baseline only); numeric strings in the required columns become numbers, other
    keys are kept. Raises ValueError for empty input, missing keys, an unknown baseline, duplicate
    method names, or non-numeric / negative values (or a non-positive baseline).
    """
    lam = _coerce_lambdas(lambdas)
    checked = _validate_rows(rows)
    b = baseline_index(checked, baseline) if baseline is not None else 0
    base = checked[b]
    for c in _NUMERIC_COLUMNS:
        if base[c] <= 0:
            raise ValueError(f"baseline {base['method']!r}: {c} must be positive, got {base[c]!r}")
    out: list[dict[str, Any]] = []
    for i, row in enumerate(checked):
        if i == b:
            row["L"] = 0.0
        else:
            row["L"] = objective(
                row["size_bytes"], row["latency_ms"], row["accuracy"],
                base["size_bytes"], base["latency_ms"], base["accuracy"],
                lam, paper_sign=paper_sign,
            )
        row["is_baseline"] = i == b
        out.append(row)
    return out


def choose(scored_rows: Sequence[Mapping[str, Any]], include_baseline: bool = False) -> dict[str, Any]:
    """Pick the best scored row: minimal ``L``; ties go to the smaller file, then the faster model,
    then the earlier row.

    By default only quantized candidates compete (the baseline — flagged ``is_baseline`` by
    :func:`score`, else the first row — is excluded), so the answer is always a quantized model even
    when every one of them scores above 0, i.e. is worse than the float model; check
    ``result["L"] > 0`` to detect that. With ``include_baseline=True`` the float model competes too and
    is returned when it scores strictly lower than every quantized row (``result["is_baseline"]`` is
    then True): "keep the float model". Returns a copy of the chosen row.
    """
    if not scored_rows:
        raise ValueError("no scored rows to choose from")
    for r in scored_rows:
        if "L" not in r:
            raise ValueError(f"row {r.get('method', '?')!s} has no 'L'; call score() first")
    b = baseline_index(scored_rows)
    candidates = [(i, r) for i, r in enumerate(scored_rows) if i != b]
    if not candidates and not include_baseline:
        raise ValueError("only the baseline is present: no quantized model to choose from")

    def key(item: tuple[int, Mapping[str, Any]]) -> tuple[float, float, float, int]:
        i, r = item
        return (float(r["L"]), float(r["size_bytes"]), float(r["latency_ms"]), i)

    if candidates:
        best_i, best = min(candidates, key=key)
        if include_baseline and float(scored_rows[b]["L"]) < float(best["L"]):
            best_i, best = b, scored_rows[b]
    else:
        best_i, best = b, scored_rows[b]
    out = dict(best)
    out["is_baseline"] = best_i == b
    return out


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Read result rows from a CSV file with a header line.

    Columns ``method, size_bytes, latency_ms, accuracy`` are required (the numeric ones are converted
    to numbers, a trailing ``%`` on accuracy is allowed); any other columns are kept as strings. Blank
    lines are skipped. Raises ValueError listing the missing columns, or naming the line number and
    column of a value that is not a number, or when there are no data rows.
    """
    p = Path(path)
    with p.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header: list[str] | None = None
        rows: list[dict[str, Any]] = []
        for record in reader:
            if not record or all(not c.strip() for c in record):
                continue
            if header is None:
                header = [c.strip() for c in record]
                missing = [c for c in REQUIRED_COLUMNS if c not in header]
                if missing:
                    raise ValueError(
                        f"{p}: missing required column(s): {', '.join(missing)} "
                        f"(found: {', '.join(header) or 'none'}; required: {', '.join(REQUIRED_COLUMNS)})"
                    )
                dupes = sorted({c for c in header if header.count(c) > 1})
                if dupes:
                    raise ValueError(f"{p}: duplicate column(s): {', '.join(dupes)}")
                continue
            line = reader.line_num
            if len(record) > len(header):
                raise ValueError(f"{p} line {line}: {len(record)} fields, header has {len(header)}")
            record = record + [""] * (len(header) - len(record))
            row: dict[str, Any] = {h: v.strip() for h, v in zip(header, record, strict=True)}
            if not row["method"]:
                raise ValueError(f"{p} line {line}: empty method name")
            for c in _NUMERIC_COLUMNS:
                v = _to_number(row[c])
                if v is None:
                    raise ValueError(f"{p} line {line}: column {c!r} is not a number: {row[c]!r}")
                row[c] = int(v) if c == "size_bytes" and float(v).is_integer() else v
            rows.append(row)
    if header is None:
        raise ValueError(f"{p}: empty file (expected a header with {', '.join(REQUIRED_COLUMNS)})")
    if not rows:
        raise ValueError(f"{p}: no data rows")
    return rows


# --------------------------------------------------------------------------------------------- CLI


def add_select_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of ``lowbit select`` to a (sub)parser; returns it."""
    p.add_argument("csv", type=Path, help="results CSV with columns method,size_bytes,latency_ms,accuracy")
    p.add_argument(
        "--lambdas", default="1,1,1", metavar="λS,λT,λA",
        help="weights of size, latency and accuracy in the objective (default 1,1,1)",
    )
    p.add_argument("--baseline", default=None, metavar="NAME",
                   help="method name of the float baseline (default: the first row)")
    p.add_argument(
        "--paper-sign", action="store_true",
        help="use the seed study's accuracy term +(A-A0)/A0 (rewards accuracy loss) instead of (A0-A)/A0",
    )
    p.add_argument("--include-baseline", action="store_true",
                   help="let the float baseline win when every quantized model scores worse")
    p.add_argument("--report", type=Path, default=None, metavar="DIR",
                   help="also write results.csv/json, pareto.png and index.html into DIR")
    return p


def cli_select(args: argparse.Namespace) -> int:
    """Run ``lowbit select``: print the scored table and ``chosen: NAME (L=...)``.

    Returns 0 on success, 2 (with the message on stderr) for bad input.
    """
    from lowbit.report import format_table, write_report

    try:
        lam = getattr(args, "lambdas", "1,1,1")
        lam = lam if isinstance(lam, Lambdas) else Lambdas.parse(lam)  # '' is an error, not 1,1,1
        rows = read_csv(args.csv)
        paper_sign = bool(getattr(args, "paper_sign", False))
        scored = score(rows, baseline=getattr(args, "baseline", None), lambdas=lam, paper_sign=paper_sign)
        best = choose(scored, include_baseline=bool(getattr(args, "include_baseline", False)))
    except (OSError, ValueError, csv.Error) as e:
        print(f"lowbit select: error: {e}", file=sys.stderr)
        return 2
    acc_term = "(A-A0)/A0  [seed study's sign]" if paper_sign else "(A0-A)/A0"
    print(f"objective: L = {lam.size:g}*(S-S0)/S0 + {lam.time:g}*(T-T0)/T0 + {lam.acc:g}*{acc_term}")
    print(format_table(scored, best["method"]))
    print(f"chosen: {best['method']} (L={best['L']:.2f})")
    if best["is_baseline"]:
        print("note: the float baseline scores lower than every quantized model; keep the float model")
    elif best["L"] > 0:
        print("note: every quantized model scores worse than the float baseline (L > 0)")
    report_dir = getattr(args, "report", None)
    if report_dir is not None:
        try:
            paths = write_report(
                scored, report_dir, best["method"], lam,
                {"source": str(args.csv)}, paper_sign=paper_sign,
            )
        except (OSError, ValueError) as e:
            print(f"lowbit select: error writing report: {e}", file=sys.stderr)
            return 2
        print(f"report: {paths['html']}")
    return 0


def _main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowbit select", description="Choose a method by the objective L.")
    p = add_select_arguments(parser)
    return cli_select(p.parse_args(None if argv is None else list(argv)))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
