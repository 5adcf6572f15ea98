"""``lowbit study w46``: the comparison of Trusov et al. (Mathematics 2024, 12, 651; methods.md §2) —
4.6-bit against the 4-bit (16 x 16 levels) and 8-bit (256 x 256 levels) versions of the same pipeline.

For every model × method × seed: start from the trained float model, draw the calibration batch with the
seed and quantize three times, one pipeline stage more each time — plain rounding, + layer-wise
correction (unlabelled calibration data), + gradual freezing (labelled training data; the seed also orders
it) — and measure the integer model's test accuracy after each, the file size and the bits per weight.
The report gives mean ± std over the seeds per stage and checks the paper's claim (4.6-bit ≥ the mean of
4-bit and 8-bit). With ``--speed-repeats`` > 0 it also times each model at batch 1 on one thread,
interleaved in one process: torch fp32, the 8-bit model on the int8 kernels and the 4.6-bit model, on the
AVX2 path (ISA capped) and on the best path of this CPU, and beside them the int8 peers of ``lowbit bench
models`` (torch.ao x86 and ONNX Runtime static QDQ, both on their own best ISA).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lowbit.cliargs import non_negative_int, positive_int
from lowbit.study.core import (
    Results,
    add_common_arguments,
    fmt_mean_std,
    markdown_table,
    mean_std,
    run_grid,
    split_list,
    write_markdown,
)
from lowbit.study.registry import StudyKind, register_study

_METHODS = ("w46", "w4", "w8")
_STAGES = ("rounding", "correction", "freezing")
#: The int8 peers timed beside the w8/w46 models (``lowbit bench models`` names -> row names) and how many
#: calibration images they calibrate on.
_PEERS = {"torch_ao_int8": "torch.ao int8", "ort_int8": "ONNX Runtime int8"}
_PEER_CALIB = 64


@register_study
class W46Study(StudyKind):
    name = "w46"
    help = "4.6-bit against 4-bit and 8-bit through the same pipeline: accuracy per stage, file size, speed"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--models", default="small_cnn,resnet20", help="built-in models (default small_cnn,resnet20)")
        p.add_argument("--methods", default=",".join(_METHODS),
                       help="which of w46,w4,w8 to run (default all three; a subset lets several processes share "
                            "a study: give each its own --results, then join the files and rerun with all)")
        p.add_argument("--data", default="mnist", help="dataset (default mnist)")
        p.add_argument("--data-dir", default=None, help="folder with the dataset files")
        p.add_argument("--checkpoint", default=None, help="float checkpoint (one model only; default lowbit's cache)")
        p.add_argument("--pair", default="25,21", help="the 4.6-bit level pair N_x,N_w (default 25,21)")
        p.add_argument("--correction-steps", type=non_negative_int, default=300,
                       help="stage 1: Adam steps per layer (default 300)")
        p.add_argument("--freeze-epochs", type=float, default=0.1,
                       help="stage 2: epochs of fine-tuning after each layer freezes (default 0.1)")
        p.add_argument("--train-samples", type=non_negative_int, default=0,
                       help="stage 2 trains on this many training samples, drawn with the seed (default 0: all)")
        p.add_argument("--calib-samples", type=positive_int, default=500, help="calibration samples (default 500)")
        p.add_argument("--speed-repeats", type=non_negative_int, default=50,
                       help="timed batch-1 calls per model and path (default 50; 0: no speed table)")
        add_common_arguments(p, "report/study-w46.md")

    def run(self, args: argparse.Namespace) -> int:
        from lowbit.data import load_dataset
        from lowbit.methods.w46 import check_pair, parse_pair
        from lowbit.train import train_or_load
        from lowbit.trainer import evaluate

        if args.quick:
            args.data, args.models, args.seeds = "digits", "small_cnn", min(args.seeds, 2)
            args.correction_steps, args.freeze_epochs = min(args.correction_steps, 20), min(args.freeze_epochs, 0.05)
            args.calib_samples, args.speed_repeats = min(args.calib_samples, 128), min(args.speed_repeats, 3)
        models = split_list(args.models)
        if not models:
            raise ValueError("--models is empty")
        if args.checkpoint is not None and len(models) != 1:
            raise ValueError("--checkpoint names one float model: give one model in --models")
        methods = _methods(args.methods)
        pair = parse_pair(args.pair)
        check_pair(*pair)
        if not args.freeze_epochs >= 0:
            raise ValueError(f"--freeze-epochs must be >= 0, got {args.freeze_epochs!r}")
        out = Path(args.out)
        t0 = time.perf_counter()
        torch.set_num_threads(args.threads)
        splits = load_dataset(args.data, data_dir=args.data_dir, seed=0)
        floats = {m: train_or_load(m, args.data, data_dir=args.data_dir, checkpoint=args.checkpoint,
                                   progress=not args.no_progress)[0] for m in models}
        float_acc = {m: evaluate(f, splits.test) for m, f in floats.items()}
        key = {"study": "w46", "data": splits.name, "float_acc": float_acc, "pair": list(pair),
               "correction_steps": args.correction_steps, "freeze_epochs": args.freeze_epochs,
               "train_samples": args.train_samples, "calib_samples": args.calib_samples}
        results = Results(args.results or out.with_suffix(".jsonl"), key)
        runs = [{"model": m, "method": meth, "seed": s} for m in models for meth in methods for s in range(args.seeds)]
        records = run_grid(runs, lambda rid: _one_run(rid, floats[rid["model"]], splits, pair, args), results,
                           progress=not args.no_progress, label=lambda r: f"{r['model']} {r['method']} s{r['seed']}")
        speed = {m: _speed(floats[m], splits, pair, args) for m in models} if args.speed_repeats else {}
        body = _report(records, models, float_acc, speed, pair, args)
        write_markdown(out, "4.6-bit against 4-bit and 8-bit, one pipeline (`lowbit study w46`)", args,
                       time.perf_counter() - t0, body, records=records, resumed=results.resumed)
        print(f"study written to {out}")
        return 0


def _methods(text: str) -> list[str]:
    """The methods of ``--methods``, checked (in the study's order)."""
    wanted = split_list(text)
    bad = [m for m in wanted if m not in _METHODS]
    if bad or not wanted:
        raise ValueError(f"--methods takes a subset of {','.join(_METHODS)}, got {text!r}")
    return [m for m in _METHODS if m in wanted]


def _options(method: str, pair: tuple[int, int], seed: int, args: argparse.Namespace, stage: str) -> dict[str, Any]:
    opts: dict[str, Any] = {"seed": seed, "progress": False, "threads": args.threads,
                            "device": getattr(args, "device", "cpu"),  # stage 1; stage 2 runs lowbit's CPU kernels
                            "calib_samples": args.calib_samples, "calib_batch_size": args.calib_samples,
                            "correction_steps": 0 if stage == "rounding" else args.correction_steps,
                            "freeze_epochs": args.freeze_epochs if stage == "freezing" else 0.0}
    if method == "w46":
        opts["pair"] = pair
    return opts


def _one_run(rid: dict[str, Any], model: torch.nn.Module, splits: Any, pair: tuple[int, int],
             args: argparse.Namespace) -> dict[str, Any]:
    import lowbit
    from lowbit.fileinfo import describe_file
    from lowbit.trainer import evaluate

    seed, method = int(rid["seed"]), rid["method"]
    x_train, y_train = splits.train.tensors
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x_train), generator=g)
    calib = x_train[perm[: args.calib_samples]]
    train = splits.train
    if args.train_samples:
        idx = perm[: args.train_samples]
        train = torch.utils.data.TensorDataset(x_train[idx], y_train[idx])
    rec: dict[str, Any] = {}
    for stage in _STAGES:
        if stage == "freezing" and args.freeze_epochs == 0:
            rec["acc_freezing"] = rec["acc_correction"]
            continue
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        # no test data for stage 2: its per-layer test accuracies are not reported, and on resnet20 they would
        # cost one full test-set pass per frozen layer
        data = {"train": train} if stage == "freezing" else {}
        qm = lowbit.quantize(model, method, calib=calib, **data, **_options(method, pair, seed, args, stage))
        rec[f"time_{stage}_s"] = time.perf_counter() - t0
        rec[f"acc_{stage}"] = evaluate(qm, splits.test)
        if stage == "correction":
            rec["correction"] = qm.lowbit_meta[method]["stages"].get("correction", [])
    with tempfile.TemporaryDirectory(prefix="lowbit-study-w46-") as tmp:
        info = describe_file(lowbit.save(qm, Path(tmp) / "m.lowbit"))
    rec.update(bytes=info["bytes"], bits_per_weight=info["bits_per_weight"],
               code_bits_per_weight=info["code_bits_per_weight"],
               fallbacks=sorted(qm.lowbit_meta[method].get("fallbacks", {})))
    return rec


def _speed(model: torch.nn.Module, splits: Any, pair: tuple[int, int], args: argparse.Namespace) -> dict[str, Any]:
    """Batch-1 latency (ms, median) of torch fp32 and the rounded w8 and w46 models, on the AVX2 path and
    on the best path, interleaved in this process. Each path runs its own copy of a model, so the per-shape
    plans (and the 4.6-bit dispatch choice) of one path are not rebuilt by the other's calls."""
    import lowbit
    from lowbit.bench.models import peer_runners
    from lowbit.evaluate import measure_latency
    from lowbit.graph import prepare
    from lowbit.kernels.native import active_isa, isa

    calib = splits.train.tensors[0][: args.calib_samples]
    x = splits.test.tensors[0][:1]
    q = {m: lowbit.quantize(model, m, calib=calib, **_options(m, pair, 0, args, "rounding")) for m in ("w8", "w46")}
    fp32 = prepare(model, x).gm.eval()
    best = active_isa()
    paths = ["avx2", best] if best != "avx2" else ["avx2"]

    def on(path: str, m: torch.nn.Module) -> Any:
        def call() -> Any:
            with isa(path):
                return m(x)
        return call

    runs: dict[str, Any] = {"torch fp32": lambda: fp32(x)}
    for path in paths:
        for name, m in q.items():
            runs[f"{name} {path}"] = on(path, copy.deepcopy(m))
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="lowbit-study-w46-peers-") as tmp:
        peer_calib = list(calib[:_PEER_CALIB].split(1))
        peers = peer_runners(model, list(_PEERS), peer_calib, x, tmp, 1, notes)
        runs.update({_PEERS[k]: (lambda f=f: f(x)) for k, f in peers.items()})
        lat = measure_latency(runs, 1, warmup=5, repeats=args.speed_repeats, threads=1)
    return {"paths": paths, "ms": {k: v.median_ms for k, v in lat.items()}, "notes": notes}


def _report(records: list[dict[str, Any]], models: list[str], float_acc: dict[str, float], speed: dict[str, Any],
            pair: tuple[int, int], args: argparse.Namespace) -> str:
    stage2 = (f"{args.freeze_epochs:g} epoch(s) of fine-tuning after each layer freezes"
              + (f" on {args.train_samples} training samples drawn with the seed" if args.train_samples
                 else " on the full training set")) if args.freeze_epochs else "off"
    parts = [f"Dataset {args.data}; 4.6-bit pair (N_x, N_w) = {pair}; w4 = 16 x 16 levels, w8 = 256 x 256 levels, "
             f"same pipeline. {args.seeds} seed(s) per setting: the seed draws the {args.calib_samples} calibration "
             f"images and orders the training data. Stage 1 (layer-wise correction): {args.correction_steps} Adam "
             f"steps per layer; stage 2 (gradual freezing): {stage2}. Accuracies: the integer model on lowbit's "
             "kernels, full test set, mean ± std over seeds.", ""]
    for model in models:
        sel = [r for r in records if r["id"]["model"] == model]
        parts += [f"## {model} (float {float_acc[model]:.2f}%)", ""]
        rows, final = [], {}
        for meth in _METHODS:
            rs = [r for r in sel if r["id"]["method"] == meth]
            if not rs:
                continue
            final[meth] = mean_std(r["acc_freezing"] for r in rs)[0]
            fb = sorted({f for r in rs for f in r["fallbacks"]})
            rows.append([meth, *(fmt_mean_std(r[f"acc_{s}"] for r in rs) for s in _STAGES),
                         f"{rs[0]['bytes']:,}", f"{rs[0]['bits_per_weight']:.2f}", ", ".join(fb) or "—", len(rs)])
        parts.append(markdown_table(["method", "rounding %", "+ correction %", "+ freezing %", "file bytes",
                                     "bits/weight", "int8 fall-backs", "seeds"], rows))
        if {"w46", "w4", "w8"} <= final.keys():
            bar = (final["w4"] + final["w8"]) / 2
            gap = final["w46"] - bar
            parts += ["", f"Claim (4.6-bit ≥ mean of 4-bit and 8-bit, final stage): {final['w46']:.2f}% against "
                          f"{bar:.2f}% — **{'met' if gap >= 0 else 'not met'}** ({gap:+.2f} pt)."]
        w8 = [r for r in sel if r["id"]["method"] == "w8"]
        w46 = [r for r in sel if r["id"]["method"] == "w46"]
        if w8 and w46:
            parts += ["", f"File size: w46 / w8 = {w46[0]['bytes'] / w8[0]['bytes']:.3f} (target ≤ 0.62)."]
        if model in speed:
            parts += ["", *_speed_table(speed[model])]
        parts.append("")
    return "\n".join(parts)


def _speed_table(sp: dict[str, Any]) -> list[str]:
    ms = sp["ms"]
    rows = [["torch fp32", "—", f"{ms['torch fp32']:.3f}", "—"]]
    for path in sp["paths"]:
        for name in ("w8", "w46"):
            rows.append([name, path, f"{ms[f'{name} {path}']:.3f}",
                         f"{ms[f'w8 {path}'] / ms[f'{name} {path}']:.2f}x"])
    best = sp["paths"][-1]
    peers = [name for name in _PEERS.values() if name in ms]
    w8 = ms[f"w8 {best}"]
    rows += [[n, "its own (best ISA)", f"{ms[n]:.3f}", f"{w8 / ms[n]:.2f}x (vs w8 {best})"] for n in peers]
    lines = ["Batch 1, one thread, interleaved, median (rounded models: speed does not depend on the stage):", "",
             markdown_table(["model", "kernel path", "latency ms", "speed vs w8 on the same path"], rows)]
    if peers:
        lines += ["", f"w46 on the {best} path against the int8 peers: "
                  + ", ".join(f"{ms[n] / ms[f'w46 {best}']:.2f}x {n}" for n in peers) + "."]
    return lines + [f"\nNote: {n}" for n in sp.get("notes", [])]
