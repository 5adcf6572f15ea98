"""The ``lowbit`` command."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lowbit import files
from lowbit.cliargs import add_threads, lambdas, non_negative_int, positive_int

EXIT_ERROR = 2

#: Modules that add their own subcommands: each defines ``add_commands(subparsers)``. A feature with a
#: command of its own is its module plus one line here (this file stays out of every feature's diff).
COMMAND_MODULES: tuple[str, ...] = (
    "lowbit.bench.cli",
    "lowbit.bm.cli",
    "lowbit.export.cli",
    "lowbit.profile.cli",
    "lowbit.qat.cli",
    "lowbit.study.cli",
)


# ---------------------------------------------------------------- shared helpers

def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits", help="dataset: digits (bundled), mnist, cifar10, ... (default digits)")
    p.add_argument("--data-dir", default=None, help="folder with the dataset files (else $LOWBIT_DATA, ../shared/data)")
    p.add_argument("--download", action="store_true", help="allow torchvision to download the dataset")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/calibration/test split")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="built-in model name (uses the checkpoint `lowbit train` wrote), "
                                 "a torch.export archive (.pt2), or package.module:function")
    p.add_argument("--checkpoint", default=None,
                   help="your checkpoint of a built-in model, used as is (never overwritten; trained and "
                        "written there only if the file does not exist). Default: lowbit's cache runs/MODEL-DATA.pt")
    p.add_argument("--weights-file", default=None, help="state_dict for a package.module:function model")
    p.add_argument("--epochs", type=non_negative_int, default=None,
                   help="epochs if a built-in model must be trained first")


def _inputs(args: argparse.Namespace) -> list[str]:
    """Files the command reads: never to be written."""
    model = getattr(args, "model", None)
    named = [getattr(args, k, None) for k in ("checkpoint", "weights_file", "file")]
    named += [a.partition("=")[2] for a in getattr(args, "add", None) or []]
    return [p for p in (model if model and model.endswith(".pt2") else None, *named) if p]


def _method_configs(args: argparse.Namespace, methods: list[str]) -> dict[str, Any]:
    """Typed configs of ``methods`` from ``--option [METHOD.]KEY=VALUE`` and ``--keep-float``: every option
    is converted by its config field's type, a scope must name a method the command runs, and an option
    no method knows is an error."""
    from lowbit.methods import available_methods, get_method
    from lowbit.methods.options import field_hints, split_scoped

    opts = split_scoped(getattr(args, "option", None) or [], available_methods())
    for scope in opts:
        if scope != "*" and scope not in methods:
            raise ValueError(f"--option {scope}.KEY=VALUE: this command runs {', '.join(methods)}, not {scope}")
    configs, used = {}, set()
    for m in methods:
        cls = get_method(m).config_cls
        raw = {k: v for k, v in opts.get("*", {}).items() if k in field_hints(cls)}
        used |= set(raw)
        raw.update(opts.get(m, {}))
        if getattr(args, "keep_float", None):
            raw["keep_float"] = args.keep_float
        configs[m] = cls.from_dict(raw, method=m, strings=True)
    unused = sorted(set(opts.get("*", {})) - used)
    if unused:
        known = sorted({k for m in methods for k in field_hints(get_method(m).config_cls)})
        raise ValueError(f"unknown option(s) {', '.join(unused)} for {', '.join(methods)}; known: {', '.join(known)}")
    return configs


def _load_data(args: argparse.Namespace) -> Any:
    from lowbit.data import load_dataset

    return load_dataset(args.data, data_dir=args.data_dir, seed=args.seed, download=args.download)


def _check_model_spec(args: argparse.Namespace) -> None:
    """The model argument names something loadable (checked before data is read or a model trained)."""
    from lowbit.models import available_models

    spec = args.model
    if spec in available_models():
        if args.weights_file:
            raise ValueError("--weights-file is for package.module:function models; a built-in model "
                             "takes --checkpoint")
        if args.checkpoint and args.epochs is not None and os.path.exists(args.checkpoint):
            raise ValueError(f"--checkpoint {args.checkpoint} is used as is; --epochs {args.epochs} would train "
                             "a new model: give one of them (or a checkpoint path that does not exist yet)")
        return
    if args.checkpoint or args.epochs is not None:
        raise ValueError(f"--checkpoint and --epochs are for the built-in models ({', '.join(available_models())})")
    if spec.endswith(".pt2"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"torch.export archive not found: {spec}")
        return
    if ":" not in spec:
        raise ValueError(f"unknown model {spec!r}: not a built-in model ({', '.join(available_models())}), "
                         "not a .pt2 archive and not package.module:function")


def _resolve_model(args: argparse.Namespace, splits: Any) -> torch.nn.Module:
    from lowbit.models import available_models

    spec = args.model
    if spec in available_models():
        from lowbit.train import train_or_load

        model, _, meta = train_or_load(spec, args.data, data_dir=args.data_dir, epochs=args.epochs, seed=args.seed,
                                       checkpoint=args.checkpoint, progress=True, download=args.download)
        return model
    from lowbit.graph import load_model

    return load_model(spec, args.weights_file)


def _eval_fn(splits: Any):
    from lowbit.evaluate import accuracy

    return lambda m: accuracy(m, splits.test)


# ---------------------------------------------------------------- commands

def cmd_train(args: argparse.Namespace) -> int:
    from lowbit.train import cli_train

    return cli_train(args)


def cmd_quantize(args: argparse.Namespace) -> int:
    import lowbit
    from lowbit.evaluate import accuracy
    from lowbit.methods import get_method

    cls = get_method(args.method)
    cfg = _method_configs(args, [args.method])[args.method]
    files.check_output(args.out, inputs=_inputs(args))
    _check_model_spec(args)
    splits = _load_data(args)
    model = _resolve_model(args, splits)
    t0 = time.perf_counter()
    trains = cls.accepts_training_data or cls.needs_training_data  # w46: gradual freezing; lsq, ...: QAT
    data = {"train": splits.train, "test": splits.test} if trains else {}
    qm = lowbit.quantize(model, args.method, calib=splits.calib, config=cfg, **data)
    took = time.perf_counter() - t0
    acc = accuracy(qm, splits.test)  # the model runs before its file is written
    path = lowbit.save(qm, args.out, inputs=_inputs(args))
    meta = qm.lowbit_meta
    print(f"{args.method}: test accuracy {acc:.2f}% on {splits.name}, file {path} ({path.stat().st_size:,} bytes), "
          f"quantized in {took:.1f} s")
    kept = meta.get("float_layers", []) + meta.get("float_ops", [])
    if kept:
        print("left in float: " + ", ".join(kept))
    ins = meta["input"] if isinstance(meta.get("input"), list) else [meta.get("input", {})]
    for i, o in [*(("input ", i) for i in ins), ("output", meta.get("output", {}))]:
        if o.get("dtype") not in (None, "float32"):
            print(f"{i} {o['dtype']} scale={o['scale']:.6g} zero_point={o['zero_point']}")
    return 0


def _extra_candidates(args: argparse.Namespace) -> dict[str, Any]:
    """``--add NAME=FILE``: saved lowbit models measured beside the methods (checked and loaded first)."""
    from lowbit.io import load

    pairs = []
    for item in getattr(args, "add", None) or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--add takes NAME=FILE, got {item!r}")
        pairs.append((name, path))
    if len({n for n, _ in pairs}) != len(pairs):
        raise ValueError("--add names a row twice")
    return {name: load(path) for name, path in pairs}


def cmd_compare(args: argparse.Namespace) -> int:
    from lowbit.compare import compare
    from lowbit.methods import available_methods, get_method

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods is not None else None
    if methods is not None and not methods:
        raise ValueError("--methods is empty; name at least one method (see `lowbit methods`)")
    for m in methods or []:
        get_method(m)
    configs = _method_configs(args, methods or available_methods())
    files.check_output(args.out, inputs=_inputs(args))
    files.check_output(args.report_dir, inputs=_inputs(args), folder=True)
    _check_model_spec(args)
    extra = _extra_candidates(args)
    splits = _load_data(args)
    model = _resolve_model(args, splits)
    res = compare(
        model, splits.calib, _eval_fn(splits), methods=methods, lambdas=args.lambdas, configs=configs,
        batch_size=args.batch_size, repeats=args.repeats, threads=args.threads, report_dir=args.report_dir,
        save_chosen=args.out, meta={"model": args.model, "dataset": splits.name},
        train=splits.train, test=splits.test, models=extra,
    )
    print()
    print(res.table())
    lam = args.lambdas
    print(f"\nchosen: {res.chosen} (λS,λT,λA = {lam.size:g},{lam.time:g},{lam.acc:g}); saved to {res.saved}")
    if res.report:
        print(f"report: {res.report.get('html', Path(args.report_dir) / 'index.html')}")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from lowbit.select import cli_select

    return cli_select(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from lowbit.eval_custom import cmd_eval_metric, load_file
    from lowbit.evaluate import accuracy, measure_latency, model_input

    model = load_file(args)
    if args.metric:
        return cmd_eval_metric(args, model)
    splits = _load_data(args)
    acc = accuracy(model, splits.test)
    x = model_input(model, splits.test.tensors[0][: args.batch_size])
    lat = measure_latency({"model": lambda: model(x)}, args.batch_size, repeats=args.repeats, threads=args.threads)
    lt = lat["model"]
    meta = model.lowbit_meta
    print(f"{args.file}: method {meta.get('method')}, {Path(args.file).stat().st_size:,} bytes, "
          f"test accuracy {acc:.2f}% on {splits.name}, latency {lt.median_ms:.3f} ms "
          f"(median of {lt.repeats}, batch {lt.batch_size}, {lt.threads} threads)")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from lowbit.methods import METHODS

    for name, cls in METHODS.items():
        calib = "calibration data" if cls.needs_calibration else "no data"
        if cls.needs_training_data:
            calib = "training data"
        print(f"{name:14s} {cls.summary} [{calib}]")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import lowbit
    from lowbit import kernels

    if getattr(args, "header", False) and not getattr(args, "file", None):
        raise ValueError("--header prints a model file's header: give the FILE")
    if getattr(args, "file", None):
        from lowbit.fileinfo import describe_file, format_file_info
        from lowbit.opcount import cli_info_file

        if args.header:
            from lowbit.io import read_header

            print(json.dumps(read_header(args.file, verify=not args.no_verify), indent=1))
            return 0

        print(format_file_info(describe_file(args.file, verify=not args.no_verify)))
        return cli_info_file(args)
    print(f"lowbit {lowbit.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    try:
        from lowbit import _native

        feats = [k for k, v in _native.cpu_features().items() if v]
        print(f"native kernels: built; CPU features: {', '.join(feats) or 'none'}; best ISA {_native.best_isa()}, "
              f"active {_native.active_isa()}")
    except ImportError as e:
        print(f"native kernels: not available ({e})")
    print(f"int8 backend: {kernels.backend_name()}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    args.checkpoint, args.weights_file = None, None
    args.methods, args.option, args.keep_float, args.batch_size = None, None, None, 1
    print(f"lowbit demo: {args.model} on {args.data}, every method, measured on this CPU\n", flush=True)
    rc = cmd_compare(args)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    return rc


# ---------------------------------------------------------------- parser

def _add_compare_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--lambdas", type=lambdas, default="1,1,1", metavar="λS,λT,λA",
                    help="weights of size, time, accuracy (default 1,1,1)")
    sp.add_argument("--repeats", type=positive_int, default=20, help="timed repeats per model (default 20)")
    add_threads(sp, what="for every candidate (1: batch-1 latency, robust on shared machines)")
    sp.add_argument("--report-dir", default="report", help="where results and plots go (default report/)")
    sp.add_argument("--out", default="report/chosen.lowbit", help="file for the chosen model")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="Quantize PyTorch networks and run them fast on CPUs.")
    sub = p.add_subparsers(dest="command", required=True)

    from lowbit.train import add_train_arguments

    sp = sub.add_parser("train", help="train a built-in reference model and write its checkpoint")
    add_train_arguments(sp)
    sp.set_defaults(fn=cmd_train)

    sp = sub.add_parser("quantize", help="quantize a model by one method and save it")
    _add_model_args(sp)
    _add_data_args(sp)
    sp.add_argument("--method", required=True, help="method name (see `lowbit methods`)")
    sp.add_argument("--out", required=True, help="output model file")
    sp.add_argument("--option", action="append", metavar="KEY=VALUE", help="method option, e.g. activation_observer=kl")
    sp.add_argument("--keep-float", default=None, help="comma-separated layer-name patterns left float")
    sp.set_defaults(fn=cmd_quantize)

    sp = sub.add_parser("compare", help="quantize by several methods, measure, choose by the objective L")
    _add_model_args(sp)
    _add_data_args(sp)
    sp.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    _add_compare_args(sp)
    sp.add_argument("--option", action="append", metavar="[METHOD.]KEY=VALUE", help="method option")
    sp.add_argument("--keep-float", default=None, help="comma-separated layer-name patterns left float")
    sp.add_argument("--batch-size", type=positive_int, default=1, help="latency batch size (default 1)")
    sp.add_argument("--add", action="append", metavar="NAME=FILE",
                    help="also measure a saved lowbit model (e.g. bm=bm.lowbit from `lowbit bm`) as row NAME")
    sp.set_defaults(fn=cmd_compare)

    from lowbit.select import add_select_arguments

    sp = sub.add_parser("select", help="score and choose from a CSV of measured results")
    add_select_arguments(sp)
    sp.set_defaults(fn=cmd_select)

    sp = sub.add_parser("eval", help="accuracy and latency of a saved lowbit model")
    sp.add_argument("file")
    _add_data_args(sp)
    sp.add_argument("--batch-size", type=positive_int, default=1, help="latency batch size (default 1)")
    sp.add_argument("--repeats", type=positive_int, default=50, help="timed repeats (default 50)")
    add_threads(sp)
    sp.add_argument("--no-verify", action="store_true", help="skip the file's SHA-256 check (its fields are "
                                                             "still validated)")
    sp.add_argument("--metric", default=None, metavar="PKG.MOD:FN",
                    help="score with your function (called with the model, returns a number or a dict of numbers) "
                         "instead of accuracy on --data; latency on inputs like the model's recorded example")
    sp.add_argument("--model", default=None, metavar="PKG.MOD:FN",
                    help="builds the float model a weights-only file is loaded into")
    sp.set_defaults(fn=cmd_eval)

    sp = sub.add_parser("methods", help="list the quantization methods")
    sp.set_defaults(fn=cmd_methods)
    sp = sub.add_parser("info", help="CPU features and kernel backend; with FILE: what a saved model holds "
                                     "(layers, kernels, bits per weight) and its operation count")
    sp.add_argument("file", nargs="?", default=None, help="a lowbit model file")
    sp.add_argument("--no-verify", action="store_true", help="skip the file's SHA-256 check")
    sp.add_argument("--input-shape", default=None,
                    help="C,H,W of one input sample, for the operation count, if the file does not record it")
    sp.add_argument("--header", action="store_true",
                    help="print the file's header (stored compressed) as JSON: format_version, lowbit_version, "
                         "meta, modules, nodes")
    sp.set_defaults(fn=cmd_info)

    sp = sub.add_parser("demo", help="the main job: train (or reuse) a CNN, compare every method, report")
    _add_data_args(sp)
    sp.add_argument("--model", default="small_cnn")
    sp.add_argument("--epochs", type=non_negative_int, default=None)
    _add_compare_args(sp)
    sp.set_defaults(fn=cmd_demo)

    for modname in COMMAND_MODULES:
        if importlib.util.find_spec(modname) is not None:
            importlib.import_module(modname).add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse printed the usage and the bad argument: a return code, as for errors
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # the exact command, for reports
    try:
        from lowbit import kernels

        kernels.check_environment()
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, NotImplementedError, OSError, KeyError) as e:
        if os.environ.get("LOWBIT_DEBUG"):
            raise
        print(f"lowbit: error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
