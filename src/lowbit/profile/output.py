"""The profile as a text table (stdout), a markdown report and a PNG bar chart."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from .core import LayerProfile, ModelProfile

__all__ = ["format_profile", "markdown_profile", "plot_profile", "write_profile_report"]

_COLS = ("layer", "type", "shape", "kernel path", "ms", "%", "kernel ms", "GMAC/s", "bound", "bound ms", "x bound")


def _cells(r: LayerProfile, total: float) -> list[str]:
    gm = f"{r.gmacs:.1f}" if r.gmacs is not None else "-"
    xb = f"{r.x_bound:.1f}" if math.isfinite(r.x_bound) else "-"
    return [r.name, r.type, r.shape, r.path, f"{r.ms:.3f}", f"{100 * r.ms / total:.1f}" if total > 0 else "-",
            f"{r.kernel_ms:.3f}", gm, r.limit, f"{r.bound_ms:.3f}", xb]


def _summary(p: ModelProfile) -> list[str]:
    t = p.parts_ms
    load = "unknown" if math.isnan(p.load) else f"{100 * p.load:.0f}% of the CPU"
    share = (lambda v: f"{100 * v / t:.0f}%") if t > 0 else (lambda v: "-")
    return [
        f"{p.model}: input {p.input_shape}, {p.threads} thread(s), int8 path {p.isa}, runs {p.mode}; {p.cpu}",
        f"whole model {p.total_ms:.3f} ms (median of {p.repeats}, no instrumentation); layers + glue "
        f"{t:.3f} ms ({100 * (t / p.total_ms - 1):+.1f}%)" if p.total_ms > 0 else "whole model: not measured",
        f"native kernels {p.kernel_ms:.3f} ms ({share(p.kernel_ms)}), layer wrappers {p.layer_overhead_ms:.3f} ms "
        f"({share(p.layer_overhead_ms)}), glue between layers {p.glue_ms:.3f} ms ({share(p.glue_ms)})"
        + (f" [glue kernels: {', '.join(p.glue_paths)}]" if p.glue_paths else ""),
        f"ceilings: int8 GEMM peak {p.peak_gmacs:.1f} GMAC/s, copy bandwidth {p.copy_gbs:.1f} GB/s; "
        f"other processes used {load} while timing",
    ]


def format_profile(p: ModelProfile) -> str:
    """The summary lines, then one row per layer (slowest first)."""
    rows = [_cells(r, p.parts_ms) for r in sorted(p.layers, key=lambda r: -r.ms)]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(_COLS)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 4 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    out = _summary(p) + ["", line(_COLS), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def markdown_profile(p: ModelProfile, png_name: str | None = None) -> str:
    out = [f"# lowbit profile: {p.model}", ""] + [f"- {s}" for s in _summary(p)] + [""]
    if png_name:
        out += [f"![time per layer]({png_name})", ""]
    out += ["| " + " | ".join(_COLS) + " |", "|" + "---|" * len(_COLS)]
    out += ["| " + " | ".join(c.replace("|", "/") for c in _cells(r, p.parts_ms)) + " |" for r in p.layers]
    out += ["", "`x bound` = time / roofline bound (1.0: the layer runs at this CPU's ceiling); `bound` says which "
            "ceiling is higher for the layer: compute (MACs / int8 GEMM peak) or memory (bytes / copy bandwidth)."]
    return "\n".join(out) + "\n"


def plot_profile(p: ModelProfile) -> bytes:
    """PNG: one bar per layer in graph order (kernel time and the rest of the layer's time stacked), a tick
    at its roofline bound, and a bar for the glue between layers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [r.name for r in p.layers] + ["glue"]
    kern = [r.kernel_ms for r in p.layers] + [0.0]
    rest = [max(0.0, r.ms - r.kernel_ms) for r in p.layers] + [p.glue_ms]
    fig = Figure(figsize=(10, max(3.0, 0.22 * len(names) + 1.2)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    y = list(range(len(names)))
    ax.barh(y, kern, color="#3b75af", label="native kernel")
    ax.barh(y, rest, left=kern, color="#f0a04b", label="wrapper / glue")
    ax.scatter([r.bound_ms for r in p.layers], y[:-1], marker="|", s=120, color="black", label="roofline bound")
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms per forward (median)")
    ax.set_title(f"{p.model}: {p.total_ms:.2f} ms, {p.threads} thread(s), {p.isa}", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_profile_report(p: ModelProfile, folder: str | Path, inputs: tuple[str | Path, ...] = ()) -> Path:
    """``folder``/profile.md, profile.png and profile.json (written as a whole, atomically)."""
    from lowbit.files import write_tree

    def fill(tmp: Path) -> None:
        (tmp / "profile.png").write_bytes(plot_profile(p))
        (tmp / "profile.md").write_text(markdown_profile(p, "profile.png"), encoding="utf-8")
        (tmp / "profile.json").write_text(json.dumps(p.to_json(), indent=1), encoding="utf-8")

    return write_tree(folder, fill, inputs=inputs)
