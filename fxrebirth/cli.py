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

from fxrebirth.cli_args import build_parser, check_args, explicit_options, strategy_options
from fxrebirth.frontends.library import optimize
from fxrebirth.errors import FxRebirthError, first_line
from fxrebirth.paper.loading import PAPER_MODELS, load_model, load_trained, load_weights  # noqa: F401 - re-exported

__all__ = ["main", "load_model"]


def _export(args: argparse.Namespace) -> int:
    from fxrebirth.frontends.deploy import export_model

    model = _load(args)
    x = _example(model, args.batch, args.input_size)
    rewrites = 0
    if not args.as_is:
        from fxrebirth.measure.runtimes import for_target

        optimised, report = optimize(model, x, cost_model=for_target(args.to).cost_model())
        rewrites = report.rewrites
    written = export_model(optimised if not args.as_is else model, x, args.to, args.save)
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
    """``fxrebirth run MODEL``: one job for any model; the strategies that apply to it are chosen by the plan."""
    from fxrebirth.paper.runner import RunConfig, run
    from fxrebirth.paper.teacher import TeacherConfig
    from fxrebirth.retraining.engine import RebirthConfig

    model = _load(args) if args.weights else None
    training = _given(args, "init", "schedule", "layerwise_epochs", "device", "precision", "augment", "epochs")
    config = RunConfig(out=args.out, data=args.data, model=model, model_name=args.model, image_size=args.image_size,
                       plan_size=args.plan_size, train_images=args.train_images, test_images=args.test_images,
                       teacher=TeacherConfig(**_given(args, epochs="teacher_epochs", width="width")),
                       rebirth=RebirthConfig(**training),
                       strategies=tuple(dict.fromkeys(args.strategy)) if args.strategy else None,
                       strategy_options=strategy_options(args),
                       explicit=tuple(dict.fromkeys((*explicit_options(args), *training))),
                       targets=tuple(args.target or ()), keep=tuple(args.keep), runtime=args.runtime,
                       plan_table=args.table, latency_rounds=args.latency_rounds, bench=args.bench,
                       bench_batches=tuple(args.bench_batch), bench_memory=not args.no_memory,
                       control=not args.no_control, teacher_cost=_teacher_cost(args),
                       **{k: tuple(v) for k, v in _given(args, "mean", "std").items()},
                       **_given(args, "val_share", "budget"), max_drop=_max_drop(args))
    return _report_of(args, run, config)


def _max_drop(args: argparse.Namespace) -> float | None:
    """The accuracy budget: the one given, none when targets are (each target is a point), else 0.5 pt."""
    given = getattr(args, "max_drop", None)
    if given is not None:
        return given
    return None if args.target else 0.5


def _given(args: argparse.Namespace, *names: str, **renamed: str) -> dict[str, Any]:
    """The options among ``names`` (and ``renamed``: field -> argparse destination) the user set."""
    fields = {**{n: n for n in names}, **renamed}
    return {field: getattr(args, dest) for field, dest in fields.items() if getattr(args, dest, None) is not None}


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
    cost = {"images": args.teacher_images, "wall_s": args.teacher_hours * 3600 if args.teacher_hours else None,
            "epochs": args.teacher_epochs if args.weights else None}
    return cost if any(v is not None for v in cost.values()) else None


def _example(model: nn.Module, batch: int, size: int) -> torch.Tensor:
    """A random input for ``model``: ``batch`` images of ``size`` x ``size`` with the channels its first
    convolution takes (a grey model's 1)."""
    from fxrebirth.retraining.folders import input_channels

    return torch.randn(batch, input_channels(model, size), size, size)


def _load(args: argparse.Namespace) -> nn.Module:
    """The command's model: MODEL with ``--weights`` and ``--num-classes`` (:func:`load_trained`)."""
    return load_trained(args.model, args.weights or None, num_classes=getattr(args, "num_classes", None))


def _plan_of(args: argparse.Namespace, model: nn.Module, x: torch.Tensor, **more: Any) -> Any:
    """:func:`fxrebirth.plan` with the command line's strategies, options, target, runtime and device table;
    without ``--strategy`` the plan refuses an option set here that no strategy that applies reads."""
    from fxrebirth.retraining.planning import plan

    budget = getattr(args, "budget_ms", None)
    kwargs = dict(strategies=tuple(dict.fromkeys(args.strategy)) if args.strategy else None,
                  target_speedup=args.target, budget_s=budget / 1e3 if budget is not None else None,
                  keep=tuple(args.keep), runtime=args.runtime, device_table=args.table, **more,
                  **strategy_options(args))
    return plan(model, x, **kwargs)


def _plan(args: argparse.Namespace) -> int:
    model = _load(args)
    x = _example(model, 1, args.input_size)
    result = _plan_of(args, model, x, **({"rounds": args.rounds} if args.rounds else {}))
    if args.save:
        _write(args.save, result.to_json(indent=1))
    print(result.to_json(indent=1) if args.json else result.table())
    if args.save and not args.json:
        print(f"saved: {args.save}")
    return 0


def _profile(args: argparse.Namespace) -> int:
    from fxrebirth.measure.runtimes import runtime_names
    from fxrebirth.retraining.profiling import profile

    model = _load(args)
    x = _example(model, 1, args.input_size)
    strategies = tuple(dict.fromkeys(args.strategy)) if args.strategy else None
    manifest = profile(model, x, args.out, strategies=strategies, **strategy_options(args))
    with open(manifest) as f:
        pairs = len(json.load(f)["pairs"])
    runtime = args.runtime or runtime_names("device")[0]
    chosen = "".join(f" --strategy {name}" for name in strategies or ())
    print(f"bundle: {args.out} (the whole model and {pairs} candidate pairs as ONNX, {os.path.basename(manifest)})\n"
          f"on the device (Python with numpy and the runtime; no torch):\n"
          f"  python time_on_device.py . --runtime {runtime}    # inside the copied folder\n"
          f"then here:\n  fxrebirth plan {args.model} --input-size {args.input_size}{chosen} --table "
          f"{os.path.join(args.out, f'latency-{runtime}.json')}")
    return 0


def _cost_model(runtime: str | None) -> Any:
    """The exact tier's cost gate for ``runtime`` (None: eager PyTorch), as the runtime's record says."""
    from fxrebirth.measure.runtimes import DEFAULT_RUNTIME, get_runtime

    return get_runtime(runtime or DEFAULT_RUNTIME).cost_model()


def _optimize(args: argparse.Namespace) -> int:
    model = _load(args)
    x = _example(model, args.batch, args.input_size)
    gm, report = optimize(model, x, disable=args.disable, verify=not args.no_verify, cost_model=_cost_model(args.runtime))
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
    from fxrebirth.measure.speed import benchmark

    model = _load(args)
    if args.threads:
        torch.set_num_threads(args.threads)  # every runtime of the table takes torch's count
    say = (lambda message: None) if args.quiet or args.json else (lambda message: print(message, file=sys.stderr))
    x = _example(model, 1, args.input_size)
    say("exact tier")
    exact, _ = optimize(model, x)
    reborn, planned = None, None
    if not args.no_reborn:
        say("planning the rebirth (timing every candidate)")
        planned = _plan_of(args, model, x, rounds=3)
        reborn = _reborn_for_timing(model, x, planned, every=args.all_regions, keep=args.keep)
        if reborn is None:
            say("no candidate worth merging: the table has no reborn rows")
    table = benchmark(model, exact=exact, reborn=reborn, image_size=args.input_size, batches=args.batch,
                      rounds=args.rounds, exporter=args.exporter, memory=not args.no_memory, layers=args.layers,
                      name=args.model, progress=say, **_rows(args.rows))
    text = table.markdown()
    if reborn is not None:
        text += (f"\n\nreborn: {len(planned.selected)} candidates replaced by freshly initialised layers "
                 f"(planned {planned.estimated_speedup:.2f}x); retrain with `fxrebirth run` before deploying.")
    if args.layers:
        text += "\n\n" + table.layers_markdown()
    data = table.to_dict()
    if args.save:
        _write(args.save, text + "\n")
    print(json.dumps(data, indent=1, default=str) if args.json else text)
    return 0


def _reborn_for_timing(model: nn.Module, x: torch.Tensor, planned: Any, *, every: bool, keep: Sequence[str]) -> Any:
    """``model`` with the plan's selected candidates (``every``: every candidate, in graph order, that overlaps
    none taken before it, the kept ones aside) replaced by freshly initialised layers, for timing (latency does
    not depend on their values); None when none is selected."""
    from fxrebirth.graph.capture import capture
    from fxrebirth.retraining.planning import kept_ids, rebuild

    if every:
        kept, taken = set(kept_ids([c.region.id for c in planned.candidates], keep)), []
        for c in sorted(planned.candidates, key=lambda c: c.span):
            c.selected = c.region.id not in kept and all(c.span[1] < s[0] or s[1] < c.span[0] for s in taken)
            taken += [c.span] if c.selected else []
    return rebuild(capture(model, (x,)), planned).eval() if planned.selected else None


def _rows(rows: Sequence[str] | None) -> dict[str, Any]:
    """``benchmark``'s runtimes (the ``--rows`` given; None: every registered one) and lowering."""
    from fxrebirth.frontends.deploy import lower_for

    return {"lowering": lower_for, "runtimes": tuple(rows) if rows else None}


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
    args = build_parser().parse_args(argv)
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_args(args)
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
