"""The ``fxrebirth`` command line's grammar: every sub-command's arguments (:func:`build_parser`) and the checks
of values argparse lets through (:func:`check_args`). What each sub-command does is in :mod:`fxrebirth.cli`,
the one module that prints.

One vocabulary across commands: ``--runtime`` is the runtime a plan is measured on and the model will run
on, ``--save FILE`` every written file, ``--out DIR`` every report or bundle folder, ``--target X`` a target
speed-up, ``--strategy NAME`` a retraining strategy. A strategy's options are grouped under its name in
``--help``; an option that none of the chosen strategies reads is refused before any work
(:func:`check_strategy_options`).
"""

from __future__ import annotations

import argparse

from fxrebirth import __version__
from fxrebirth.errors import FxRebirthError
from fxrebirth.frontends.library import default_rules
from fxrebirth.measure.runtimes import runtime_names, target_names
from fxrebirth.paper.teacher import TORCHVISION_TEACHERS
from fxrebirth.retraining.strategy import get_strategy, strategy_names

__all__ = ["build_parser", "check_args", "check_strategy_options", "explicit_options", "strategy_options",
           "option_readers", "PLANNING_FLAGS", "TRAINING_FLAGS", "DEFAULT_TEACHER"]

DEFAULT_TEACHER = "googlenet_lrn"
"""``fxrebirth run``'s model when none is named: trained once on the embedded data and cached."""

PLANNING_FLAGS = {"--streamline-kernel": "streamline_kernel", "--reduce-ratio": "reduce_ratio",
                  "--max-convs": "max_convs", "--prune": "prune"}
"""Flag -> the planning option it sets (a strategy's ``options``)."""

TRAINING_FLAGS = {"--init": "init", "--schedule": "schedule", "--layerwise-epochs": "layerwise_epochs"}
"""Flag -> the :class:`~fxrebirth.retraining.config.RebirthConfig` field it sets that only some strategies read
(a strategy's ``training``); the common training flags (``--epochs``, ``--device``, ...) are read by all."""

_ARGUMENTS = {
    "--streamline-kernel": dict(choices=("field", "conv", "pool", "each"), help="the rebirth layer's kernel: field "
                                "covers the chain's receptive field (default; run's accuracy search: each); conv: the "
                                "first convolution's, as DeepRebirth (fewer FLOPs); pool keeps the convolution and its "
                                "max-pooling, removes only the LRN; each: one candidate per kernel, the plan chooses"),
    "--reduce-ratio": dict(type=float, help="inception reduce-layer width in rebirth layers (default 0.5; thinner "
                                            "is faster and costs more accuracy)"),
    "--max-convs": dict(type=int, metavar="N", help="the most convolutions one depth merge spans (default 4)"),
    "--prune": dict(choices=("grown", "all", "none"), help="drop the identity operand of additions inside a merge: "
                    "only where the merge grows the kernel's channels (grown, default), always, or never"),
    "--init": dict(choices=("auto", "lstsq", "xavier", "original"),
                   help="rebirth layer initialisation (default: the library's, see docs/retraining.md)"),
    "--schedule": dict(choices=("distill", "paper"), help="distill (default): merge all, distil end to end; "
                                                          "paper: merge step by step"),
    "--layerwise-epochs": dict(type=float, metavar="E", help="layer-wise distillation epochs before the end-to-end "
                                                             "ones (default 0)"),
}


_NUM_CLASSES = dict(type=int, metavar="N", help="build the architecture with N classes (default: read from --weights)")


def option_readers() -> dict[str, tuple[str, ...]]:
    """Option name -> the strategies that read it (their ``options`` and ``training``), in registry order."""
    readers: dict[str, list[str]] = {}
    for name in strategy_names():
        strategy = get_strategy(name)
        for option in sorted(strategy.options | strategy.training):
            readers.setdefault(option, []).append(name)
    return {option: tuple(names) for option, names in readers.items()}


def build_parser() -> argparse.ArgumentParser:
    """The ``fxrebirth`` parser with its six sub-commands."""
    parser = argparse.ArgumentParser(prog="fxrebirth", description="Make trained CNNs faster by merging their layers.")
    parser.add_argument("--version", action="version", version=f"fxrebirth {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="errors only")
    sub = parser.add_subparsers(dest="command", required=True)
    readers = option_readers()
    for add in (_optimize_parser, _plan_parser, _profile_parser, _bench_parser, _run_parser, _export_parser):
        add(sub, readers)
    return parser


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, its weights and the input size: the arguments of every sub-command that loads a model."""
    parser.add_argument("model", help="googlenet_lrn, alexnet_lrn, a torchvision model name, or package.module:factory")
    parser.add_argument("--weights", help="a state_dict file to load (loaded with weights_only=True)")
    parser.add_argument("--input-size", type=int, default=224, help="square input resolution (default 224)")
    parser.add_argument("--num-classes", **_NUM_CLASSES)


def _runtime_argument(parser: argparse.ArgumentParser, tag: str, what: str) -> None:
    """``--runtime``: the runtime the plan is measured on and the model will run on (default eager)."""
    parser.add_argument("--runtime", choices=runtime_names(tag), default=None,
                        help=f"the runtime the model will run on: {what} (default eager PyTorch on the CPU)")


def _strategy_arguments(parser: argparse.ArgumentParser, readers: dict, *, training: bool = False) -> None:
    """``--strategy`` and each strategy's options, grouped by the strategies that read them."""
    parser.add_argument("--strategy", action="append", choices=strategy_names(), default=None, metavar="NAME",
                        help=f"a retraining strategy: {', '.join(strategy_names())} (repeatable; default: every "
                             "one that applies to the model)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    flags = {**PLANNING_FLAGS, **(TRAINING_FLAGS if training else {})}
    for flag, option in flags.items():
        users = readers.get(option, ())
        title = (f"retraining of {'/'.join(users)} layers" if flag in TRAINING_FLAGS
                 else f"{'/'.join(users) or 'no'} strateg{'ies' if len(users) > 1 else 'y'}")
        group = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
        group.add_argument(flag, default=None, **_ARGUMENTS[flag])


def _plan_arguments(parser: argparse.ArgumentParser, *, target_help: str, repeat: bool = False) -> None:
    """``--target``, ``--keep`` and ``--table``: what the plan selects and where its timings come from."""
    parser.add_argument("--target", type=float, action="append" if repeat else "store", default=None, metavar="X",
                        help=target_help)
    parser.add_argument("--keep", action="append", default=[], metavar="ID",
                        help="never merge this candidate: an id of the plan's table (streamline:conv1.conv) or a "
                             "prefix (streamline:); repeatable. Trades speed for accuracy where one costs more of it")
    parser.add_argument("--table", metavar="PATH", help="the A/B timings measured on the device: the latency-*.json "
                        "that time_on_device.py wrote from a bundle of `fxrebirth profile` (instead of timing here)")


def _optimize_parser(sub: argparse._SubParsersAction, readers: dict) -> None:
    """The ``optimize`` sub-command: the exact tier."""
    opt = sub.add_parser("optimize", help="apply the exact tier (no retraining) and print the report")
    _model_arguments(opt)
    opt.add_argument("--batch", type=int, default=1, help="example batch size (default 1)")
    opt.add_argument("--disable", action="append", default=[], metavar="RULE",
                     help="skip a rule by name (repeatable); rules: " + ", ".join(r.name for r in default_rules()))
    opt.add_argument("--no-verify", action="store_true", help="skip the per-rewrite float64 verification")
    _runtime_argument(opt, "cost", "the cost gate keeps the rewrites that are faster there")
    opt.add_argument("--save", metavar="FILE", help="save the optimised model as a torch.export program (.pt2)")
    opt.add_argument("--json", action="store_true", help="print the report as JSON")


def _plan_parser(sub: argparse._SubParsersAction, readers: dict) -> None:
    """The ``plan`` sub-command: the rebirth plan."""
    pln = sub.add_parser("plan", help="mark the candidates of every strategy, measure them, and print the plan")
    _model_arguments(pln)
    _runtime_argument(pln, "plannable", "every candidate is timed A/B there and the plan merges what is faster there")
    _plan_arguments(pln, target_help="select candidates until this estimated speed-up")
    pln.add_argument("--budget-ms", type=float, help="select candidates until this estimated latency")
    pln.add_argument("--rounds", type=int, default=None, help="timing rounds per candidate (default: the planner's)")
    _strategy_arguments(pln, readers)
    pln.add_argument("--save", metavar="FILE", help="write the plan as JSON")
    pln.add_argument("--json", action="store_true", help="print the plan as JSON")


def _profile_parser(sub: argparse._SubParsersAction, readers: dict) -> None:
    """The ``profile`` sub-command: a bundle of micro-models to time on the device."""
    prf = sub.add_parser("profile", help="export what the planner times (ONNX micro-models, a manifest and a script "
                         "that needs only the runtime) to time on the device that will run the model")
    _model_arguments(prf)
    prf.add_argument("--out", required=True, metavar="DIR", help="the bundle's folder")
    _runtime_argument(prf, "device", "time_on_device.py times the bundle there")
    _strategy_arguments(prf, readers)


def _bench_parser(sub: argparse._SubParsersAction, readers: dict) -> None:
    """The ``bench`` sub-command: the speed table."""
    bch = sub.add_parser("bench", help="the speed table: original, exact tier and reborn model under every runtime")
    _model_arguments(bch)
    bch.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    bch.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds (default 20)")
    bch.add_argument("--threads", type=int, default=None, help="threads for every runtime (default: torch's; "
                                                               "1 is a phone core's proxy)")
    _runtime_argument(bch, "plannable", "the reborn model's plan is measured there")
    bch.add_argument("--rows", action="append", choices=runtime_names(), default=None, metavar="NAME",
                     help=f"the table's runtimes (repeatable; default all): {', '.join(runtime_names())}")
    _plan_arguments(bch, target_help="plan the reborn model for this estimated speed-up (default: every candidate "
                                     "worth merging)")
    bch.add_argument("--exporter", choices=("auto", "torchscript", "dynamo"), default="auto",
                     help="ONNX exporter (default auto: the faster of the two for the original model)")
    bch.add_argument("--no-reborn", action="store_true", help="skip the reborn model (plan + untrained rebirth "
                                                               "layers; latency does not depend on their values)")
    bch.add_argument("--all-regions", action="store_true",
                     help="replace every marked candidate, not only those the plan measured a gain for")
    bch.add_argument("--no-memory", action="store_true", help="skip size/peak-memory subprocesses")
    bch.add_argument("--layers", action="store_true", help="also print eager time by layer kind, before/after")
    _strategy_arguments(bch, readers)
    bch.add_argument("--save", metavar="FILE", help="write the table as Markdown")
    bch.add_argument("--json", action="store_true", help="print the table as JSON")


def _export_parser(sub: argparse._SubParsersAction, readers: dict) -> None:
    """The ``export`` sub-command: a file for a deployment runtime, checked against the model."""
    exp = sub.add_parser("export", help="write the optimised model for ONNX Runtime, OpenVINO or ExecuTorch, "
                                        "checked numerically against the model")
    _model_arguments(exp)
    exp.add_argument("--to", required=True, choices=target_names(), help="the runtime's format")
    exp.add_argument("--save", required=True, metavar="FILE", help="the file (.onnx, .xml with its .bin, .pte)")
    exp.add_argument("--batch", type=int, default=1, help="example batch size (default 1; ExecuTorch keeps it)")
    exp.add_argument("--as-is", action="store_true", help="export the model without the exact tier")
    exp.add_argument("--json", action="store_true", help="print what was written as JSON")


def _run_parser(sub: argparse._SubParsersAction, readers: dict) -> None:
    """The ``run`` sub-command: the main job, for any model."""
    run = sub.add_parser("run", help="the main job: teacher, plan, rebirth + retraining, evaluation, report")
    run.add_argument("model", nargs="?", default=DEFAULT_TEACHER,
                     help=f"default {DEFAULT_TEACHER}; {DEFAULT_TEACHER}, alexnet_lrn and the torchvision teachers "
                          "(resnet18, mobilenet_v2, ...) are trained once on the embedded data and cached; any model "
                          "with --weights (trained on --data)")
    run.add_argument("--weights", help="a state_dict file to load (loaded with weights_only=True)")
    run.add_argument("--data", metavar="PATH", help="an ImageFolder tree (PATH/<class>/<image>); default: the "
                                                    "embedded Shapes set")
    run.add_argument("--out", default="fxrebirth-report", metavar="DIR", help="report folder (default "
                                                                              "fxrebirth-report)")
    run.add_argument("--image-size", type=int, default=None,
                     help="training/evaluation resolution (default: the job's, 32 or 64 for a torchvision teacher)")
    run.add_argument("--plan-size", type=int, default=224, help="planning and timing resolution (default 224)")
    _runtime_argument(run, "plannable", "the plan is measured there and the speed table compares there")
    _plan_arguments(run, repeat=True, target_help="a target speed-up of the plan (repeatable: one retrained point "
                                                  "each; default: every candidate worth merging)")
    _strategy_arguments(run, readers, training=True)
    _run_common_arguments(run)


def _run_common_arguments(run: argparse.ArgumentParser) -> None:
    """``run``'s arguments that every strategy reads: the teacher, the retraining budget, the report."""
    run.add_argument_group("the default teacher (not with --weights)").add_argument(
        "--width", type=float, default=None, help=f"{DEFAULT_TEACHER}'s channel multiplier (default 1)")
    yours = run.add_argument_group("your model (with --weights) and your data (--data)")
    yours.add_argument("--teacher-epochs", type=int, default=None, help="the default teacher's epochs (4; 6 for a "
                       "torchvision one); with --weights: those your model trained on --data's training images")
    yours.add_argument("--num-classes", **_NUM_CLASSES)
    yours.add_argument("--mean", type=float, nargs="+", metavar="M", help="the mean your images were normalised with "
                       "(1 or 3 values; default: the model's config where its library has one, else ImageNet's)")
    yours.add_argument("--std", type=float, nargs="+", metavar="S", help="their std (1 or 3 values)")
    yours.add_argument("--val-share", type=float, metavar="F", help="share of the training images held out (seeded) "
                       "for the validation split every decision is taken on (default 0.1)")
    yours.add_argument("--teacher-images", type=int, metavar="N",
                       help="what training your model cost: images passed forward and backward (epochs x set size)")
    yours.add_argument("--teacher-hours", type=float, metavar="H", help="what training your model cost: wall time")
    search = run.add_argument_group("the accuracy budget")
    search.add_argument("--max-drop", type=float, metavar="PT", help="the fastest model whose validation top-1 is at "
                        "most PT points below your model's (default 0.5 unless --target is given)")
    search.add_argument("--budget", type=float, metavar="SHARE", help="retraining images of all points tried, as a "
                        "share of the teacher's training images (default 0.25)")
    common = run.add_argument_group("retraining (every strategy)")
    common.add_argument("--device", default=None, help="where the default teacher (first run) and the retraining "
                                                       "train: cpu (default), cuda, cuda:N or auto (CUDA when present)")
    common.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                        help="retraining arithmetic: fp32 (default), bf16 autocast (CPU or GPU), fp16 (CUDA only)")
    common.add_argument("--epochs", type=float, default=None, help="end-to-end epochs (per step for --schedule paper)")
    common.add_argument("--augment", default=None, metavar="SPEC",
                        help="augment the retraining batches: none (default) or flip, shift, mixup joined by + "
                             "(the teacher sees the same images; measured no gain on the embedded data)")
    common.add_argument("--train-images", type=int, default=20000)
    common.add_argument("--test-images", type=int, default=10000)
    report = run.add_argument_group("the report")
    report.add_argument("--bench", choices=("full", "fast", "none"), default="full",
                        help="the speed table: every runtime (default), the fast ones only, or none")
    report.add_argument("--bench-batch", type=int, nargs="+", default=[1, 8], help="speed table batch sizes")
    report.add_argument("--latency-rounds", type=int, default=20)
    report.add_argument("--no-memory", action="store_true", help="skip size/peak-memory subprocesses")
    report.add_argument("--no-control", action="store_true",
                        help="skip the scratch control (the reborn architecture re-initialised, same loss and budget)")
    report.add_argument("--json", action="store_true", help="print the report as JSON")


_AT_LEAST_ONE = ("threads", "input_size", "image_size", "plan_size", "batch", "bench_batch", "rounds", "max_convs",
                 "latency_rounds", "train_images", "test_images", "teacher_epochs", "teacher_images", "num_classes")
_POSITIVE = ("budget_ms", "budget", "width", "teacher_hours")
_NOT_NEGATIVE = ("epochs", "layerwise_epochs")  # 0 epochs: the initialised rebirth layers only


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_numbers(args: argparse.Namespace) -> None:
    """Counts of at least 1, positive numbers, numbers >= 0, fractions, target speed-ups above 1."""
    import math

    for dests, ok, say in ((_AT_LEAST_ONE, lambda v: v >= 1, "give a whole number of at least 1"),
                           (_POSITIVE, lambda v: v > 0 and math.isfinite(v), "give a positive number"),
                           (_NOT_NEGATIVE, lambda v: v >= 0 and math.isfinite(v), "give a number >= 0"),
                           (("reduce_ratio",), lambda v: 0 < v <= 1, "give a fraction in (0, 1]"),
                           (("val_share",), lambda v: 0 < v < 1, "give a fraction between 0 and 1"),
                           (("max_drop",), lambda v: v > 0 and math.isfinite(v), "a drop of 0 or negative: give > 0"),
                           (("target",), lambda v: v > 1 and math.isfinite(v), "a target speed-up is above 1")):
        for dest in dests:
            value = getattr(args, dest, None)
            for v in (value if isinstance(value, list) else [value]):
                if v is not None and not ok(v):
                    raise FxRebirthError(f"{_flag(dest)} {v}: {say}")


def explicit_options(args: argparse.Namespace) -> tuple[str, ...]:
    """The strategy options (planning and training) the user set on the command line, by option name."""
    flags = {**PLANNING_FLAGS, **TRAINING_FLAGS}
    return tuple(option for flag, option in flags.items() if getattr(args, option, None) is not None)


def strategy_options(args: argparse.Namespace) -> dict:
    """The planning options the user set (option name -> value), for :func:`fxrebirth.plan` and ``RunConfig``."""
    return {option: getattr(args, option) for option in PLANNING_FLAGS.values()
            if getattr(args, option, None) is not None}


def _and(names) -> str:
    names = list(names)
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 2 else names)


def check_strategy_options(args: argparse.Namespace) -> None:
    """With ``--strategy`` given: refuse, in one line, an option that none of the chosen strategies reads.
    (Without it, :func:`fxrebirth.plan` and the job refuse what no strategy that applies reads.)"""
    chosen = getattr(args, "strategy", None)
    if not chosen:
        return
    chosen = list(dict.fromkeys(chosen))
    readers = option_readers()
    for flag, option in {**PLANNING_FLAGS, **TRAINING_FLAGS}.items():
        if getattr(args, option, None) is None:
            continue
        users = readers.get(option, ())
        if set(users) & set(chosen):
            continue
        read = f"read by the {_and(users)} strateg{'ies' if len(users) > 1 else 'y'}" if users else "read by no strategy"
        chosen_are = f"the chosen strateg{'ies are' if len(chosen) > 1 else 'y is'} {_and(chosen)}"
        raise FxRebirthError(f"{flag} is {read}; {chosen_are}: drop {flag}"
                             + (f" or add --strategy {users[0]}" if users else ""))


def _check_model_options(args: argparse.Namespace) -> None:
    """``run``'s options that belong to the default teacher or to the user's model, and ``--data``."""
    if args.command != "run":
        return
    if args.data and not args.weights:
        raise FxRebirthError(f"fxrebirth run {args.model} --data: give --weights too (your model trained on that "
                             "data); without --weights the default teacher trains on the embedded data")
    teachers = (DEFAULT_TEACHER, *TORCHVISION_TEACHERS)
    if not args.weights and args.model not in teachers:
        raise FxRebirthError(f"fxrebirth run {args.model}: give --weights (your model, trained on --data); the "
                             f"default teachers are {', '.join(teachers)}")
    if args.width is not None and (args.weights or args.model != DEFAULT_TEACHER):
        whose = "with --weights your model is the teacher" if args.weights else f"{args.model} takes no width"
        raise FxRebirthError(f"--width is the default {DEFAULT_TEACHER} teacher's channel multiplier; {whose}: "
                             "drop --width")
    if args.num_classes is not None and not args.weights:
        raise FxRebirthError("--num-classes sizes your model (with --weights); the default teachers take the "
                             "embedded data's classes: drop --num-classes")
    _check_user_data(args)
    for dest in ("teacher_images", "teacher_hours"):
        if getattr(args, dest) is not None and not args.weights:
            raise FxRebirthError(f"{_flag(dest)} states what training your model cost (with --weights); the default "
                                 f"teacher's is read from its training record: drop {_flag(dest)}")


def _check_user_data(args: argparse.Namespace) -> None:
    """``run``'s ``--mean``/``--std`` (of ``--data``: 1 or 3 values, std > 0) and ``--max-drop`` or ``--target``."""
    if args.max_drop is not None and args.target:
        raise FxRebirthError("give --max-drop or --target, not both: --max-drop searches for the fastest model "
                             "within the drop, --target retrains the plan at that speed-up")
    if (args.mean is None) != (args.std is None) or (args.mean is not None and not args.data):
        raise FxRebirthError("--mean and --std (both) normalise the images of --data" + ("; without --data the "
                             "embedded set has its own" if not args.data else ""))
    for dest, values in (("mean", args.mean or [0]), ("std", args.std or [1])):
        if len(values) not in (1, 3) or (dest == "std" and not all(v > 0 for v in values)):
            raise FxRebirthError(f"--{dest} {' '.join(f'{v:g}' for v in values)}: give 1 value (all channels) or 3 "
                                 f"(R G B){', each positive' if dest == 'std' else ''}")


def _check_paths(args: argparse.Namespace) -> None:
    """``--table``, ``--save`` and ``--out``: files that exist, folders that can be written (``--weights`` is
    checked where it is read, :func:`fxrebirth.paper.loading.load_trained`, before any work)."""
    import os

    table = getattr(args, "table", None)
    if table:
        if getattr(args, "runtime", None) is not None:
            raise FxRebirthError(f"give --table or --runtime {args.runtime}, not both: the table was measured on one "
                                 "runtime")
        if not os.path.isfile(table):
            raise FxRebirthError(f"--table {table}: no such file (time_on_device.py writes it into the bundle)")
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
        raise FxRebirthError(f"--out {out} is a file; give a folder")


def check_args(args: argparse.Namespace) -> None:
    """Everything wrong that can be seen before any work, each a one-line :class:`FxRebirthError` (exit code 2):
    options the chosen strategies do not read, model options that do not apply, bad numbers and paths."""
    check_strategy_options(args)
    if getattr(args, "budget_ms", None) is not None and args.target is not None:
        raise FxRebirthError("give --target or --budget-ms, not both: the plan selects until one of them")
    _check_model_options(args)
    _check_numbers(args)
    _check_paths(args)
