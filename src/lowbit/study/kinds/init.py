"""``lowbit study init``: how the step initializer shapes learned-step quantization-aware training.

For every bit width × method × initializer × seed: start from the trained float model, initialize the
quantizers on a calibration batch drawn with the seed, train with lowbit's trainer (the seed also orders
the data), evaluate every ``--eval-every`` epochs, convert to the integer model and check it against the
fake-quant one. The report gives final accuracy (mean ± std over seeds), epochs to reach the float
accuracy minus ``--target-drop`` points, the integer model's agreement, a comparison of the adaptive
``mse`` initializer with each method's own, and accuracy-per-epoch curves (docs/methods.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from lowbit.cliargs import positive_float
from lowbit.study.core import (
    Results,
    add_common_arguments,
    add_model_arguments,
    epochs_to_target,
    fmt_mean_std,
    load_float,
    markdown_table,
    mean_std,
    plot_curves,
    run_grid,
    split_list,
    write_markdown,
)
from lowbit.study.registry import StudyKind, register_study

OWN = "own"
_DEFAULT_METHODS = "lsq,lsq_plus,apot"
_DEFAULT_INITS = "lsq,lsq_plus,mse,aciq"


@register_study
class InitStudy(StudyKind):
    name = "init"
    help = "step initializers (lsq, lsq_plus, mse, aciq, ...) of the learned-step methods: accuracy, epochs, spread"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_model_arguments(p, "small_cnn")
        p.add_argument("--bits", nargs="+", default=["4,4"], metavar="W,A", help="bit widths (default 4,4)")
        p.add_argument("--methods", default=_DEFAULT_METHODS, help=f"methods (default {_DEFAULT_METHODS})")
        p.add_argument("--inits", default=_DEFAULT_INITS,
                       help=f"initializers ('{OWN}': each method's own; default {_DEFAULT_INITS})")
        p.add_argument("--epochs", type=positive_float, default=1.0, help="training epochs per run (default 1)")
        p.add_argument("--eval-every", type=positive_float, default=0.1, help="evaluation interval in epochs")
        p.add_argument("--lr", type=positive_float, default=None, help="learning rate (default: the method's)")
        p.add_argument("--optimizer", default=None, choices=("adam", "sgd"), help="optimizer (default the method's)")
        p.add_argument("--batch-size", type=int, default=64, help="training batch size (default 64)")
        p.add_argument("--calib-samples", type=int, default=256, help="calibration batch size (default 256)")
        p.add_argument("--target-drop", type=float, default=0.5,
                       help="target accuracy = float accuracy minus this many points (default 0.5)")
        add_common_arguments(p, "report/study-init.md")

    # -------------------------------------------------------------------------------------------
    def run(self, args: argparse.Namespace) -> int:
        from lowbit.methods import get_method
        from lowbit.methods.qat import QATMethod, parse_bits
        from lowbit.quantizers import INITIALIZERS

        if args.quick:  # small data and few runs; methods and initializers the user named are kept
            args.data, args.model, args.bits = "digits", "small_cnn", ["4,4"]
            args.seeds, args.epochs, args.eval_every = min(args.seeds, 2), 0.2, 0.1
            args.methods = "lsq" if args.methods == _DEFAULT_METHODS else args.methods
            args.inits = "lsq,mse" if args.inits == _DEFAULT_INITS else args.inits
        methods, inits = split_list(args.methods), split_list(args.inits)
        bits = [parse_bits(b) for b in args.bits]
        for m in methods:
            if not issubclass(get_method(m), QATMethod):
                raise ValueError(f"{m!r} is not a learned-step (training-aware) method")
            for b in bits:
                get_method(m)(None, bits=b)  # bit widths outside the method's set fail before any work
        for i in inits:
            if i != OWN and i not in INITIALIZERS:
                raise ValueError(f"unknown initializer {i!r}; known: {OWN}, {', '.join(sorted(INITIALIZERS))}")
        out = Path(args.out)
        t0 = time.perf_counter()
        model, splits, float_acc = load_float(args)
        target = float_acc - args.target_drop
        key = {"study": "init", "model": args.model, "data": splits.name, "float_acc": float_acc,
               "epochs": args.epochs, "eval_every": args.eval_every, "lr": args.lr, "optimizer": args.optimizer,
               "batch_size": args.batch_size, "calib_samples": args.calib_samples}
        results = Results(args.results or out.with_suffix(".jsonl"), key)
        runs = [{"bits": list(b), "method": m, "init": i, "seed": s}
                for b in bits for m in methods for i in inits for s in range(args.seeds)]

        def one(rid: dict[str, Any]) -> dict[str, Any]:
            return _one_run(rid, model, splits, args)

        records = run_grid(runs, one, results, progress=not args.no_progress,
                           label=lambda r: f"W{r['bits'][0]}A{r['bits'][1]} {r['method']}/{r['init']} s{r['seed']}")
        body = _report(records, bits, methods, inits, float_acc, target, args, out)
        write_markdown(out, "Step initialization of learned-step quantization (`lowbit study init`)", args,
                       time.perf_counter() - t0, body, records=records, resumed=results.resumed)
        print(f"study written to {out}")
        return 0


def _one_run(rid: dict[str, Any], model: torch.nn.Module, splits: Any, args: argparse.Namespace) -> dict[str, Any]:
    import lowbit
    from lowbit.methods import get_method
    from lowbit.trainer import FitOptions, evaluate, fit

    seed = int(rid["seed"])
    torch.manual_seed(seed)
    x_train = splits.train.tensors[0]
    g = torch.Generator().manual_seed(seed)
    calib = x_train[torch.randperm(len(x_train), generator=g)[: args.calib_samples]]
    opts: dict[str, Any] = {"bits": tuple(rid["bits"]), "epochs": args.epochs, "eval_every": args.eval_every,
                            "batch_size": args.batch_size, "seed": seed, "threads": args.threads, "progress": False,
                            "device": args.device,
                            "calib_samples": args.calib_samples, "calib_batch_size": args.calib_samples}
    if rid["init"] != OWN:
        opts["init"] = rid["init"]
    for k in ("lr", "optimizer"):
        if getattr(args, k) is not None:
            opts[k] = getattr(args, k)
    cfg = get_method(rid["method"]).config_cls(**opts)
    dev = torch.device(args.device)
    qm = lowbit.qat.prepare(model, cfg, calib=calib).to(dev)
    acc0 = evaluate(qm, splits.test, dev)
    res = fit(qm, splits.train, splits.test, FitOptions.from_config(cfg))
    curve = [(0.0, acc0)] + [(r["epoch"], r["test_acc"]) for r in res.history]
    xt, yt = splits.test.tensors
    with torch.no_grad():
        pf = torch.cat([qm(xt[i:i + 1000].to(dev)).argmax(1).cpu() for i in range(0, len(yt), 1000)])
        qm.cpu()  # trained on --device; the integer model runs on lowbit's CPU kernels
        im = lowbit.qat.convert(qm)
        pi = torch.cat([im(xt[i:i + 1000]).argmax(1) for i in range(0, len(yt), 1000)])
    return {"curve": curve, "final_acc": curve[-1][1], "int_acc": 100.0 * float((pi == yt).float().mean()),
            "agreement": 100.0 * float((pf == pi).float().mean()), "train_time_s": res.time_s}


def _fmt_epochs(values: list[float | None], horizon: float) -> str:
    reached = [v for v in values if v is not None]
    if not reached:
        return f"not reached (> {horizon:g})"
    return f"{fmt_mean_std(reached, 2)} ({len(reached)}/{len(values)})"


def _report(records: list[dict[str, Any]], bits: list[tuple[int, int]], methods: list[str], inits: list[str],
            float_acc: float, target: float, args: argparse.Namespace, out: Path) -> str:
    parts = [f"Float model: {args.model} on {args.data}, test accuracy {float_acc:.2f}%; target = float − "
             f"{args.target_drop:g} pt = **{target:.2f}%**. {args.seeds} seed(s) per setting (the seed draws the "
             f"calibration batch of {args.calib_samples} training images the steps are initialized on and orders the "
             f"training data); {args.epochs:g} epoch(s) per run, evaluated every {args.eval_every:g} epoch on the "
             f"full test set. \"epochs to target\": mean ± std over the seeds that reached it (reached/seeds). "
             f"Integer: the converted model on lowbit's int8 kernels.", ""]
    for w, a in bits:
        sel = [r for r in records if tuple(r["id"]["bits"]) == (w, a)]
        parts += [f"## W{w}A{a}", ""]
        rows, cmp_rows = [], []
        for m in methods:
            for i in inits:
                rs = [r for r in sel if r["id"]["method"] == m and r["id"]["init"] == i]
                if not rs:
                    continue
                ett = [epochs_to_target(r["curve"], target) for r in rs]
                rows.append([m, i, fmt_mean_std([r["curve"][0][1] for r in rs]),
                             fmt_mean_std([r["final_acc"] for r in rs]), _fmt_epochs(ett, args.epochs),
                             fmt_mean_std([r["int_acc"] for r in rs]), f"{min(r['agreement'] for r in rs):.2f}",
                             len(rs)])
            own = own_init_key(m, inits)
            if "mse" in inits and own is not None:
                cmp_rows.append(_compare_row(m, own, sel, target, args.epochs))
        parts.append(markdown_table(["method", "init", "acc. after init %", "final acc. %", "epochs to target",
                                     "integer acc. %", "same prediction (min %)", "seeds"], rows))
        if cmp_rows:
            parts += ["", f"Adaptive `mse` init against the method's own (W{w}A{a}):", "",
                      markdown_table(["method", "own init", "epochs to target: own", "epochs to target: mse",
                                      "final acc. std: own", "final acc. std: mse", "fewer epochs", "lower spread"],
                                     cmp_rows)]
        for m in methods:
            groups = {i: [r["curve"] for r in sel if r["id"]["method"] == m and r["id"]["init"] == i] for i in inits}
            png = out.with_name(f"{out.stem}-w{w}a{a}-{m}.png")
            plot_curves({f"init={k}": v for k, v in groups.items() if v}, png,
                        f"{m} W{w}A{a}: test accuracy (mean ± std over seeds)", target)
            parts += ["", f"![{m} W{w}A{a}]({png.name})"]
        parts.append("")
    return "\n".join(parts)


def own_init_key(method: str, inits: list[str]) -> str | None:
    """Which of the study's ``inits`` stands for ``method``'s own initializer: ``own`` if given, else the
    method's default initializer by name; None when neither was run or the method's own is ``mse``."""
    from lowbit.methods import get_method

    if OWN in inits:
        return OWN
    default = get_method(method).default_init  # type: ignore[attr-defined]
    return default if default in inits and default != "mse" else None


def _compare_row(method: str, own: str, sel: list[dict[str, Any]], target: float, horizon: float) -> list[Any]:
    def of(init: str) -> tuple[list[float | None], list[float]]:
        rs = [r for r in sel if r["id"]["method"] == method and r["id"]["init"] == init]
        return [epochs_to_target(r["curve"], target) for r in rs], [r["final_acc"] for r in rs]

    e_own, f_own = of(own)
    e_mse, f_mse = of("mse")

    def mean_epochs(v: list[float | None]) -> float:
        return mean_std([x if x is not None else horizon * 2 for x in v])[0]  # unreached counts as 2x the horizon

    fewer = mean_epochs(e_mse) < mean_epochs(e_own)
    lower = mean_std(f_mse)[1] <= mean_std(f_own)[1]
    from lowbit.methods import get_method

    name = f"{OWN} ({get_method(method).default_init})" if own == OWN else own  # type: ignore[attr-defined]
    return [method, name, _fmt_epochs(e_own, horizon), _fmt_epochs(e_mse, horizon), f"{mean_std(f_own)[1]:.3f}",
            f"{mean_std(f_mse)[1]:.3f}", "yes" if fewer else "no", "yes" if lower else "no"]
