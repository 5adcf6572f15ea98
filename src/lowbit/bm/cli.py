"""``lowbit bm MODEL --data mnist``: convert a trained network to BM layer by layer, train, quantize to the
integer BM model, measure, save; over several seeds, with a results table (mean ± std) in Markdown.

Per seed: the float model (trained, or from its checkpoint ``runs/MODEL-DATA-seedS.pt``; with
``--checkpoint`` the same float model for every seed, the seeds then vary the BM training only), its test
accuracy, :func:`lowbit.bm.train_layerwise`, the float BM accuracy, then for each code width the integer
BM model (:func:`lowbit.bm.quantize_bm`), its accuracy, file size and operation count. The integer
model of the first seed and first code width is saved to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_commands", "run_bm"]


def _cpu_name() -> str:
    from lowbit.compare import _cpu_name as name

    return name()

_QUICK = {"data": "digits", "epochs_per_layer": 1, "finetune_epochs": 1, "batch_size": 32, "epochs": 4}
_FLAGS = {"data": "--data", "seed": "--seed", "seeds": "--seeds", "epochs": "--epochs", "layers": "--layers",
          "epochs_per_layer": "--epochs-per-layer", "finetune_epochs": "--finetune-epochs",
          "train_fraction": "--train-fraction", "lr": "--lr", "finetune_lr": "--finetune-lr",
          "batch_size": "--batch-size", "temperature": "--temperature", "code_bits": "--code-bits",
          "log_step_bits": "--log-step-bits", "threads": "--threads", "quick": "--quick"}
_DEFAULTS = {"seed": 0, "train_fraction": 1.0, "lr": 1e-3, "temperature": 0.0, "code_bits": "16,8"}
_BEGIN, _END = "<!-- lowbit-bm:{key} -->", "<!-- /lowbit-bm:{key} -->"


def _checkpoint(args: argparse.Namespace, seed: int) -> Path:
    if args.checkpoint:
        return Path(args.checkpoint)
    return Path(args.runs_dir) / f"{args.model}-{args.data}-seed{seed}.pt"


def _float_seed(args: argparse.Namespace, seed: int) -> int:
    """Seed of the float model (and its data split) BM seed ``seed`` starts from: its own, or with
    ``--checkpoint`` that checkpoint's (the first seed's if it must be trained) for every seed."""
    if not args.checkpoint:
        return seed
    path = Path(args.checkpoint)
    if path.exists():
        from lowbit.train import load_checkpoint

        return int(load_checkpoint(path)[1].get("seed", args.seed_list[0]))
    return args.seed_list[0]


def _one_seed(args: argparse.Namespace, seed: int, progress: bool) -> dict[str, Any]:
    import lowbit
    from lowbit.evaluate import accuracy
    from lowbit.io import file_size
    from lowbit.opcount import count_ops
    from lowbit.train import train_or_load

    from .training import BMTrainConfig, quantize_bm, train_layerwise

    t0 = time.perf_counter()
    fseed = _float_seed(args, seed)
    model, splits, meta = train_or_load(args.model, args.data, data_dir=args.data_dir, epochs=args.epochs, seed=fseed,
                                        checkpoint=_checkpoint(args, seed), progress=progress, threads=args.threads)
    float_acc = accuracy(model, splits.test)
    cfg = BMTrainConfig(layers=args.layers, epochs_per_layer=args.epochs_per_layer,
                        finetune_epochs=args.finetune_epochs, train_fraction=args.train_fraction, lr=args.lr,
                        finetune_lr=args.finetune_lr, batch_size=args.batch_size, temperature=args.temperature,
                        seed=seed, threads=args.threads)
    bm_model, hist = train_layerwise(model, splits, cfg, progress=progress)
    rec: dict[str, Any] = {"seed": seed, "float_seed": fseed, "float_acc": float_acc, "bm_acc": hist["bm_acc"],
                           "layers": hist["layers"],
                           "stages": hist["stages"], "bm_train_s": hist["time_s"], "integer": {}}
    calib = splits.calib.tensors[0]
    for bits in args.bits_list:
        q = quantize_bm(bm_model, calib, example_input=calib[:1], code_bits=bits, log_step_bits=args.log_step_bits)
        ops = count_ops(q, calib[:1])["total"]
        entry = {"acc": accuracy(q, splits.test), "size_bytes": file_size(q), "ops": ops}
        rec["integer"][bits] = entry
        if args.out and seed == args.seed_list[0] and bits == args.bits_list[0]:
            path = lowbit.save(q, args.out)
            rec["saved"] = str(path)
    rec["time_s"] = time.perf_counter() - t0
    rec["dataset"] = splits.summary()
    return rec


def _mean_std(vals: list[float]) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def summary_table(recs: list[dict[str, Any]], bits_list: list[int]) -> str:
    """Markdown: one row per seed, then mean ± std (test accuracy in %)."""
    head = ["seed", "float", "BM float", *(f"BM int{b}" for b in bits_list), "BM train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in recs:
        cells = [str(r["seed"]), f"{r['float_acc']:.2f}", f"{r['bm_acc']:.2f}",
                 *(f"{r['integer'][b]['acc']:.2f}" for b in bits_list), f"{r['bm_train_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["mean ± std", _mean_std([r["float_acc"] for r in recs]), _mean_std([r["bm_acc"] for r in recs]),
             *(_mean_std([r["integer"][b]["acc"] for r in recs]) for b in bits_list),
             f"{statistics.mean(r['bm_train_s'] for r in recs):.0f}"]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _report_section(args: argparse.Namespace, recs: list[dict[str, Any]], wall: float) -> str:
    import torch

    import lowbit

    key = _key(args)
    r0 = recs[0]
    ints = r0["integer"][args.bits_list[0]]
    ops = ints["ops"]
    stages = ", ".join(f"{s['stage']} {s['test_acc']:.2f}" for s in r0["stages"])
    return "\n".join([
        _BEGIN.format(key=key),
        f"### {args.model} on {args.data}, layers: {args.layers or 'all'}",
        "",
        f"Command: `{args.command_line}`",
        "",
        f"CPU: {_cpu_name()}; torch threads: {args.threads or torch.get_num_threads()}; machine load: shared "
        f"(other jobs running); wall time {wall / 60:.1f} min for {len(recs)} seed(s); lowbit {lowbit.__version__}.",
        "",
        f"Data: {r0['dataset']}. Converted layers, in order: {', '.join(r0['layers'])}.",
        "",
        (f"Float model: one checkpoint (seed {r0['float_seed']}) for every seed; the seeds vary the BM training "
         "(training subsets, shuffling)." if args.checkpoint else
         "Float model: one per seed (trained with that seed, or its checkpoint); the seeds vary both."),
        "",
        summary_table(recs, args.bits_list),
        "",
        f"Test accuracy in %. Stages of seed {r0['seed']} (test accuracy after each): {stages}.",
        f"Integer BM model (int{args.bits_list[0]} codes, seed {r0['seed']}): {ints['size_bytes']:,} bytes; per "
        f"sample {ops['mul']:,} multiplications (input quantization / output dequantization and non-BM ops only), "
        f"{ops['add']:,} additions, {ops['max']:,} maxima, {ops['lookup']:,} table look-ups, {ops['shift']:,} shifts.",
        _END.format(key=key),
    ])


def _key(args: argparse.Namespace) -> str:
    return f"{args.model}:{args.data}:{args.layers or 'all'}"


def write_report(path: str | os.PathLike[str], section: str, key: str) -> Path:
    """Insert or replace the section of ``key`` in the Markdown file ``path`` (atomic write)."""
    p = Path(path)
    text = p.read_text() if p.exists() else "# BM networks: results\n"
    b, e = _BEGIN.format(key=key), _END.format(key=key)
    if b in text and e in text:
        pre, rest = text.split(b, 1)
        _, post = rest.split(e, 1)
        text = pre + section + post
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    from lowbit import files

    p.parent.mkdir(parents=True, exist_ok=True)
    return files.write_text(p, text)


def run_bm(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    progress = not args.no_progress
    recs = []
    for seed in args.seed_list:
        rec = _one_seed(args, seed, progress)
        recs.append(rec)
        ints = ", ".join(f"int{b} {rec['integer'][b]['acc']:.2f}%" for b in args.bits_list)
        print(f"seed {seed}: float {rec['float_acc']:.2f}%, BM float {rec['bm_acc']:.2f}%, BM {ints} "
              f"({rec['time_s']:.0f} s)", flush=True)
    wall = time.perf_counter() - t0
    print()
    print(summary_table(recs, args.bits_list))
    if recs[0].get("saved"):
        print(f"\ninteger BM model (seed {recs[0]['seed']}, int{args.bits_list[0]} codes) saved to {recs[0]['saved']}")
    if args.report:
        path = write_report(args.report, _report_section(args, recs, wall), _key(args))
        print(f"report: {path}")
    if args.json:
        from lowbit import files

        files.write_text(args.json, json.dumps({"command": args.command_line, "cpu": _cpu_name(), "wall_s": wall,
                                               "records": recs}, indent=1, default=str))
    return 0


def _int_list(text: str, name: str, allowed: tuple[int, ...] | None = None) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} takes comma-separated integers, got {text!r}") from None
    if not vals or len(set(vals)) != len(vals):
        raise ValueError(f"{name} needs distinct values, got {text!r}")
    if allowed is not None and any(v not in allowed for v in vals):
        raise ValueError(f"{name} values must be in {allowed}, got {text!r}")
    return vals


def _command_line(args: argparse.Namespace) -> str:
    if sys.argv[1:2] == ["bm"]:
        return "lowbit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    parts = ["lowbit", "bm", args.model]
    for dest, flag in _FLAGS.items():
        v = getattr(args, dest, None)
        if v not in (None, False, _DEFAULTS.get(dest)):
            parts += [flag] if v is True else [flag, str(v)]
    return " ".join(shlex.quote(p) for p in parts)


def cmd_bm(args: argparse.Namespace) -> int:
    if args.quick:
        for k, v in _QUICK.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    for k, v in (("data", "mnist"), ("epochs_per_layer", 1), ("finetune_epochs", 2), ("batch_size", 64)):
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.seed_list = _int_list(args.seeds, "--seeds") if args.seeds else [args.seed]
    args.bits_list = _int_list(args.code_bits, "--code-bits", (8, 16))
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be >= 1")
    from lowbit.models import available_models

    if args.model not in available_models():
        raise ValueError(f"lowbit bm trains built-in models: {', '.join(available_models())}; for your own model "
                         "use the Python API (lowbit.bm.train_layerwise, lowbit.bm.quantize_bm)")
    args.command_line = _command_line(args)
    return run_bm(args)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bm", help="bipolar morphological network: convert, train, integer model, measure")
    p.add_argument("model", help="built-in model (small_cnn, resnet20, mobilenet)")
    p.add_argument("--data", default=None, help="dataset (default mnist; digits with --quick)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0, help="seed (split, initialization, shuffling)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds: one run each and mean ± std")
    p.add_argument("--epochs", type=int, default=None, help="float training epochs if no checkpoint exists")
    p.add_argument("--checkpoint", default=None, help="float checkpoint shared by every seed (default: one per seed, "
                   "runs/MODEL-DATA-seedS.pt)")
    p.add_argument("--runs-dir", default="runs", help="where per-seed float checkpoints go (default runs/)")
    p.add_argument("--layers", default=None, help="comma-separated layer names / patterns to convert (default all)")
    p.add_argument("--epochs-per-layer", type=int, default=None, help="training epochs after each conversion (1)")
    p.add_argument("--finetune-epochs", type=int, default=None, help="fine-tuning epochs at the end (2)")
    p.add_argument("--train-fraction", type=float, default=1.0, help="share of the training set per epoch (1.0)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the conversion stages (1e-3)")
    p.add_argument("--finetune-lr", type=float, default=None, help="fine-tuning learning rate (default lr / 2)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (64)")
    p.add_argument("--temperature", type=float, default=0.0, help="initial soft-max temperature (0: hard max)")
    p.add_argument("--code-bits", default="16,8", help="integer code widths to build and measure (default 16,8)")
    p.add_argument("--log-step-bits", type=int, default=None, help="log step 2^-f octave (default 4 / 8 by width)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for training (default: torch's)")
    p.add_argument("--out", default="bm.lowbit", help="file for the integer BM model (first seed, first width)")
    p.add_argument("--report", default=None, help="Markdown file to write the results section into")
    p.add_argument("--json", default=None, help="write all records as JSON")
    p.add_argument("--quick", action="store_true", help="digits, 1 epoch per stage: a smoke test")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_bm)
