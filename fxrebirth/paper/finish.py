"""A retrained point, finished: exported, evaluated on the test split, timed side by side, reported.

:func:`finish_point` is the last stage of ``fxrebirth run`` for every point, whether a target chose it or the
accuracy-budgeted search (:mod:`fxrebirth.paper.search`) did: the reborn model is saved as a torch.export program
(``reborn.pt2``), the exact tier folds what it can in the original and the reborn model, each model variant is
evaluated on the test split, and the speed table compares them under each runtime (the run's own runtime always
among them). The eager latency of the report is the speed table's eager row (without a table, one interleaved
eager measurement).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from typing import Any

import torch
from torch import nn

from fxrebirth.frontends.library import optimize
from fxrebirth.measure.runtimes import DEFAULT_RUNTIME, get_runtime, runtime_names
from fxrebirth.measure.speed import SpeedTable, benchmark, eager_latency, environment, layer_times, variants_for
from fxrebirth.paper.report import write_report
from fxrebirth.retraining.plandata import Plan
from fxrebirth.retraining.report import RebirthReport
from fxrebirth.retraining.train import Progress, ProgressFn, evaluate

__all__ = ["finish_point", "runtime_accuracies"]

log = logging.getLogger(__name__)


def finish_point(config: Any, model: nn.Module, chosen: Plan, reborn: nn.Module, report: RebirthReport, test: Any,
                 folder: str, progress: ProgressFn | None, *, size: int, **facts: Any) -> dict[str, Any]:
    """Export, evaluate, time and report one retrained point into ``folder`` (``config``: the run's
    :class:`~fxrebirth.paper.runner.RunConfig`; ``size``: the test images' size); ``facts`` (the teacher's
    record, the target, the search, the data's preprocessing) join the report. Returns the report as a dict."""
    channels = test[0][0].shape[0]  # the channels the model takes (the data were converted to them)
    example = torch.randn(1, channels, config.plan_size, config.plan_size)
    batch = torch.export.Dim("batch", max=4096)  # exported with a batch of 2: a size-1 example would specialise
    program = torch.export.export(reborn, (torch.randn(2, channels, size, size),), dynamic_shapes=({0: batch},))
    torch.export.save(program, os.path.join(folder, "reborn.pt2"))
    exact, _ = optimize(model, example)
    reborn_exact, _ = optimize(reborn, example)
    result = {"environment": environment(), **facts, "plan": json.loads(chosen.to_json()),
              "planned_speedup": chosen.estimated_speedup, "rebirth": report.to_dict(),
              "accuracy": _accuracies(report, exact, test)}
    if config.bench == "full":  # reduced-precision rows' accuracy beside their speed
        result["accuracy"].update(runtime_accuracies({"original": model, "reborn": reborn}, test, size))
    table = _speed(config, model, exact, reborn_exact, progress)
    result["latency"] = _eager_from(table) or eager_latency(model, reborn_exact, example, config.latency_rounds)
    if table is not None:
        result["speed"] = table.to_dict()
    result["layers_ms"] = table.layers_ms if table is not None else layer_times(model, reborn_exact, example)
    write_report(folder, result, chosen, report, table)
    return result


def _eager_from(table: SpeedTable | None) -> dict[str, Any] | None:
    """The report's eager latency as the speed table measured it (batch 1), or None without that row."""
    if table is None:
        return None
    rows = {(r["variant"], r["runtime"]): r for r in table.to_dict()["rows"]}
    original, reborn = rows.get(("original", DEFAULT_RUNTIME)), rows.get(("reborn", DEFAULT_RUNTIME))
    if not original or not reborn:
        return None
    o, n = original["ms"].get(1) or original["ms"].get("1"), reborn["ms"].get(1) or reborn["ms"].get("1")
    if not o or not n:
        return None
    size = table.to_dict().get("image_size")
    return {"original_ms": o, "reborn_ms": n, "speedup": o / n, "input_shape": [1, 3, size, size],
            "source": "the speed table's eager rows"}


def _accuracies(report: RebirthReport, exact: nn.Module, test: Any) -> dict[str, float | None]:
    """Held-out top-1 of each model variant. The exact tier is evaluated (it must equal the teacher's);
    runtimes run these same models, so a runtime's accuracy is its model's."""
    teacher = report.teacher["top1"] if report.teacher else None
    student = report.student["top1"] if report.student else None
    try:
        with torch.inference_mode():
            exact_top1 = evaluate(exact, test).top1
    except Exception as exc:  # the exact tier was optimised at the planning size; it may not run at another
        log.warning("run: the exact tier was not evaluated at the training size: %s", exc)
        exact_top1 = None
    return {"original": teacher, "exact tier": exact_top1, "reborn": student}


def runtime_accuracies(models: dict[str, nn.Module], test: Any, image_size: int,
                       runtime: str | None = None) -> dict[str, float]:
    """Held-out top-1 of each model as ``runtime`` computes it (OpenVINO at the precision it names: a
    bf16 row's accuracy), keyed ``"<name> (<runtime>)"``; nothing when the runtime is unavailable here
    (logged). Each model is exported at the test images' size with a free batch dimension."""
    import tempfile

    from fxrebirth.measure.deploy import OpenVINOModule
    from fxrebirth.measure.runtimes import available
    from fxrebirth.measure.runners import export_onnx

    if runtime is None:  # the first reduced-precision runtime that runs an ONNX file
        runtime = next((n for n in runtime_names() if get_runtime(n).precision != "f32"
                        and get_runtime(n).suffix == ".onnx"), None)
        if runtime is None:
            return {}
    reason = available(runtime)
    if reason:
        log.info("run: no %s accuracy: %s", runtime, reason)
        return {}
    out = {}
    x = torch.randn(2, test[0][0].shape[0], image_size, image_size)
    with tempfile.TemporaryDirectory(prefix="fxrebirth-accuracy-") as folder, torch.no_grad():
        for name, model in models.items():
            lowered, _ = get_runtime(runtime).lower(model.eval(), x)  # what the runtime has no kernel for
            path = export_onnx(lowered, x, os.path.join(folder, f"{name}.onnx"), dynamic_batch=True)
            reference = evaluate(model, test).predictions
            got = evaluate(OpenVINOModule(path, get_runtime(runtime).precision), test, reference=reference)
            log.info("run: %s under %s: top-1 %.2f%%, %.2f%% of its predictions as in f32 eager", name, runtime,
                     100 * got.top1, 100 * got.agreement)
            out[f"{name} ({runtime})"] = got.top1
    return out


def _speed(config: Any, model: nn.Module, exact: nn.Module, reborn: nn.Module,
           progress: ProgressFn | None) -> SpeedTable | None:
    if config.bench == "none":
        return None
    runtimes = runtime_names() if config.bench == "full" else runtime_names("fast")
    if config.runtime is not None and config.runtime not in runtimes:  # the runtime the plan was made for
        runtimes = [*runtimes, config.runtime]
    variants = variants_for(runtimes)
    steps = itertools.count()
    total = len(variants) * len(config.bench_batches) * 2 + (len(variants) if config.bench_memory else 0)

    def say(message: str) -> None:
        log.info("speed table: %s", message)
        if progress is not None:
            progress(Progress("speed table", min(next(steps), total), total, unit="step", info={"message": message}))

    return benchmark(model, exact=exact, reborn=reborn, image_size=config.plan_size, batches=config.bench_batches,
                     rounds=config.latency_rounds, runtimes=runtimes, memory=config.bench_memory,
                     name=config.model_name, progress=say)


