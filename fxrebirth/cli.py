"""The ``fxrebirth`` command line. Library code logs; this module is the one place that prints."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

import torch
from torch import nn

from fxrebirth import __version__
from fxrebirth.frontends.library import default_rules, optimize
from fxrebirth.rewrite.cost import RooflineCost
from fxrebirth.errors import FxRebirthError, first_line
from fxrebirth.measure.speed import RUNTIMES
from fxrebirth.paper.loading import PAPER_MODELS, load_model  # noqa: F401 - re-exported

__all__ = ["main", "load_model"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxrebirth", description="Make trained CNNs faster by merging their layers.")
    parser.add_argument("--version", action="version", version=f"fxrebirth {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="errors only")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_optimize_parser, _plan_parser, _bench_parser, _run_parser):
        add(sub)
    return parser


_MODEL_HELP = "googlenet_lrn, alexnet_lrn, a torchvision model name, or package.module:factory"


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, its weights and the input size: the arguments of every sub-command that loads a model."""
    parser.add_argument("model", help=_MODEL_HELP)
    parser.add_argument("--weights", help="a state_dict file to load (loaded with weights_only=True)")
    parser.add_argument("--input-size", type=int, default=224, help="square input resolution (default 224)")


def _optimize_parser(sub: argparse._SubParsersAction) -> None:
    """The ``optimize`` sub-command: the exact tier."""
    opt = sub.add_parser("optimize", help="apply the exact tier (no retraining) and print the report")
    _model_arguments(opt)
    opt.add_argument("--batch", type=int, default=1, help="example batch size (default 1)")
    opt.add_argument("--disable", action="append", default=[], metavar="RULE",
                     help="skip a rule by name (repeatable); rules: " + ", ".join(r.name for r in default_rules()))
    opt.add_argument("--no-verify", action="store_true", help="skip the per-rewrite float64 verification")
    opt.add_argument("--runtime", choices=("eager", "onnxruntime"), default="eager",
                     help="the runtime the cost gate optimises for (default eager PyTorch on CPU)")
    opt.add_argument("--save", metavar="PATH", help="save the optimised model as a torch.export program (.pt2)")
    opt.add_argument("--json", action="store_true", help="print the report as JSON")


def _plan_parser(sub: argparse._SubParsersAction) -> None:
    """The ``plan`` sub-command: the rebirth plan."""
    pln = sub.add_parser("plan", help="mark non-linear regions, measure them, and print the rebirth plan")
    _model_arguments(pln)
    pln.add_argument("--target-speedup", type=float, help="select regions until this estimated speed-up")
    pln.add_argument("--budget-ms", type=float, help="select regions until this estimated latency")
    pln.add_argument("--repeats", type=int, default=5, help="timing repeats per node (default 5)")
    pln.add_argument("--reduce-ratio", type=float, help="inception reduce-layer width in rebirth layers (default 0.5)")
    pln.add_argument("--save", metavar="PATH", help="write the plan as JSON")
    pln.add_argument("--json", action="store_true", help="print the plan as JSON")


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    """The ``bench`` sub-command: the speed table."""
    bch = sub.add_parser("bench", help="the speed table: original, exact tier and reborn model under every runtime")
    _model_arguments(bch)
    bch.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    bch.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds (default 20)")
    bch.add_argument("--runtime", action="append", choices=RUNTIMES, default=None,
                     help="runtimes to include (repeatable; default all)")
    bch.add_argument("--exporter", choices=("auto", "torchscript", "dynamo"), default="auto",
                     help="ONNX exporter (default auto: the faster of the two for the original model)")
    bch.add_argument("--no-reborn", action="store_true", help="skip the reborn model (plan + untrained rebirth "
                                                               "layers; latency does not depend on their values)")
    bch.add_argument("--all-regions", action="store_true",
                     help="replace every marked region, not only those the plan measured a gain for")
    bch.add_argument("--no-memory", action="store_true", help="skip size/peak-memory subprocesses")
    bch.add_argument("--layers", action="store_true", help="also print eager time by layer kind, before/after")
    bch.add_argument("--save", metavar="PATH", help="write the table as Markdown")
    bch.add_argument("--json", action="store_true", help="print the table as JSON")


def _run_parser(sub: argparse._SubParsersAction) -> None:
    """The ``run`` sub-command: the main job."""
    run = sub.add_parser("run", help="the main job: teacher, plan, rebirth + retraining, evaluation, report")
    run.add_argument("model", nargs="?", default="googlenet_lrn",
                     help="default googlenet_lrn (trained once on the embedded data and cached); other models "
                          "need --weights and --data")
    run.add_argument("--weights", help="a state_dict file to load (loaded with weights_only=True)")
    run.add_argument("--data", metavar="PATH", help="an ImageFolder tree (PATH/<class>/<image>); default: the "
                                                    "embedded Shapes set")
    run.add_argument("--out", default="fxrebirth-report", help="report folder (default fxrebirth-report)")
    run.add_argument("--image-size", type=int, default=32, help="training/evaluation resolution (default 32)")
    run.add_argument("--plan-size", type=int, default=224, help="planning and timing resolution (default 224)")
    run.add_argument("--init", choices=("auto", "lstsq", "xavier", "original"), default=None,
                     help="rebirth layer initialisation (default: the library default, see docs/retraining.md)")
    run.add_argument("--schedule", choices=("distill", "paper"), default="distill")
    run.add_argument("--device", default="cpu", help="where the default teacher (first run) and the retraining "
                                                     "train: cpu (default), cuda, cuda:N or auto (CUDA when present)")
    run.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                     help="retraining arithmetic: fp32 (default), bf16 autocast (CPU or GPU), fp16 (CUDA only)")
    run.add_argument("--epochs", type=float, default=None, help="end-to-end epochs (per step for --schedule paper)")
    run.add_argument("--train-images", type=int, default=20000)
    run.add_argument("--test-images", type=int, default=10000)
    run.add_argument("--teacher-epochs", type=int, default=4)
    run.add_argument("--width", type=float, default=1.0, help="googlenet_lrn channel multiplier (default 1)")
    run.add_argument("--latency-rounds", type=int, default=20)
    run.add_argument("--reduce-ratio", type=float, help="inception reduce-layer width in rebirth layers (default "
                                                        "0.5; thinner is faster and costs more accuracy)")
    run.add_argument("--bench", choices=("full", "fast", "none"), default="full",
                     help="the speed table: every runtime (default), eager and ONNX Runtime only, or none")
    run.add_argument("--bench-batch", type=int, nargs="+", default=[1, 8], help="speed table batch sizes")
    run.add_argument("--no-memory", action="store_true", help="skip size/peak-memory subprocesses")
    run.add_argument("--no-control", action="store_true",
                     help="skip the scratch control (the reborn architecture re-initialised, same loss and budget)")
    run.add_argument("--teacher-images", type=int, metavar="N",
                     help="what training your model cost: images passed forward and backward (epochs x set size)")
    run.add_argument("--teacher-hours", type=float, metavar="H", help="what training your model cost: wall time")
    run.add_argument("--json", action="store_true", help="print the report as JSON")


class _Bars:
    """tqdm progress bars, one per stage, on stderr."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.bar, self.stage = enabled, None, None

    def __call__(self, event) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if event.stage != self.stage:
            self.close()
            self.stage = event.stage
            self.bar = tqdm(total=event.total, desc=event.stage[:28].ljust(28), unit=event.unit, unit_scale=True,
                            file=sys.stderr, leave=True, dynamic_ncols=True)
        self.bar.n = event.done
        if event.loss is not None:
            self.bar.set_postfix(loss=f"{event.loss:.3f}", refresh=False)
        elif "message" in event.info:
            self.bar.set_postfix_str(event.info["message"][:48], refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _run(args: argparse.Namespace) -> int:
    from fxrebirth.retraining.engine import RebirthConfig
    from fxrebirth.paper.runner import RunConfig, run
    from fxrebirth.paper.teacher import TeacherConfig

    model = None
    if args.model != "googlenet_lrn" or args.weights or args.data:
        if not args.weights:
            raise FxRebirthError(f"fxrebirth run {args.model}: give --weights (a model trained on your data); "
                                 "only googlenet_lrn has a default teacher")
        model = _load(args)
    options = {"schedule": args.schedule, "device": args.device, "precision": args.precision}
    if args.init is not None:
        options["init"] = args.init
    if args.epochs is not None:
        options["epochs"] = args.epochs
    config = RunConfig(out=args.out, data=args.data, model=model, model_name=args.model, image_size=args.image_size,
                       plan_size=args.plan_size, train_images=args.train_images, test_images=args.test_images,
                       teacher=TeacherConfig(epochs=args.teacher_epochs, width=args.width),
                       rebirth=RebirthConfig(**options), latency_rounds=args.latency_rounds,
                       bench=args.bench, bench_batches=tuple(args.bench_batch), bench_memory=not args.no_memory,
                       reduce_ratio=args.reduce_ratio, control=not args.no_control,
                       teacher_cost=_teacher_cost(args))
    bars = _Bars(not args.quiet and not args.json)
    try:
        result = run(config, progress=bars)
    finally:
        bars.close()
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        with open(f"{args.out}/report.md") as f:
            print(f.read())
        print(f"report: {args.out}/report.md")
    return 0


def _teacher_cost(args: argparse.Namespace) -> dict[str, float] | None:
    """What the user says training their model cost, or None."""
    cost = {"images": args.teacher_images, "wall_s": args.teacher_hours * 3600 if args.teacher_hours else None}
    return cost if any(v is not None for v in cost.values()) else None


def _load(args: argparse.Namespace) -> nn.Module:
    model = load_model(args.model)
    if args.weights:
        import os
        import pickle

        if not os.path.exists(args.weights):
            raise FxRebirthError(f"--weights {args.weights}: no such file")
        if os.path.isdir(args.weights):
            raise FxRebirthError(f"--weights {args.weights} is a directory; give the state_dict file (e.g. model.pt)")
        try:
            state = torch.load(args.weights, map_location="cpu", weights_only=True)
        except OSError as exc:
            raise FxRebirthError(f"--weights {args.weights}: cannot read it ({first_line(exc, 200)})") from None
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as exc:
            raise FxRebirthError(f"--weights {args.weights}: not a readable state_dict ({first_line(exc, 200)})") from None
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]  # fxrebirth's own checkpoints (the cached teacher)
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise FxRebirthError(f"--weights {args.weights} does not fit {args.model}: {first_line(exc)}") from None
    return model.eval()


def _plan(args: argparse.Namespace) -> int:
    from fxrebirth.retraining.planning import plan

    model = _load(args)
    x = torch.randn(1, 3, args.input_size, args.input_size)
    budget = args.budget_ms / 1e3 if args.budget_ms is not None else None
    result = plan(model, x, target_speedup=args.target_speedup, budget_s=budget, repeats=args.repeats,
                  reduce_ratio=args.reduce_ratio)
    if args.save:
        _write(args.save, result.to_json(indent=1))
    print(result.to_json(indent=1) if args.json else result.table())
    if args.save and not args.json:
        print(f"saved: {args.save}")
    return 0


def _optimize(args: argparse.Namespace) -> int:
    model = _load(args)
    x = torch.randn(args.batch, 3, args.input_size, args.input_size)
    cost = RooflineCost.onnxruntime() if args.runtime == "onnxruntime" else RooflineCost()
    gm, report = optimize(model, x, disable=args.disable, verify=not args.no_verify, cost_model=cost)
    report.model = args.model
    if args.save:
        program = torch.export.export(gm, (x,))
        try:
            torch.export.save(program, args.save)
        except (OSError, RuntimeError) as exc:
            raise FxRebirthError(f"--save {args.save}: cannot write it ({first_line(exc, 200)})") from None
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.table())
        if args.save:
            print(f"saved: {args.save} (load with torch.export.load)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from fxrebirth.retraining.planning import plan as make_plan
    from fxrebirth.graph.capture import capture
    from fxrebirth.retraining.layers import rebuild
    from fxrebirth.measure.speed import benchmark

    model = _load(args)
    say = (lambda message: None) if args.quiet or args.json else (lambda message: print(message, file=sys.stderr))
    x = torch.randn(1, 3, args.input_size, args.input_size)
    say("exact tier")
    exact, _ = optimize(model, x)
    reborn, planned = None, None
    if not args.no_reborn:
        say("planning the rebirth (timing every region)")
        planned = make_plan(model, x, repeats=3)
        if args.all_regions:
            for region in planned.regions:
                region.selected = True
        if planned.selected:
            reborn = rebuild(capture(model, (x,)), planned).eval()
        else:
            say("no region worth merging: the table has no reborn rows")
    table = benchmark(model, exact=exact, reborn=reborn, image_size=args.input_size, batches=args.batch,
                      rounds=args.rounds, runtimes=args.runtime or RUNTIMES, exporter=args.exporter,
                      memory=not args.no_memory, layers=args.layers, name=args.model, progress=say)
    text = table.markdown()
    if reborn is not None:
        text += (f"\n\nreborn: {len(planned.selected)} regions replaced by freshly initialised rebirth layers "
                 f"(planned {planned.estimated_speedup:.2f}x eager); retrain with `fxrebirth run` before deploying.")
    if args.layers:
        text += "\n\n" + table.layers_markdown()
    data = table.to_dict()
    if args.save:
        _write(args.save, text + "\n")
    print(json.dumps(data, indent=1, default=str) if args.json else text)
    return 0


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        raise FxRebirthError(f"--save {path}: cannot write it ({first_line(exc, 200)})") from None


# options that must be positive (whole numbers >= 1, or numbers > 0), by their argparse destination
_AT_LEAST_ONE = ("input_size", "image_size", "plan_size", "batch", "bench_batch", "rounds", "repeats",
                 "latency_rounds", "train_images", "test_images", "teacher_epochs", "teacher_images")
_POSITIVE = ("target_speedup", "budget_ms", "width", "teacher_hours")
_NOT_NEGATIVE = ("epochs",)  # 0 epochs: the initialised rebirth layers only


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_args(args: argparse.Namespace) -> None:
    """Bad values the parser lets through, each a one-line :class:`FxRebirthError` (exit code 2)."""
    import math
    import os

    for dest in _AT_LEAST_ONE:
        value = getattr(args, dest, None)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and v < 1:
                raise FxRebirthError(f"{_flag(dest)} {v}: give a whole number of at least 1")
    for dest in _POSITIVE:
        value = getattr(args, dest, None)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise FxRebirthError(f"{_flag(dest)} {value}: give a positive number")
    for dest in _NOT_NEGATIVE:
        value = getattr(args, dest, None)
        if value is not None and not (value >= 0 and math.isfinite(value)):
            raise FxRebirthError(f"{_flag(dest)} {value}: give a number >= 0")
    if getattr(args, "reduce_ratio", None) is not None and not 0 < args.reduce_ratio <= 1:
        raise FxRebirthError(f"--reduce-ratio {args.reduce_ratio}: give a fraction in (0, 1]")
    weights = getattr(args, "weights", None)
    if weights:
        if not os.path.exists(weights):
            raise FxRebirthError(f"--weights {weights}: no such file")
        if os.path.isdir(weights):
            raise FxRebirthError(f"--weights {weights} is a directory; give the state_dict file (e.g. model.pt)")
        if not os.access(weights, os.R_OK):
            raise FxRebirthError(f"--weights {weights}: the file is not readable (permission denied)")
    save = getattr(args, "save", None)
    if save:
        folder = os.path.dirname(os.path.abspath(save))
        if os.path.isdir(save):
            raise FxRebirthError(f"--save {save} is a directory; give a file name (e.g. {os.path.join(save, 'out')})")
        if not os.path.isdir(folder):
            raise FxRebirthError(f"--save {save}: the folder {folder} does not exist; create it first")
        if not os.access(folder, os.W_OK):
            raise FxRebirthError(f"--save {save}: the folder {folder} is not writable")
    out = getattr(args, "out", None)
    if out and os.path.exists(out) and not os.path.isdir(out):
        raise FxRebirthError(f"--out {out} is a file; give a folder for the report")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code: 0, 2 for bad input, 1 for an unexpected failure
    (one line; ``-vv`` logs its traceback), 130 when interrupted. Never prints a traceback otherwise."""
    args = _parser().parse_args(argv)
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        _check_args(args)
        return {"plan": _plan, "optimize": _optimize, "bench": _bench, "run": _run}[args.command](args)
    except FxRebirthError as exc:
        print(f"fxrebirth: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fxrebirth: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - never a traceback on the command line
        logging.getLogger(__name__).debug("traceback of the failure", exc_info=True)
        print(f"fxrebirth: error: {type(exc).__name__}: {first_line(exc)} (this is a bug or an unsupported model; "
              "-vv shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
