"""The ``fxrebirth`` command line: what each sub-command does (its arguments are in :mod:`fxrebirth.cli_args`).
Library code logs; this module is the one place that prints."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Sequence

import torch
from torch import nn

from fxrebirth.cli_args import _check_args, _parser
from fxrebirth.frontends.library import optimize
from fxrebirth.rewrite.cost import RooflineCost
from fxrebirth.errors import FxRebirthError, first_line
from fxrebirth.measure.speed import RUNTIMES
from fxrebirth.paper.loading import PAPER_MODELS, load_model, load_weights  # noqa: F401 - re-exported

__all__ = ["main", "load_model"]


def _export(args: argparse.Namespace) -> int:
    from fxrebirth.frontends.deploy import export_model

    model = _load(args)
    x = torch.randn(args.batch, 3, args.input_size, args.input_size)
    rewrites = 0
    if not args.as_is:
        cost = RooflineCost.onnxruntime() if args.to == "onnx" else RooflineCost()
        optimised, report = optimize(model, x, cost_model=cost)
        rewrites = report.rewrites
    written = export_model(optimised if not args.as_is else model, x, args.to, args.output)
    summary = {"files": written.files, "error": written.error, "checked_batch": written.checked_batch,
               "exact_tier_rewrites": None if args.as_is else rewrites, "note": written.note}
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    tier = "as is" if args.as_is else f"after the exact tier ({rewrites} rewrites)"
    print(f"exported {args.model} {tier} to {args.to}: {', '.join(written.files)}")
    print(f"checked against the model at batch {written.checked_batch}: norm-wise error {written.error:.1e}"
          + (f"; {written.note}" if written.note else ""))
    return 0


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

    from fxrebirth.paper.teacher import TORCHVISION_TEACHERS

    if args.model in TORCHVISION_TEACHERS and not args.weights and not args.data:
        if args.keep:
            raise FxRebirthError("--keep selects among rebirth regions; the depth job of "
                                 f"{args.model} plans depth segments (use --target)")
        return _run_depth(args)
    args.image_size = args.image_size or 32
    model = None
    if args.model != "googlenet_lrn" or args.weights or args.data:
        if not args.weights:
            raise FxRebirthError(f"fxrebirth run {args.model}: give --weights (a model trained on your data); "
                                 "only googlenet_lrn has a default teacher")
        model = _load(args)
    options = {"schedule": args.schedule, "device": args.device, "precision": args.precision, "augment": args.augment}
    if args.init is not None:
        options["init"] = args.init
    if args.epochs is not None:
        options["epochs"] = args.epochs
    config = RunConfig(out=args.out, data=args.data, model=model, model_name=args.model, image_size=args.image_size,
                       plan_size=args.plan_size, train_images=args.train_images, test_images=args.test_images,
                       teacher=TeacherConfig(epochs=args.teacher_epochs or 4, width=args.width),
                       rebirth=RebirthConfig(**options), latency_rounds=args.latency_rounds,
                       bench=args.bench, bench_batches=tuple(args.bench_batch), bench_memory=not args.no_memory,
                       reduce_ratio=args.reduce_ratio, control=not args.no_control, plan_runtime=args.plan_for,
                       plan_table=args.table, streamline_kernel=args.streamline_kernel, keep=tuple(args.keep),
                       teacher_cost=_teacher_cost(args))
    return _report_of(args, run, config)


def _run_depth(args: argparse.Namespace) -> int:
    """``fxrebirth run mobilenet_v2``: the depth job (:mod:`fxrebirth.paper.depthrun`)."""
    from fxrebirth.paper.depthrun import DepthRunConfig, run_depth
    from fxrebirth.paper.teacher import TeacherConfig
    from fxrebirth.retraining.engine import RebirthConfig

    targets = tuple(args.target or (1.5,))
    if any(t <= 1 for t in targets):
        raise FxRebirthError(f"--target {min(targets)}: a target speed-up is above 1")
    options = {"device": args.device, "precision": args.precision, "augment": args.augment,
               "epochs": 1.5 if args.epochs is None else args.epochs}
    config = DepthRunConfig(model_name=args.model, out=args.out, image_size=args.image_size or 64,
                            plan_size=args.plan_size, train_images=args.train_images, test_images=args.test_images,
                            teacher=TeacherConfig(epochs=args.teacher_epochs or 6), rebirth=RebirthConfig(**options),
                            targets=targets, plan_runtime=args.plan_for, plan_table=args.table,
                            latency_rounds=args.latency_rounds,
                            bench=args.bench, control=not args.no_control)
    return _report_of(args, run_depth, config)


def _report_of(args: argparse.Namespace, job: Any, config: Any) -> int:
    """Run ``job(config)`` with progress bars (unless quiet or JSON) and print its report."""
    bars = _Bars(not args.quiet and not args.json)
    try:
        result = job(config, progress=bars)
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
        load_weights(model, args.weights, args.model)
    return model.eval()


def _plan(args: argparse.Namespace) -> int:
    from fxrebirth.frontends.deploy import lower_for
    from fxrebirth.retraining.planning import plan

    model = _load(args)
    x = torch.randn(1, 3, args.input_size, args.input_size)
    budget = args.budget_ms / 1e3 if args.budget_ms is not None else None
    result = plan(model, x, target_speedup=args.target_speedup, budget_s=budget, repeats=args.repeats,
                  reduce_ratio=args.reduce_ratio, streamline_kernel=args.streamline_kernel, runtime=args.runtime,
                  lowering=lower_for, device_table=args.table, keep=args.keep)
    if args.save:
        _write(args.save, result.to_json(indent=1))
    print(result.to_json(indent=1) if args.json else result.table())
    if args.save and not args.json:
        print(f"saved: {args.save}")
    return 0


def _profile(args: argparse.Namespace) -> int:
    from fxrebirth.retraining.profiling import profile

    model = _load(args)
    x = torch.randn(1, 3, args.input_size, args.input_size)
    manifest = profile(model, x, args.out, depth=args.depth, reduce_ratio=args.reduce_ratio,
                       streamline_kernel=args.streamline_kernel)
    with open(manifest) as f:
        pairs = len(json.load(f)["pairs"])
    use = (f"fxrebirth run {args.model} --plan-size {args.input_size} --table" if args.depth
           else f"fxrebirth plan {args.model} --input-size {args.input_size} --table")
    print(f"bundle: {args.out} (the whole model and {pairs} candidate pairs as ONNX, {os.path.basename(manifest)})\n"
          f"on the device (Python with numpy and onnxruntime or openvino; no torch):\n"
          f"  python time_on_device.py . --runtime openvino    # inside the copied folder\n"
          f"then here:\n  {use} {os.path.join(args.out, 'latency-openvino.json')}")
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
    from fxrebirth.frontends.deploy import lower_for

    model = _load(args)
    if args.threads:
        torch.set_num_threads(args.threads)  # every runtime of the table takes torch's count
    say = (lambda message: None) if args.quiet or args.json else (lambda message: print(message, file=sys.stderr))
    x = torch.randn(1, 3, args.input_size, args.input_size)
    say("exact tier")
    exact, _ = optimize(model, x)
    reborn, planned = None, None
    if not args.no_reborn:
        say("planning the rebirth (timing every region)")
        planned = make_plan(model, x, repeats=3, runtime=args.plan_for, lowering=lower_for,
                            reduce_ratio=args.reduce_ratio, streamline_kernel=args.streamline_kernel, keep=args.keep)
        if args.all_regions:
            for region in planned.regions:
                region.selected = True
            planned.keep(args.keep)
        if planned.selected:
            reborn = rebuild(capture(model, (x,)), planned).eval()
        else:
            say("no region worth merging: the table has no reborn rows")
    table = benchmark(model, exact=exact, reborn=reborn, image_size=args.input_size, batches=args.batch,
                      rounds=args.rounds, runtimes=args.runtime or RUNTIMES, exporter=args.exporter,
                      memory=not args.no_memory, layers=args.layers, name=args.model, progress=say,
                      lowering=lower_for)
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
        commands = {"plan": _plan, "optimize": _optimize, "profile": _profile, "bench": _bench, "run": _run,
                    "export": _export}
        return commands[args.command](args)
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
