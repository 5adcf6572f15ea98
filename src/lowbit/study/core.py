"""What every study shares: arguments, a results file to continue from, statistics over seeds, epochs to a
target accuracy, accuracy-per-epoch plots and the markdown write-up (command, CPU, threads, wall time)."""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import platform
import shlex
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from lowbit import files
from lowbit.cliargs import positive_int, training_device

__all__ = [
    "Results",
    "add_common_arguments",
    "add_model_arguments",
    "load_float",
    "split_list",
    "command_line",
    "environment",
    "epochs_to_target",
    "markdown_table",
    "mean_std",
    "fmt_mean_std",
    "plot_curves",
    "run_grid",
    "training_device",
    "write_markdown",
]

Curve = list[tuple[float, float]]


def add_model_arguments(p: argparse.ArgumentParser, model: str, data: str = "mnist") -> None:
    """``--model``, ``--data``, ``--data-dir``, ``--checkpoint``: the trained float model a study starts from."""
    p.add_argument("--model", default=model, help=f"built-in model (default {model})")
    p.add_argument("--data", default=data, help=f"dataset (default {data})")
    p.add_argument("--data-dir", default=None, help="folder with the dataset files")
    p.add_argument("--checkpoint", default=None, help="float checkpoint (default lowbit's cache in runs/)")


def load_float(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, float]:
    """The trained float model of the ``add_model_arguments`` options (trained and cached if missing), the
    dataset's splits and the model's test accuracy; sets the study's thread count first."""
    from lowbit.data import load_dataset
    from lowbit.train import train_or_load
    from lowbit.trainer import evaluate

    torch.set_num_threads(args.threads)
    splits = load_dataset(args.data, data_dir=args.data_dir, seed=0)
    model, _, _ = train_or_load(args.model, args.data, data_dir=args.data_dir, checkpoint=args.checkpoint,
                                progress=not args.no_progress)
    return model, splits, evaluate(model, splits.test)


def split_list(text: str) -> list[str]:
    """The non-empty items of a comma-separated option."""
    return [t.strip() for t in text.split(",") if t.strip()]


def add_common_arguments(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--seeds", type=positive_int, default=5, help="seeds per setting (default 5)")
    p.add_argument("--out", default=default_out, help=f"markdown report (default {default_out}); plots beside it")
    p.add_argument("--results", default=None,
                   help="results file (JSON lines) to continue an interrupted study from (default: OUT with .jsonl)")
    p.add_argument("--threads", type=positive_int, default=1, help="intra-op threads for every run (default 1)")
    p.add_argument("--device", type=training_device, default="cpu",
                   help="training device, e.g. cpu or cuda (default cpu); integer models always run on the CPU")
    p.add_argument("--quick", action="store_true", help="a tiny version that runs in seconds (for tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def command_line(args: argparse.Namespace) -> str:
    """The command as the user typed it (``lowbit ...``)."""
    argv = getattr(args, "argv", None)
    return shlex.join(["lowbit", *argv]) if argv else "lowbit study ..."


def environment() -> dict[str, Any]:
    from lowbit import __version__
    from lowbit.compare import _cpu_name

    return {"cpu": _cpu_name(), "machine": platform.machine(), "torch": torch.__version__, "lowbit": __version__,
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "load": os.getloadavg()[0],
            "cores": os.cpu_count()}


# ---------------------------------------------------------------------------------------- results

class Results:
    """Finished runs of one study, kept in a JSON-lines file (rewritten atomically after every run) so an
    interrupted study continues where it stopped. ``key``: what the runs depend on beyond their own
    settings (dataset, model, epochs, ...); a file written for another key is refused."""

    def __init__(self, path: str | Path, key: dict[str, Any]) -> None:
        self.path = Path(path)
        self.key = json.loads(json.dumps(key))
        self.records: list[dict[str, Any]] = []
        self.resumed = 0  # runs that run_grid found already done instead of running them
        if self.path.is_file():
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            try:
                head, *recs = [json.loads(ln) for ln in lines]
            except (json.JSONDecodeError, ValueError):
                raise ValueError(f"{self.path}: not a lowbit study results file") from None
            if head.get("study_key") != self.key:
                raise ValueError(f"{self.path} holds runs of another study setup ({head.get('study_key')}); "
                                 "remove it or give --results another file")
            self.records = recs

    def done(self, run_id: dict[str, Any]) -> dict[str, Any] | None:
        want = json.loads(json.dumps(run_id))
        for r in self.records:
            if r.get("id") == want:
                return r
        return None

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(json.loads(json.dumps(record)))
        text = "\n".join(json.dumps(x) for x in [{"study_key": self.key}, *self.records]) + "\n"
        files.write_text(self.path, text)


def run_grid(runs: Sequence[dict[str, Any]], fn: Callable[[dict[str, Any]], dict[str, Any]], results: Results,
             progress: bool = True, label: Callable[[dict[str, Any]], str] = str) -> list[dict[str, Any]]:
    """``fn(run_id) -> record`` for every run not yet in ``results`` (in order), each saved as it finishes."""
    from tqdm.auto import tqdm

    out = []
    bar = tqdm(runs, desc="study", unit="run", disable=not progress)
    for rid in bar:
        bar.set_postfix_str(label(rid))
        rec = results.done(rid)
        results.resumed += rec is not None
        if rec is None:
            t0 = time.perf_counter()
            rec = {"id": rid, **fn(rid)}
            rec.setdefault("time_s", time.perf_counter() - t0)
            results.add(rec)
        out.append(rec)
    return out


# ------------------------------------------------------------------------------------- statistics

def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    v = [float(x) for x in values]
    if not v:
        return math.nan, math.nan
    return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0


def fmt_mean_std(values: Iterable[float], digits: int = 2) -> str:
    v = list(values)
    if not v:
        return "—"
    m, s = mean_std(v)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def epochs_to_target(curve: Curve, target: float) -> float | None:
    """The first evaluation epoch at which the accuracy is at least ``target`` (None if never)."""
    for epoch, acc in curve:
        if acc is not None and acc >= target:
            return float(epoch)
    return None


# --------------------------------------------------------------------------------------- writing

def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def curve_ylim(means: Sequence[Sequence[float]], target: float | None = None) -> tuple[float, float]:
    """The accuracy axis of :func:`plot_curves`: zoomed on the upper three quarters of every mean curve, but
    always showing where each curve ends and the target."""
    lo = min(min(sorted(m)[len(m) // 4], m[-1]) for m in means)
    lo = min(lo, target) if target is not None else lo
    return max(0.0, lo - 0.5), min(100.0, max(max(m) for m in means) + 0.3)


def plot_curves(groups: dict[str, list[Curve]], path: Path, title: str, target: float | None = None,
                xlabel: str = "epoch", ylabel: str = "test accuracy (%)") -> Path:
    """Mean accuracy per evaluation point with a ±1 std band over the curves of each group; PNG, atomic."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    means: list[list[float]] = []
    for name, curves in groups.items():
        if not curves:
            continue
        n = min(len(c) for c in curves)
        xs = [curves[0][i][0] for i in range(n)]
        ms = [mean_std([c[i][1] for c in curves]) for i in range(n)]
        mean = [m for m, _ in ms]
        line = ax.plot(xs, mean, marker=".", label=name)[0]
        ax.fill_between(xs, [m - s for m, s in ms], [m + s for m, s in ms], color=line.get_color(), alpha=0.15)
        means.append(mean)
    if target is not None:
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:.2f}%")
    if means:
        ax.set_ylim(*curve_ylim(means, target))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return files.write_bytes(path, buf.getvalue())


def write_markdown(path: Path, title: str, args: argparse.Namespace, wall_s: float, body: str,
                   notes: Sequence[str] = (), records: Sequence[dict[str, Any]] = (), resumed: int = 0) -> Path:
    """The report: title, command, machine (CPU, cores, load average when written), wall time of this
    invocation and, given the ``records`` of the runs, their number, how many came from the results file of
    an earlier invocation (``resumed``) and the sum of their own times, then ``notes`` and ``body``."""
    env = environment()
    device = getattr(args, "device", "cpu")
    trained = "" if device == "cpu" else f"training on {torch.cuda.get_device_name(torch.device(device))}, "
    runs = ""
    if records:
        total = sum(float(r.get("time_s", 0.0)) for r in records) / 60
        runs = (f" {len(records)} runs ({resumed} taken from the results file of an earlier invocation); "
                f"the runs' own times add up to {total:.1f} min.")
    head = [f"# {title}", "", "```", command_line(args), "```", "",
            f"CPU: {env['cpu']} ({env['machine']}, {env['cores']} cores, load average {env['load']:.1f} when "
            f"written), {trained}{args.threads} thread(s) per run, one run at a time; torch {env['torch']}, lowbit "
            f"{env['lowbit']}; {env['date']}; wall time of this invocation {wall_s / 60:.1f} min.{runs}", ""]
    head += [*notes, ""] if notes else []
    return files.write_text(path, "\n".join(head) + body.rstrip() + "\n")
