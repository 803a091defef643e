"""The ``fxrebirth`` command line's grammar: every sub-command's arguments (:func:`_parser`) and the checks
of values argparse lets through (:func:`_check_args`). What each sub-command does is in
:mod:`fxrebirth.cli`, the one module that prints.
"""

from __future__ import annotations

import argparse

from fxrebirth import __version__
from fxrebirth.errors import FxRebirthError
from fxrebirth.frontends.library import default_rules
from fxrebirth.measure.speed import RUNTIMES

__all__ = ["_parser", "_check_args"]

_PLAN_RUNTIMES = tuple(r for r in RUNTIMES if r not in ("fx fuse", "compile(fxrebirth)"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxrebirth", description="Make trained CNNs faster by merging their layers.")
    parser.add_argument("--version", action="version", version=f"fxrebirth {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="errors only")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_optimize_parser, _plan_parser, _profile_parser, _bench_parser, _run_parser, _export_parser):
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


def _geometry_arguments(parser: argparse.ArgumentParser) -> None:
    """The rebirth layers' geometry: the arguments of every sub-command that plans rebirth layers."""
    parser.add_argument("--streamline-kernel", choices=("field", "conv", "pool"), default="field",
                        help="streamline rebirth layers' kernel: field covers the chain's receptive field "
                             "(default); conv keeps the first convolution's kernel, as DeepRebirth does (fewer FLOPs); "
                             "pool keeps the convolution and its max-pooling and removes only the LRN")
    parser.add_argument("--reduce-ratio", type=float, help="inception reduce-layer width in rebirth layers (default "
                                                           "0.5; thinner is faster and costs more accuracy)")


def _keep_argument(parser: argparse.ArgumentParser) -> None:
    """Regions the plan must leave as they are: the arguments of every sub-command that selects regions."""
    parser.add_argument("--keep", action="append", default=[], metavar="REGION",
                        help="never merge this region: an id of the plan's table (streamline:conv1.conv) or a prefix "
                             "(streamline:); repeatable. Trades speed for accuracy where a region costs more of it")


def _plan_parser(sub: argparse._SubParsersAction) -> None:
    """The ``plan`` sub-command: the rebirth plan."""
    pln = sub.add_parser("plan", help="mark non-linear regions, measure them, and print the rebirth plan")
    _model_arguments(pln)
    pln.add_argument("--target-speedup", type=float, help="select regions until this estimated speed-up")
    pln.add_argument("--budget-ms", type=float, help="select regions until this estimated latency")
    pln.add_argument("--repeats", type=int, default=5, help="timing repeats per node (default 5)")
    pln.add_argument("--runtime", choices=_PLAN_RUNTIMES, default="eager", help="time every region A/B through this "
                     "runtime (default eager: every node profiled); the plan then merges what is faster there")
    pln.add_argument("--table", metavar="PATH", help="the A/B timings measured on the device: the latency-*.json "
                     "that time_on_device.py wrote from a bundle of `fxrebirth profile` (instead of --runtime)")
    _geometry_arguments(pln)
    _keep_argument(pln)
    pln.add_argument("--save", metavar="PATH", help="write the plan as JSON")
    pln.add_argument("--json", action="store_true", help="print the plan as JSON")


def _profile_parser(sub: argparse._SubParsersAction) -> None:
    """The ``profile`` sub-command: a bundle of micro-models to time on the device."""
    prf = sub.add_parser("profile", help="export what the planner times (ONNX micro-models, a manifest and a script "
                         "that needs only the runtime) to time on the device that will run the model")
    _model_arguments(prf)
    prf.add_argument("--out", required=True, metavar="DIR", help="the bundle's folder")
    prf.add_argument("--depth", action="store_true", help="the depth planner's candidates (fxrebirth run "
                     "mobilenet_v2 --table), not the rebirth regions (fxrebirth plan --table)")
    _geometry_arguments(prf)


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    """The ``bench`` sub-command: the speed table."""
    bch = sub.add_parser("bench", help="the speed table: original, exact tier and reborn model under every runtime")
    _model_arguments(bch)
    bch.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    bch.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds (default 20)")
    bch.add_argument("--threads", type=int, default=None, help="threads for every runtime (default: torch's; "
                                                               "1 is a phone core's proxy)")
    _geometry_arguments(bch)
    _keep_argument(bch)
    bch.add_argument("--plan-for", choices=_PLAN_RUNTIMES, default="eager",
                     help="the runtime the reborn model's plan is measured through (default eager)")
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


def _export_parser(sub: argparse._SubParsersAction) -> None:
    """The ``export`` sub-command: a file for a deployment runtime, checked against the model."""
    exp = sub.add_parser("export", help="write the optimised model for ONNX Runtime, OpenVINO or ExecuTorch, "
                                        "checked numerically against the model")
    _model_arguments(exp)
    exp.add_argument("--to", required=True, choices=("onnx", "openvino", "executorch"), help="the runtime's format")
    exp.add_argument("--output", required=True, metavar="PATH", help="the file (.onnx, .xml with its .bin, .pte)")
    exp.add_argument("--batch", type=int, default=1, help="example batch size (default 1; ExecuTorch keeps it)")
    exp.add_argument("--as-is", action="store_true", help="export the model without the exact tier")
    exp.add_argument("--json", action="store_true", help="print what was written as JSON")


def _run_parser(sub: argparse._SubParsersAction) -> None:
    """The ``run`` sub-command: the main job."""
    run = sub.add_parser("run", help="the main job: teacher, plan, rebirth + retraining, evaluation, report")
    run.add_argument("model", nargs="?", default="googlenet_lrn",
                     help="default googlenet_lrn (trained once on the embedded data and cached); mobilenet_v2, "
                          "resnet18 (and the other architectures of fxrebirth.paper.teacher.TORCHVISION_TEACHERS): "
                          "the depth job, teacher trained once at 64x64 and cached (docs/depth.md); other models "
                          "need --weights and --data")
    run.add_argument("--weights", help="a state_dict file to load (loaded with weights_only=True)")
    run.add_argument("--data", metavar="PATH", help="an ImageFolder tree (PATH/<class>/<image>); default: the "
                                                    "embedded Shapes set")
    run.add_argument("--out", default="fxrebirth-report", help="report folder (default fxrebirth-report)")
    run.add_argument("--image-size", type=int, default=None,
                     help="training/evaluation resolution (default 32; 64 for the depth job)")
    run.add_argument("--plan-size", type=int, default=224, help="planning and timing resolution (default 224)")
    run.add_argument("--init", choices=("auto", "lstsq", "xavier", "original"), default=None,
                     help="rebirth layer initialisation (default: the library default, see docs/retraining.md)")
    run.add_argument("--schedule", choices=("distill", "paper"), default="distill")
    run.add_argument("--device", default="cpu", help="where the default teacher (first run) and the retraining "
                                                     "train: cpu (default), cuda, cuda:N or auto (CUDA when present)")
    run.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                     help="retraining arithmetic: fp32 (default), bf16 autocast (CPU or GPU), fp16 (CUDA only)")
    run.add_argument("--epochs", type=float, default=None, help="end-to-end epochs (per step for --schedule paper)")
    run.add_argument("--augment", default="none", metavar="SPEC",
                     help="augment the retraining batches: none (default) or flip, shift, mixup joined by + "
                          "(the teacher sees the same images; measured no gain on the embedded data)")
    run.add_argument("--train-images", type=int, default=20000)
    run.add_argument("--test-images", type=int, default=10000)
    run.add_argument("--teacher-epochs", type=int, default=None, help="default 4; 6 for the depth job")
    run.add_argument("--target", type=float, action="append", default=None, metavar="X",
                     help="depth job: a target speed-up of the plan (repeatable: one retrained point of the front "
                          "each; default 1.5)")
    run.add_argument("--width", type=float, default=1.0, help="googlenet_lrn channel multiplier (default 1)")
    run.add_argument("--latency-rounds", type=int, default=20)
    _geometry_arguments(run)
    _keep_argument(run)
    run.add_argument("--plan-for", choices=_PLAN_RUNTIMES, default="eager",
                     help="the runtime the plan times every region through (default eager)")
    run.add_argument("--table", metavar="PATH", help="plan with the timings measured on the device from a bundle of "
                     "`fxrebirth profile MODEL --input-size PLAN_SIZE` (--depth for torchvision models), instead of "
                     "--plan-for")
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


_AT_LEAST_ONE = ("threads", "input_size", "image_size", "plan_size", "batch", "bench_batch", "rounds", "repeats",
                 "latency_rounds", "train_images", "test_images", "teacher_epochs", "teacher_images")


_POSITIVE = ("target_speedup", "budget_ms", "width", "teacher_hours")  # --target: checked by the depth job


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
    table = getattr(args, "table", None)
    if table:
        timed_on = getattr(args, "runtime", None) or getattr(args, "plan_for", None)
        if timed_on not in (None, "eager"):
            raise FxRebirthError(f"give --table or --{'runtime' if args.command == 'plan' else 'plan-for'} "
                                 f"{timed_on}, not both: the table was measured on one runtime")
        if not os.path.isfile(table):
            raise FxRebirthError(f"--table {table}: no such file (time_on_device.py writes it into the bundle)")
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
