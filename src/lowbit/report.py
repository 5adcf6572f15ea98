"""Reporting measured results: a plain-text table, the Pareto front, a plot and an HTML report.

Rows are the dicts that :func:`lowbit.select.score` returns (``method, size_bytes, latency_ms,
accuracy``, ``L``, ``is_baseline`` and any extra keys such as ``backend``, ``threads``,
``batch_size``, ``note``). The baseline is the row flagged ``is_baseline`` (else the first row,
unless a ``baseline=`` name is passed).

Accuracy may be a fraction (0.9918) or a percentage (99.18): when every accuracy is ≤ 1 it is shown
×100; ΔA is in percentage points. Sizes are shown in KiB (1024 bytes). The report is written
atomically as a folder (see :func:`write_report`), and the plot is drawn on a
private ``matplotlib.figure.Figure`` with the Agg canvas, so pyplot's global state is never touched.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lowbit import files
from lowbit.select import REQUIRED_COLUMNS, Lambdas, baseline_index

__all__ = [
    "OPTIONAL_COLUMNS",
    "format_table",
    "pareto_front",
    "plot_pareto",
    "write_report",
    "objective_formula",
]

#: Extra columns shown by :func:`format_table` (and in the HTML table) when a row has them.
OPTIONAL_COLUMNS: tuple[str, ...] = ("mul", "backend", "threads", "batch_size", "quantize_s", "note")

_DEFAULT_TITLE = "Accuracy vs latency (marker area ∝ file size)"
_META_ORDER = (
    "model", "dataset", "machine", "cpu", "threads", "batch_size", "backend", "kernel_backend", "repeats",
    "date", "lowbit_version", "torch_version",
)


# ------------------------------------------------------------------------------------------ helpers


def _num(v: Any) -> float | None:
    """A finite float from an int/float or a numeric string, else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        f = float(v)
    elif isinstance(v, str):
        try:
            f = float(v.strip().rstrip("%"))
        except ValueError:
            return None
    else:
        return None
    return f if math.isfinite(f) else None


def _acc_scale(rows: Sequence[Mapping[str, Any]]) -> float:
    """100 when accuracies look like fractions (all ≤ 1), else 1 (already in %)."""
    accs = [a for a in (_num(r.get("accuracy")) for r in rows) if a is not None]
    return 100.0 if accs and max(accs) <= 1.0 else 1.0


def _fmt_ms(v: float) -> str:
    if abs(v) >= 100:
        return f"{v:.1f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _fmt_ratio(v: float | None, base: float | None) -> str:
    if v is None or base is None or base == 0:
        return "-"
    return f"{v / base:.2f}×"


def _fmt_extra(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 100_000:  # operation counts
        return f"{v / 1e6:.3g}M"
    return str(v)


def _check_chosen(rows: Sequence[Mapping[str, Any]], chosen: str | None) -> None:
    if chosen is not None and all(str(r.get("method")) != chosen for r in rows):
        known = ", ".join(str(r.get("method")) for r in rows)
        raise ValueError(f"chosen method {chosen!r} is not among the rows: {known}")


def _table_cells(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None,
    baseline: str | None,
) -> tuple[list[str], list[bool], list[list[str]], int]:
    """Headers, right-align flags, cell strings per row, and the baseline's index."""
    b = baseline_index(rows, baseline)
    base = rows[b]
    s0, t0, a0 = (_num(base.get(k)) for k in ("size_bytes", "latency_ms", "accuracy"))
    scale = _acc_scale(rows)
    extras = [c for c in (OPTIONAL_COLUMNS if columns is None else columns) if any(c in r for r in rows)]
    headers = ["method", "size KiB", "size ×", "latency ms", "latency ×", "acc %", "ΔA pp", "L", *extras]
    right = [False, True, True, True, True, True, True, True] + [False] * len(extras)
    body: list[list[str]] = []
    for r in rows:
        s, t, a = (_num(r.get(k)) for k in ("size_bytes", "latency_ms", "accuracy"))
        lv = _num(r.get("L"))
        cells = [
            str(r.get("method", "?")),
            "?" if s is None else f"{s / 1024:.1f}",
            _fmt_ratio(s, s0),
            "?" if t is None else _fmt_ms(t),
            _fmt_ratio(t, t0),
            "?" if a is None else f"{a * scale:.2f}",
            "-" if a is None or a0 is None else f"{(a - a0) * scale:+.2f}",
            "-" if lv is None else f"{lv:.2f}",
            *(_fmt_extra(r.get(c)) for c in extras),
        ]
        body.append(cells)
    return headers, right, body, b


# ------------------------------------------------------------------------------------------- table


def format_table(
    rows: Sequence[Mapping[str, Any]],
    chosen: str | None,
    columns: Sequence[str] | None = None,
    *,
    baseline: str | None = None,
) -> str:
    """An aligned plain-text table of the results, one line per row in the given order.

    Columns: method, size in KiB and × of the baseline, latency in ms and × of the baseline, accuracy
    in %, ΔA (percentage points against the baseline), L (2 decimals, ``-`` when not scored), then the
    extra ``columns`` (default :data:`OPTIONAL_COLUMNS`) that at least one row has. The chosen row is
    marked with a leading ``*`` and a trailing ``← chosen``, the baseline with ``(baseline)``.
    """
    if not rows:
        raise ValueError("no result rows")
    _check_chosen(rows, chosen)
    headers, right, body, b = _table_cells(rows, columns, baseline)
    widths = [max(len(h), *(len(c[j]) for c in body)) for j, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)]
        return "  ".join(parts).rstrip()

    out = ["  " + line(headers), "  " + "  ".join("-" * w for w in widths)]
    for i, (r, cells) in enumerate(zip(rows, body, strict=True)):
        is_chosen = chosen is not None and str(r.get("method")) == chosen
        tags = [t for t, on in (("(baseline)", i == b), ("← chosen", is_chosen)) if on]
        text = ("* " if is_chosen else "  ") + line(cells)
        out.append(text + ("  " + " ".join(tags) if tags else ""))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ pareto


def pareto_front(rows: Sequence[Mapping[str, Any]], include_size: bool = True) -> list[str]:
    """Methods not dominated by any other row, in input order.

    Row *q* dominates *p* when it is no worse on every criterion — latency (lower), accuracy (higher)
    and, with ``include_size``, file size (lower) — and strictly better on at least one. Rows with
    identical measurements do not dominate each other, so both stay on the front.
    """
    pts: list[tuple[str, tuple[float, ...]]] = []
    for r in rows:
        t, a, s = (_num(r.get(k)) for k in ("latency_ms", "accuracy", "size_bytes"))
        if t is None or a is None or (include_size and s is None):
            raise ValueError(f"row {r.get('method', '?')!s} lacks numeric latency_ms/accuracy/size_bytes")
        # all criteria as "lower is better"
        pts.append((str(r.get("method")), (t, -a, s) if include_size else (t, -a)))  # type: ignore[arg-type]

    def dominates(q: tuple[float, ...], p: tuple[float, ...]) -> bool:
        return all(x <= y for x, y in zip(q, p, strict=True)) and any(
            x < y for x, y in zip(q, p, strict=True)
        )

    return [m for m, p in pts if not any(dominates(q, p) for _, q in pts)]


def _render_pareto_png(
    rows: Sequence[Mapping[str, Any]],
    chosen: str | None,
    title: str,
    baseline: str | None,
) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    if not rows:
        raise ValueError("no result rows to plot")
    _check_chosen(rows, chosen)
    b = baseline_index(rows, baseline)
    scale = _acc_scale(rows)
    methods = [str(r.get("method")) for r in rows]
    xs, ys, sizes = [], [], []
    for r in rows:
        t, a, s = (_num(r.get(k)) for k in ("latency_ms", "accuracy", "size_bytes"))
        if t is None or a is None or s is None:
            raise ValueError(f"row {r.get('method', '?')!s} lacks numeric latency_ms/accuracy/size_bytes")
        xs.append(t)
        ys.append(a * scale)
        sizes.append(s)
    front3 = set(pareto_front(rows, include_size=True))
    front2 = set(pareto_front(rows, include_size=False))

    fig = Figure(figsize=(8.5, 5.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    positive = [x for x in xs if x > 0]
    if positive and len(positive) == len(xs) and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        # label the minor ticks 2·10^k and 5·10^k only, so they do not collide
        ax.xaxis.set_minor_formatter(
            FuncFormatter(lambda v, _pos: f"{v:g}" if f"{v:.0e}"[0] in "25" else "")
        )

    smax = max(sizes) or 1.0
    areas = [max(1400.0 * s / smax, 12.0) for s in sizes]  # points², proportional to file size
    # big markers first so small ones stay visible on top
    order = sorted(range(len(rows)), key=lambda i: -areas[i])
    for i in order:
        is_base, is_chosen, on_front = i == b, methods[i] == chosen, methods[i] in front3
        color = "0.55" if is_base else ("tab:red" if is_chosen else "tab:blue")
        ax.scatter(
            [xs[i]], [ys[i]], s=areas[i], marker="s" if is_base else "o", c=color,
            alpha=0.85 if is_chosen else 0.55,
            edgecolors="black" if on_front or is_chosen else "none",
            linewidths=2.0 if is_chosen else (1.0 if on_front else 0.0), zorder=3 if is_chosen else 2,
        )
    # the (latency, accuracy) Pareto front as a step line: best accuracy reachable within a latency
    fr = sorted({(xs[i], ys[i]) for i in range(len(rows)) if methods[i] in front2})
    if fr:
        fx = [p[0] for p in fr] + [max(xs)]
        fy = [p[1] for p in fr] + [fr[-1][1]]
        ax.step(fx, fy, where="post", color="tab:green", lw=1.5, ls="-", zorder=1)
    ax.axhline(ys[b], color="0.6", lw=0.8, ls=":", zorder=0)
    ax.axvline(xs[b], color="0.6", lw=0.8, ls=":", zorder=0)

    ax.margins(0.15)
    ax.autoscale_view()
    lo, hi = ax.get_ylim()
    if max(ys) <= 100.0 and hi > 100.5:  # accuracy cannot exceed 100 %
        ax.set_ylim(lo, 100.5)
    # labels: points that fall on (nearly) the same pixel get their labels stacked
    pix = ax.transData.transform(list(zip(xs, ys, strict=True)))
    placed: list[tuple[float, float]] = []
    for i in sorted(range(len(rows)), key=lambda k: (xs[k], -ys[k])):
        px, py = pix[i]
        k = sum(1 for qx, qy in placed if abs(qx - px) < 160 and abs(qy - py) < 12)
        placed.append((px, py))
        label = methods[i] + (" (baseline)" if i == b else "") + (" ← chosen" if methods[i] == chosen else "")
        ax.annotate(
            label, (xs[i], ys[i]), xytext=(math.sqrt(areas[i]) / 2 + 3, 4 - 13 * k),
            textcoords="offset points", fontsize=9, va="center",
            fontweight="bold" if methods[i] == chosen else "normal", zorder=4,
        )
    ax.set_xlabel("latency, ms" + (" (log scale)" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel("accuracy, %")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    handles = [
        Line2D([], [], marker="s", ls="", color="0.55", markersize=9, label="baseline (float)"),
        Line2D([], [], marker="o", ls="", color="tab:blue", alpha=0.6, markersize=9, label="quantized"),
        Line2D([], [], marker="o", ls="", color="tab:red", markeredgecolor="black", markeredgewidth=2,
               markersize=9, label="chosen"),
        Line2D([], [], marker="o", ls="", color="white", markeredgecolor="black", markersize=9,
               label="Pareto (latency, accuracy, size)"),
        Line2D([], [], color="tab:green", lw=1.5, label="Pareto front (latency, accuracy)"),
    ]
    ax.legend(handles=handles, loc="best", fontsize=8, framealpha=0.85)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_pareto(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    chosen: str | None = None,
    title: str = _DEFAULT_TITLE,
    *,
    baseline: str | None = None,
) -> Path:
    """Plot accuracy (y) against latency in ms (x) and save a PNG at ``path`` (written atomically).

    Marker area is proportional to file size; every point is labelled; the baseline is a grey square
    with dotted guide lines; the chosen method is red with a thick outline; points on the
    (latency, accuracy, size) Pareto front have a black outline and the (latency, accuracy) front is
    drawn as a step line. The x axis is logarithmic when latencies span more than 20×.
    """
    return files.write_bytes(path, _render_pareto_png(rows, chosen, title, baseline))


# ------------------------------------------------------------------------------------------ report


def _as_lambdas(lam: Any) -> Lambdas:
    """A Lambdas from a Lambdas (also one from a second import of the module), a "λS,λT,λA" string
    or three numbers."""
    if isinstance(lam, Lambdas):
        return lam
    if isinstance(lam, str):
        return Lambdas.parse(lam)
    if all(hasattr(lam, a) for a in ("size", "time", "acc")):
        return Lambdas(lam.size, lam.time, lam.acc)
    if isinstance(lam, Sequence) and len(lam) == 3:
        return Lambdas(*lam)
    raise TypeError(f"lambdas must be a Lambdas, got {lam!r}")


def objective_formula(lambdas: Lambdas, paper_sign: bool = False) -> str:
    """The objective with the λ values filled in, as plain text."""
    lambdas = _as_lambdas(lambdas)
    acc = "(A − A0)/A0" if paper_sign else "(A0 − A)/A0"
    return (
        f"L = {lambdas.size:g}·(S − S0)/S0 + {lambdas.time:g}·(T − T0)/T0 + {lambdas.acc:g}·{acc}"
    )


def _jsonable(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, str | int | bool):
        return v
    if isinstance(v, Path):
        return str(v)
    item = getattr(v, "item", None)  # numpy / torch scalars
    if callable(item):
        with contextlib.suppress(Exception):
            return _jsonable(item())
    return str(v)


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, Mapping | list | tuple):
        return json.dumps(_jsonable(v), ensure_ascii=False)
    return str(v)


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    cols: list[str] = [*REQUIRED_COLUMNS]
    if any("L" in r for r in rows):
        cols.append("L")
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(str(k))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([_csv_cell(r.get(c)) for c in cols])
    return buf.getvalue()


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 70em;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.92em; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #ddd; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.chosen td { background: #ffe9e6; font-weight: 600; }
tr.baseline td { color: #555; font-style: italic; }
table.meta th { background: none; font-weight: 600; }
code { background: #f5f5f5; padding: 0.15em 0.35em; }
.chosen-line { font-size: 1.1em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
footer { margin-top: 2em; color: #777; font-size: 0.85em; }
""".strip()


def _html_results_table(
    rows: Sequence[Mapping[str, Any]], chosen: str | None, baseline: str | None
) -> str:
    headers, right, body, b = _table_cells(rows, None, baseline)
    e = html.escape
    out = ['<table class="results">', "<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers)
           + "<th></th></tr></thead>", "<tbody>"]
    for i, (r, cells) in enumerate(zip(rows, body, strict=True)):
        is_chosen = chosen is not None and str(r.get("method")) == chosen
        cls = " ".join(c for c, on in (("baseline", i == b), ("chosen", is_chosen)) if on)
        tags = " ".join(t for t, on in (("baseline", i == b), ("← chosen", is_chosen)) if on)
        tds = "".join(
            f'<td class="num">{e(c)}</td>' if rt else f"<td>{e(c)}</td>"
            for c, rt in zip(cells, right, strict=True)
        )
        attr = f' class="{e(cls)}"' if cls else ""
        out.append(f"<tr{attr}>{tds}<td>{e(tags)}</td></tr>")
    out += ["</tbody>", "</table>"]
    return "\n".join(out)


def _html_meta_table(meta: Mapping[str, Any]) -> str:
    e = html.escape
    keys = [k for k in _META_ORDER if k in meta] + [k for k in meta if k not in _META_ORDER]
    if not keys:
        return "<p>(no metadata)</p>"
    trs = []
    for k in keys:
        v = meta[k]
        if isinstance(v, Mapping | list | tuple):
            text = json.dumps(_jsonable(v), ensure_ascii=False)
        else:
            text = str(v)
        trs.append(f"<tr><th>{e(str(k).replace('_', ' '))}</th><td>{e(text)}</td></tr>")
    return '<table class="meta">\n' + "\n".join(trs) + "\n</table>"


def _html_page(
    rows: Sequence[Mapping[str, Any]],
    chosen: str | None,
    lambdas: Lambdas,
    meta: Mapping[str, Any],
    png: bytes,
    baseline_name: str,
    paper_sign: bool,
) -> str:
    e = html.escape
    title = "lowbit report" + (f" — {meta['model']}" if "model" in meta else "")
    chosen_row = next((r for r in rows if str(r.get("method")) == chosen), None)
    if chosen_row is None:
        chosen_html = "<p class=\"chosen-line\">No method chosen.</p>"
    else:
        lv = _num(chosen_row.get("L"))
        lt = "" if lv is None else f" (L = {lv:.2f})"
        chosen_html = f'<p class="chosen-line">Chosen: <strong>{e(str(chosen))}</strong>{e(lt)}</p>'
    sign_note = (
        "The accuracy term uses the seed study's printed sign +(A − A0)/A0, which rewards losing accuracy."
        if paper_sign
        else "Losing accuracy is penalized: the accuracy term is (A0 − A)/A0."
    )
    b64 = base64.b64encode(png).decode("ascii")
    alt = "accuracy vs latency; marker area proportional to file size"
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title>
<style>
{_CSS}
</style>
</head>
<body>
<h1>{e(title)}</h1>
{chosen_html}
<h2>Setup</h2>
{_html_meta_table(meta)}
<h2>Objective</h2>
<p><code>{e(objective_formula(lambdas, paper_sign))}</code></p>
<p>S: file size, T: latency, A: accuracy; S0, T0, A0 are the baseline's
(<strong>{e(baseline_name)}</strong>). Lower L is better; the baseline scores 0.
λ = ({e(str(lambdas))}) for (size, time, accuracy). {e(sign_note)}</p>
<h2>Results</h2>
{_html_results_table(rows, chosen, baseline_name)}
<h2>Accuracy vs latency</h2>
<p><img src="data:image/png;base64,{b64}" alt="{e(alt)}"></p>
<footer>Generated by lowbit on {e(generated)}.</footer>
</body>
</html>
"""


def write_report(
    rows: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    chosen: str | None,
    lambdas: Lambdas,
    meta: Mapping[str, Any],
    *,
    baseline: str | None = None,
    paper_sign: bool = False,
) -> dict[str, Path]:
    """Write the full report as the folder ``out_dir``, atomically: the files are written into a
    temporary folder that then replaces ``out_dir`` as a whole (:func:`lowbit.files.write_tree`; files
    of the user's in ``out_dir`` are kept). An interrupted run leaves the previous report intact.

    - ``results.csv``: all columns (required ones, then ``L``, then the rest in first-seen order),
      the baseline row first;
    - ``results.json``: ``{"meta", "lambdas", "chosen", "results"}`` plus ``baseline``, ``objective``
      and ``paper_sign`` (non-finite floats become null);
    - ``pareto.png``: see :func:`plot_pareto`;
    - ``index.html``: self-contained (the PNG inlined as a base64 data URI), with the metadata (model,
      dataset, machine, threads, batch size, backend, date, …), the objective with the λ values and
      the results table; every string is HTML-escaped.

    The baseline is ``baseline`` by name, else the row flagged ``is_baseline``, else the first row.
    Returns ``{"csv", "json", "png", "html"}`` → paths.
    """
    if not rows:
        raise ValueError("no result rows to report")
    lambdas = _as_lambdas(lambdas)
    _check_chosen(rows, chosen)
    out = Path(out_dir)
    b = baseline_index(rows, baseline)
    ordered = [dict(rows[b])] + [dict(r) for i, r in enumerate(rows) if i != b]
    base_name = str(ordered[0].get("method"))
    names = {"csv": "results.csv", "json": "results.json", "png": "pareto.png", "html": "index.html"}
    doc = {
        "meta": _jsonable(dict(meta)),
        "lambdas": lambdas.as_dict(),
        "chosen": chosen,
        "baseline": base_name,
        "objective": objective_formula(lambdas, paper_sign),
        "paper_sign": paper_sign,
        "results": _jsonable(ordered),
    }
    png = _render_pareto_png(ordered, chosen, str(meta.get("title", _DEFAULT_TITLE)), base_name)
    contents = {
        "csv": _csv_text(ordered).encode("utf-8"),
        "json": (json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8"),
        "png": png,
        "html": _html_page(ordered, chosen, lambdas, meta, png, base_name, paper_sign).encode("utf-8"),
    }

    def fill(folder: Path) -> None:
        for key, data in contents.items():
            (folder / names[key]).write_bytes(data)

    files.write_tree(out, fill)
    paths = {key: out / name for key, name in names.items()}
    return paths
