"""The main job, end to end: teacher -> plan -> retraining -> evaluation -> speed -> report, for ANY model.

:func:`run` is what ``fxrebirth run`` calls. The model is the user's (``model`` with ``data``: an ImageFolder
of their images) or a default teacher trained once on the embedded :class:`~fxrebirth.paper.data.Shapes` set
and cached: the paper's Caffe-style GoogLeNet (``googlenet_lrn``, at 32x32) or a torchvision architecture (at
64x64). Which strategies merge it never depends on its name: every registered strategy that finds a
candidate (or the ``strategies`` given); options none of them reads are refused before any work.

1. **Plan** at ``plan_size`` (the resolution whose latency matters) on ``runtime``, importance on calibration
   images from the training set; saved as ``plan.json`` (a resumed run reads it back).
2. **Points**: per target speed-up (none: every candidate worth merging) the plan's choice, retrained by
   :func:`fxrebirth.rebirth` (distillation, checkpoints under ``checkpoints/``, resume, the scratch control)
   and finished (merged exactly where a strategy merges); the exact tier then folds what it can.
3. **Speed**: original, exact tier and reborn model side by side, each figure measured once: the eager
   latency of the report is the speed table's eager row (without a table, one interleaved eager measurement).

The report folder holds ``report.md``, ``report.json``, ``plan.json``, PNG figures and the reborn model as a
torch.export program (``reborn.pt2``); with several targets, each point's in ``point-<target>/`` and the
measured front in ``report.md``.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from fxrebirth.errors import FxRebirthError
from fxrebirth.frontends.library import optimize
from fxrebirth.measure.runtimes import DEFAULT_RUNTIME, get_runtime, runtime_names
from fxrebirth.measure.speed import SpeedTable, benchmark, eager_latency, environment, layer_times, variants_for
from fxrebirth.paper.data import Shapes, image_folder
from fxrebirth.paper.report import PUBLISHED, summary_markdown, write_report
from fxrebirth.paper.teacher import TORCHVISION_TEACHERS, TeacherConfig, build_teacher, default_teacher
from fxrebirth.graph.capture import capture
from fxrebirth.retraining.engine import RebirthConfig, RebirthReport, rebirth
from fxrebirth.retraining.plandata import Plan, kept_ids
from fxrebirth.retraining.planning import mark, plan as make_plan
from fxrebirth.retraining.strategy import check_options, get_strategy
from fxrebirth.retraining.train import Arithmetic, Progress, ProgressFn, evaluate, resolve_device

__all__ = ["ResumeMismatch", "RunConfig", "run", "write_report", "runtime_accuracies"]

log = logging.getLogger(__name__)


class ResumeMismatch(FxRebirthError, ValueError):
    """The report folder holds a checkpointed run planned with other settings than the ones given."""


@dataclass
class RunConfig:
    """Settings of the main job (``fxrebirth run``)."""

    out: str = "fxrebirth-report"
    data: str | None = None
    """An ImageFolder path (the user's data; needs ``model``); None: the embedded Shapes set."""
    model: nn.Module | None = None
    """The user's model (weights loaded); None: the default teacher ``model_name`` names."""
    model_name: str = "googlenet_lrn"
    image_size: int | None = None
    """Training/evaluation resolution; None: 64 for a torchvision teacher, 32 otherwise."""
    plan_size: int = 224
    train_images: int = 20000
    test_images: int = 10000
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    rebirth: RebirthConfig = field(default_factory=RebirthConfig)
    strategies: tuple[str, ...] | None = None
    """Retraining strategies to plan with (None: every registered one that finds a candidate)."""
    strategy_options: dict[str, Any] = field(default_factory=dict)
    """The strategies' planning options (``streamline_kernel``, ``reduce_ratio``, ``max_convs``, ``prune``)."""
    explicit: tuple[str, ...] = ()
    """Names of the training options the user set: one no chosen strategy reads is refused before any work."""
    targets: tuple[float, ...] = ()
    """Target speed-ups, one retrained point each; (): one point, every candidate worth merging."""
    keep: tuple[str, ...] = ()
    """Candidates never merged (ids or id prefixes, :func:`fxrebirth.retraining.plandata.kept_ids`)."""
    runtime: str | None = None
    """The runtime the plan is measured on and the model will run on (None: eager PyTorch)."""
    plan_table: str | None = None
    """A device table of ``fxrebirth profile`` (:func:`fxrebirth.plan`'s ``device_table``) instead."""
    plan_rounds: int = 10
    calibration_images: int = 256
    latency_rounds: int = 20
    bench: str = "full"
    """The speed table's runtimes: ``full`` (every registered one), ``fast`` (those tagged fast) or ``none``."""
    bench_batches: tuple[int, ...] = (1, 8)
    bench_memory: bool = True
    control: bool = True
    """Also train the scratch control: the reborn architecture re-initialised, same loss and budget."""
    teacher_cost: dict[str, Any] | None = None
    """What training a given ``model`` cost (``images`` forward and backward, ``wall_s``), as its user states;
    the default teacher's is read from its training record."""
    mean: tuple[float, ...] | None = None
    """The user's normalisation (per channel, or one value for all); None: the model's own config where its
    library has one, else the ImageNet statistics. The report states which."""
    std: tuple[float, ...] | None = None
    val_share: float = 0.1
    """Share of the training images held out (seeded) as the validation split every decision is taken on."""
    max_drop: float | None = 0.5
    """The accuracy budget: the fastest model whose validation top-1 is at most this many points below the
    teacher's (None: the ``targets`` given, or every candidate worth merging, with no search)."""
    budget: float | None = 0.25
    """Retraining images of every point tried together, as a share of the teacher's training images (None:
    ``rebirth.epochs`` per point, no overall cap)."""


def _image_size(config: RunConfig) -> int:
    if config.image_size:
        return config.image_size
    return 64 if config.model is None and config.model_name in TORCHVISION_TEACHERS else 32


def _architecture(config: RunConfig) -> nn.Module:
    """The model to mark before anything trains: the given one, or the default teacher's untrained architecture
    (the candidates come from the architecture alone)."""
    if config.model is not None:
        return config.model
    return build_teacher(config.model_name, len(Shapes.classes), config.teacher.width)


def check_run(config: RunConfig) -> list[str]:
    """Refuse, before any work, what the run could not honour: a planning or training option no applicable
    strategy reads, a ``keep`` that names no candidate, an unknown runtime. Returns the applicable strategies."""
    Arithmetic.check(config.rebirth.precision, resolve_device(config.rebirth.device))
    if config.runtime is not None:
        get_runtime(config.runtime)
    if config.bench not in ("full", "fast", "none"):
        raise FxRebirthError(f"bench={config.bench!r}: use full, fast or none")
    x = torch.randn(1, 3, config.plan_size, config.plan_size)
    gm = capture(copy.deepcopy(_architecture(config)).eval(), (x,), variants=False)
    found = mark(gm, strategies=list(config.strategies) if config.strategies else None, **config.strategy_options)
    if not any(found.values()):
        raise FxRebirthError(f"{config.model_name}: no strategy ({', '.join(found) or 'of those registered'}) finds "
                             "anything to merge in this model")
    check_options(list(found), [o for o in config.explicit if o not in config.strategy_options])
    kept_ids([r.id for rs in found.values() for r in rs], config.keep)
    return list(found)


def _teacher_and_data(config: RunConfig, progress: ProgressFn | None) -> tuple[nn.Module, dict, Any, Any]:
    size = _image_size(config)
    if config.data is None:
        teacher_config = replace(config.teacher, arch=config.model_name, image_size=size,
                                 train_images=config.train_images, test_images=config.test_images)
        model, meta = (config.model, {"source": "given"}) if config.model is not None else \
            default_teacher(teacher_config, progress=progress, device=config.rebirth.device)
        train = Shapes("train", config.train_images, size, seed=teacher_config.seed)
        test = Shapes("test", config.test_images, size, seed=teacher_config.seed)
        return model.eval(), meta, train, test
    if config.model is None:
        raise FxRebirthError("--data needs a model trained on it (MODEL and --weights)")
    folder = image_folder(config.data, size)
    n_test = max(1, len(folder) // 5)
    generator = torch.Generator().manual_seed(0)
    train, test = torch.utils.data.random_split(folder, [len(folder) - n_test, n_test], generator=generator)
    train.classes = test.classes = folder.classes
    return config.model.eval(), {"source": "given"}, train, test


def run(config: RunConfig, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run the main job and write its report folder; return the report as a dict."""
    check_run(config)
    os.makedirs(config.out, exist_ok=True)
    model, meta, train, test = _teacher_and_data(config, progress)
    teacher_cost = config.teacher_cost
    if "epochs" in meta:  # the default teacher, trained here
        teacher_cost = {"images": meta["epochs"] * meta["train_images"], "wall_s": meta.get("wall_s")}
    plan = _plan(config, model, train)
    targets = config.targets or (None,)
    if len(targets) == 1:
        return _point(config, model, plan, targets[0], train, test, meta, teacher_cost, config.out, progress)
    points = [_point(config, model, plan, t, train, test, meta, teacher_cost,
                     os.path.join(config.out, f"point-{t:g}"), progress) for t in targets]
    result = {"environment": environment(), "model": config.model_name, "teacher": meta,
              "plan": {"latency_s": plan.latency_s, "source": plan.source, "candidates": len(plan.candidates),
                       "front": [vars(p) for p in plan.front]},
              "points": [_point_summary(p) for p in points], "published": PUBLISHED.get(config.model_name, [])}
    with open(os.path.join(config.out, "report.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(os.path.join(config.out, "report.md"), "w") as f:
        f.write(summary_markdown(config, result, plan))
    return result


def _plan_settings(config: RunConfig) -> dict[str, Any]:
    return {"strategies": list(config.strategies) if config.strategies else None,
            "options": dict(sorted(config.strategy_options.items())), "runtime": config.runtime,
            "plan_table": config.plan_table, "plan_size": config.plan_size}


def _plan(config: RunConfig, model: nn.Module, train: Any) -> Plan:
    """The plan of this run: the saved one when its settings are these (planning again could choose other
    candidates where timings are close); refused when a checkpointed run was planned otherwise."""
    plan_path, settings_path = os.path.join(config.out, "plan.json"), os.path.join(config.out, "plan-settings.json")
    settings = _plan_settings(config)
    if os.path.exists(plan_path) and os.path.exists(settings_path):
        with open(settings_path) as f:
            saved = json.load(f)
        if saved != settings and any(n.endswith(".ckpt") for _, _, ns in os.walk(config.out) for n in ns):
            changed = ", ".join(f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in settings.items()
                                if saved.get(k) != v)
            raise ResumeMismatch(f"{config.out} holds a run planned with other settings ({changed}); resume it with "
                                 "the same settings, or give a fresh --out")
        if saved == settings:
            with open(plan_path) as f:
                log.info("run: the plan of %s", plan_path)
                return Plan.from_json(f.read())
    strategies = list(config.strategies) if config.strategies else None
    needs = any(get_strategy(n).needs_calibration for n in (strategies or ["depth"]))
    calibration = torch.stack([train[i][0] for i in range(min(config.calibration_images, len(train)))]) \
        if needs else None
    plan = make_plan(model, torch.randn(1, 3, config.plan_size, config.plan_size), strategies=strategies,
                     calibration=calibration, runtime=config.runtime, rounds=config.plan_rounds,
                     device_table=config.plan_table, **config.strategy_options)
    with open(plan_path, "w") as f:
        f.write(plan.to_json(indent=1))
    with open(settings_path, "w") as f:
        json.dump(settings, f, indent=1)
    return plan


def _point(config: RunConfig, model: nn.Module, plan: Plan, target: float | None, train: Any, test: Any,
           meta: dict, teacher_cost: dict | None, folder: str, progress: ProgressFn | None) -> dict[str, Any]:
    """One retrained point: the plan's choice for ``target``, retrained, finished, evaluated and timed."""
    chosen = Plan.from_json(plan.to_json())
    chosen.select(target_speedup=target, keep=config.keep)
    os.makedirs(folder, exist_ok=True)
    example = torch.randn(1, 3, config.plan_size, config.plan_size)
    reborn, report = rebirth(model, chosen, train, test_data=test, config=config.rebirth,
                             checkpoint_dir=os.path.join(folder, "checkpoints"), progress=progress,
                             control=config.control, teacher_cost=teacher_cost)
    size = _image_size(config)
    batch = torch.export.Dim("batch", max=4096)  # exported with a batch of 2: a size-1 example would specialise
    program = torch.export.export(reborn, (torch.randn(2, 3, size, size),), dynamic_shapes=({0: batch},))
    torch.export.save(program, os.path.join(folder, "reborn.pt2"))
    exact, _ = optimize(model, example)
    reborn_exact, _ = optimize(reborn, example)
    result = {"environment": environment(), "teacher": meta, "target": target, "plan": json.loads(chosen.to_json()),
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


def _point_summary(result: dict[str, Any]) -> dict[str, Any]:
    rebirth_report, control = result["rebirth"], result["rebirth"].get("control") or {}
    teacher, student = rebirth_report.get("teacher") or {}, rebirth_report.get("student") or {}
    return {"target": result["target"] or 0.0, "estimated_speedup": result["planned_speedup"],
            "segments": len(result["plan"]["candidates"]), "eager_latency": result["latency"], "speed": result.get("speed"),
            "teacher_top1": teacher.get("top1"), "top1": student.get("top1"),
            "difference_interval": rebirth_report.get("difference_interval"), "control_top1": control.get("top1"),
            "reborn_minus_control": control.get("reborn_minus_control"),
            "trained_images": rebirth_report.get("trained_images"), "teacher_share": rebirth_report.get("teacher_share"),
            "calibration_images": rebirth_report.get("calibration_images"), "wall_s": rebirth_report.get("wall_s"),
            "control_wall_s": control.get("wall_s")}


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
    x = torch.randn(2, 3, image_size, image_size)
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


def _speed(config: RunConfig, model: nn.Module, exact: nn.Module, reborn: nn.Module,
           progress: ProgressFn | None) -> SpeedTable | None:
    if config.bench == "none":
        return None
    runtimes = runtime_names() if config.bench == "full" else runtime_names("fast")
    variants = variants_for(runtimes)
    steps = itertools.count()
    total = len(variants) * len(config.bench_batches) * 2 + (len(variants) if config.bench_memory else 0)

    def say(message: str) -> None:
        log.info("speed table: %s", message)
        if progress is not None:
            progress(Progress("speed table", min(next(steps), total), total, unit="step", info={"message": message}))

    return benchmark(model, exact=exact, reborn=reborn, image_size=config.plan_size, batches=config.bench_batches,
                     rounds=config.latency_rounds, runtimes=runtimes, memory=config.bench_memory,
                     name=config.model_name, progress=say, )


