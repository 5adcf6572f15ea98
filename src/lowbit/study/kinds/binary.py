"""``lowbit study binary``: the straight-through sign against UBQ on small binary networks.

For every model × method × seed: start from the trained float model, build the fake-binary network
(:func:`lowbit.binary.prepare`; the seed draws the calibration batch and orders the data), train it with
the method's own schedule (``binary_ste``: every layer binary from the start; ``ubq``: gradual freezing,
one stage per binarized layer) for the same total number of epochs, evaluate every ``--eval-every``
epochs, convert to the packed execution form and check it against the fake-binary model. The report gives
final accuracy (mean ± std over seeds) of both forms, their agreement, whether UBQ has the higher mean and
the lower spread (the seed paper's claim on small nets), and accuracy-per-epoch curves.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from lowbit.cliargs import positive_float, positive_int
from lowbit.study.core import (
    Results,
    add_common_arguments,
    fmt_mean_std,
    markdown_table,
    mean_std,
    plot_curves,
    run_grid,
    split_list,
    write_markdown,
)
from lowbit.study.registry import StudyKind, register_study

_DEFAULT_METHODS = "binary_ste,ubq"
_DEFAULT_MODELS = "small_cnn,tiny_cnn16"


@register_study
class BinaryStudy(StudyKind):
    name = "binary"
    help = "binary networks: straight-through sign vs UBQ (gradual freezing) on small nets, mean ± std over seeds"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--models", default=_DEFAULT_MODELS, help=f"built-in models (default {_DEFAULT_MODELS})")
        p.add_argument("--data", default="mnist", help="dataset (default mnist)")
        p.add_argument("--data-dir", default=None, help="folder with the dataset files")
        p.add_argument("--checkpoint", default=None,
                       help="float checkpoint, with a single model (default lowbit's cache in runs/)")
        p.add_argument("--methods", default=_DEFAULT_METHODS, help=f"binary methods (default {_DEFAULT_METHODS})")
        p.add_argument("--epochs", type=positive_float, default=4.0,
                       help="total training epochs per run, every method alike (default 4); with gradual freezing "
                            "split evenly over the stages")
        p.add_argument("--freeze", default="own", choices=("own", "gradual", "none"),
                       help="freezing schedule: each method's own (default; binary_ste none, ubq gradual) or one "
                            "for all")
        p.add_argument("--train-samples", type=positive_int, default=None,
                       help="train on the first N training samples (a fixed subset, the same for every run)")
        p.add_argument("--eval-every", type=positive_float, default=0.5, help="evaluation interval in epochs")
        p.add_argument("--lr", type=positive_float, default=None, help="learning rate (default the method's)")
        p.add_argument("--batch-size", type=positive_int, default=64, help="training batch size (default 64)")
        p.add_argument("--calib-samples", type=positive_int, default=256, help="calibration batch size (default 256)")
        add_common_arguments(p, "report/study-binary.md")

    def run(self, args: argparse.Namespace) -> int:
        from lowbit.data import load_dataset
        from lowbit.methods import get_method
        from lowbit.methods.binary import BinaryMethod
        from lowbit.models import MODELS
        from lowbit.train import train_or_load
        from lowbit.trainer import evaluate

        if args.quick:  # small data, few runs; the methods the user named are kept
            args.data, args.models, args.seeds = "digits", "small_cnn", min(args.seeds, 2)
            args.epochs, args.eval_every = 1.0, 0.5
        methods, models = split_list(args.methods), split_list(args.models)
        for m in methods:
            if not issubclass(get_method(m), BinaryMethod):
                raise ValueError(f"{m!r} is not a binary-network method (binary_ste, ubq)")
        for name in models:
            if name not in MODELS:
                raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
        if args.checkpoint is not None and len(models) != 1:
            raise ValueError("--checkpoint is the float model of one model: give a single --models")
        out = Path(args.out)
        t0 = time.perf_counter()
        torch.set_num_threads(args.threads)
        splits = load_dataset(args.data, data_dir=args.data_dir, seed=0)
        if args.train_samples is not None:
            x, y = splits.train.tensors
            splits.train = torch.utils.data.TensorDataset(x[: args.train_samples], y[: args.train_samples])
        floats = {}
        for name in models:
            model, _, _ = train_or_load(name, args.data, data_dir=args.data_dir, checkpoint=args.checkpoint,
                                        progress=not args.no_progress)
            floats[name] = (model.eval(), evaluate(model, splits.test))
        key = {"study": "binary", "data": splits.name, "float_acc": {k: v[1] for k, v in floats.items()},
               "epochs": args.epochs, "freeze": args.freeze, "train_samples": len(splits.train),
               "eval_every": args.eval_every, "lr": args.lr, "batch_size": args.batch_size,
               "calib_samples": args.calib_samples}
        results = Results(args.results or out.with_suffix(".jsonl"), key)
        runs = [{"model": n, "method": m, "seed": s} for n in models for m in methods for s in range(args.seeds)]

        def one(rid: dict[str, Any]) -> dict[str, Any]:
            return _one_run(rid, floats[rid["model"]][0], splits, args)

        records = run_grid(runs, one, results, progress=not args.no_progress,
                           label=lambda r: f"{r['model']} {r['method']} s{r['seed']}")
        body = _report(records, models, methods, {k: v[1] for k, v in floats.items()}, args, out)
        write_markdown(out, "Binary networks: straight-through sign vs UBQ (`lowbit study binary`)", args,
                       time.perf_counter() - t0, body)
        print(f"study written to {out}")
        return 0


def _config(rid: dict[str, Any], model: torch.nn.Module, calib: torch.Tensor, args: argparse.Namespace) -> Any:
    """The fake-binary model of this run, its total epochs split evenly over its stages."""
    import lowbit.binary as lb

    opts: dict[str, Any] = {"epochs": args.epochs, "eval_every": args.eval_every, "batch_size": args.batch_size,
                            "seed": int(rid["seed"]), "threads": args.threads, "progress": False,
                            "device": args.device, "calib_samples": len(calib), "calib_batch_size": len(calib)}
    if args.freeze != "own":
        opts["freeze"] = args.freeze
    if args.lr is not None:
        opts["lr"] = args.lr
    qm = lb.prepare(model, rid["method"], calib=calib, **opts)
    if lb.binary_info(qm)["config"]["freeze"] == "gradual":
        torch.manual_seed(int(rid["seed"]))
        qm = lb.prepare(model, rid["method"], calib=calib, stage_epochs=(args.epochs / lb.stage_count(qm),), **opts)
    return qm


def _one_run(rid: dict[str, Any], model: torch.nn.Module, splits: Any, args: argparse.Namespace) -> dict[str, Any]:
    import lowbit.binary as lb

    seed = int(rid["seed"])
    torch.manual_seed(seed)
    x_train = splits.train.tensors[0]
    g = torch.Generator().manual_seed(seed)
    calib = x_train[torch.randperm(len(x_train), generator=g)[: args.calib_samples]]
    torch.manual_seed(seed)
    qm = _config(rid, model, calib, args)
    dev = torch.device(args.device)
    qm.to(dev)
    res = lb.train(qm, splits.train, splits.test, eval_every=args.eval_every, progress=False, device=args.device,
                   threads=args.threads)
    curve = [(float(r["epoch"]), float(r["test_acc"])) for r in res.history if r.get("test_acc") is not None]
    xt, yt = splits.test.tensors
    with torch.no_grad():
        pf = torch.cat([qm(xt[i:i + 1000].to(dev)).argmax(1).cpu() for i in range(0, len(yt), 1000)])
        qm.cpu()  # trained on --device; the packed model runs on lowbit's CPU kernels
        bm = lb.convert(qm)
        pi = torch.cat([bm(xt[i:i + 1000]).argmax(1) for i in range(0, len(yt), 1000)])
    return {"curve": curve, "final_acc": 100.0 * float((pf == yt).float().mean()),
            "int_acc": 100.0 * float((pi == yt).float().mean()),
            "agreement": 100.0 * float((pf == pi).float().mean()), "train_time_s": res.time_s,
            "stages": len(res.stages) or None}


def _report(records: list[dict[str, Any]], models: list[str], methods: list[str], float_acc: dict[str, float],
            args: argparse.Namespace, out: Path) -> str:
    parts = [f"Dataset {args.data} ({args.train_samples or 'all'} training samples), {args.seeds} seed(s) per "
             f"setting (the seed draws the {args.calib_samples}-image calibration batch and orders the training "
             f"data); {args.epochs:g} training epoch(s) per run for every method, from the trained float model; "
             f"freezing: {args.freeze} (own: binary_ste every layer binary from the start, ubq gradual with the epochs "
             "split evenly over its stages). Fake-binary: the trained network in PyTorch; packed: the converted "
             "model on lowbit's XNOR-popcount kernels (first and last layers int8); agreement: same prediction "
             "on the full test set.", ""]
    rows, verdict = [], []
    for name in models:
        means: dict[str, tuple[float, float]] = {}
        for m in methods:
            rs = [r for r in records if r["id"]["model"] == name and r["id"]["method"] == m]
            if not rs:
                continue
            means[m] = mean_std([r["int_acc"] for r in rs])
            rows.append([name, f"{float_acc[name]:.2f}", m, fmt_mean_std([r["final_acc"] for r in rs]),
                         fmt_mean_std([r["int_acc"] for r in rs]), f"{min(r['agreement'] for r in rs):.2f}",
                         f"{mean_std([r['train_time_s'] for r in rs])[0]:.0f}", len(rs)])
        if "ubq" in means and "binary_ste" in means:
            (mu, su), (ms, ss) = means["ubq"], means["binary_ste"]
            verdict.append([name, f"{mu - ms:+.2f}", "yes" if mu > ms else "no", f"{su:.2f} vs {ss:.2f}",
                            "yes" if su < ss else "no"])
    parts.append(markdown_table(["model", "float acc. %", "method", "fake-binary acc. %", "packed acc. %",
                                 "agreement (min %)", "train s/run", "seeds"], rows))
    if verdict:
        parts += ["", "UBQ against the straight-through sign (packed accuracy):", "",
                  markdown_table(["model", "mean difference (pt)", "UBQ higher mean", "std UBQ vs STE",
                                  "UBQ lower spread"], verdict)]
    for name in models:
        groups = {m: [r["curve"] for r in records if r["id"]["model"] == name and r["id"]["method"] == m]
                  for m in methods}
        png = out.with_name(f"{out.stem}-{name}.png")
        plot_curves({k: v for k, v in groups.items() if v}, png,
                    f"{name} binary on {args.data}: test accuracy (mean ± std over seeds)")
        parts += ["", f"![{name}]({png.name})"]
    return "\n".join(parts) + "\n"
