"""The main job, end to end: teacher -> plan -> retraining -> evaluation -> speed -> report, for ANY model.

:func:`run` is what ``fxrebirth run`` calls. The model is the user's (``model`` with ``data``: an ImageFolder
of their images, :func:`fxrebirth.retraining.folders.user_data`) or a default teacher trained once on the
embedded :class:`~fxrebirth.paper.data.Shapes` set and cached: the paper's Caffe-style GoogLeNet
(``googlenet_lrn``, at 32x32) or a torchvision architecture (at 64x64). Which strategies merge it never depends
on its name: every registered strategy that finds a candidate (or the ``strategies`` given); options none of
them reads are refused before any work.

0. **Splits**: training images (planning, calibration, retraining), a validation split (every decision: a
   seeded hold-out of the training images) and a test split evaluated once, at the end. On the user's images
   a teacher near chance on the validation split is refused (the images are not prepared as it was trained).
1. **Plan** at ``plan_size`` (the resolution whose latency matters) on ``runtime``, importance on calibration
   images from the training set; saved as ``plan.json`` (a resumed run reads it back).
2. **Points**: with an accuracy budget (``max_drop``, the default) the search of :mod:`fxrebirth.paper.search`
   retrains points of the plan's front within the retraining budget (``budget``, a share of the teacher's
   training images) and keeps the fastest within the drop on the validation split; with target speed-ups,
   one point per target (none: every candidate worth merging). Each point is retrained by
   :func:`fxrebirth.rebirth` (distillation, checkpoints, resume; the scratch control of the point reported)
   and finished (merged exactly where a strategy merges); the exact tier then folds what it can.
3. **Finish** (:mod:`fxrebirth.paper.finish`): the test split evaluated once, original, exact tier and reborn
   model timed side by side (the plan's runtime among the rows), the report written.

The report folder holds ``report.md``, ``report.json``, ``plan.json``, PNG figures, the reborn model as a
torch.export program (``reborn.pt2``) and, after a search, ``search.json`` and ``points/``; with several
targets, each point's in ``point-<target>/`` and the measured front in ``report.md``.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch
from torch import nn

from fxrebirth.errors import FxRebirthError
from fxrebirth.measure.runtimes import get_runtime
from fxrebirth.measure.speed import environment
from fxrebirth.paper.data import Shapes
from fxrebirth.paper.finish import finish_point, runtime_accuracies
from fxrebirth.paper.report import PUBLISHED, summary_markdown, write_report
from fxrebirth.paper.search import NothingWithinDrop, front_points, most_tries, point_folder, save_search, search
from fxrebirth.paper.teacher import TORCHVISION_TEACHERS, TeacherConfig, build_teacher, default_teacher
from fxrebirth.graph.capture import capture
from fxrebirth.retraining.engine import RebirthConfig, rebirth
from fxrebirth.retraining.folders import hold_out, input_channels, user_data
from fxrebirth.retraining.plandata import Plan, kept_ids
from fxrebirth.retraining.planning import mark, plan as make_plan
from fxrebirth.retraining.strategy import check_options, get_strategy
from fxrebirth.retraining.train import Arithmetic, ProgressFn, evaluate, resolve_device

__all__ = ["ResumeMismatch", "RunConfig", "Splits", "run", "write_report", "runtime_accuracies"]

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
    architecture = _architecture(config)
    x = torch.randn(1, input_channels(architecture, config.plan_size), config.plan_size, config.plan_size)
    gm = capture(copy.deepcopy(architecture).eval(), (x,), variants=False)
    found = mark(gm, strategies=list(config.strategies) if config.strategies else None, **config.strategy_options)
    if not any(found.values()):
        raise FxRebirthError(f"{config.model_name}: no strategy ({', '.join(found) or 'of those registered'}) finds "
                             "anything to merge in this model")
    check_options(list(found), [o for o in config.explicit if o not in config.strategy_options])
    kept_ids([r.id for rs in found.values() for r in rs], config.keep)
    return list(found)


class Splits(NamedTuple):
    """The run's data: ``train`` (retraining, planning, calibration), ``val`` (every decision), ``test``
    (evaluated once, at the end), and what was done to the images (for the report)."""

    train: Any
    val: Any
    test: Any
    preprocessing: dict[str, Any]


def _teacher_and_data(config: RunConfig, progress: ProgressFn | None) -> tuple[nn.Module, dict, Splits]:
    """The teacher (the given model, or the default teacher trained once and cached) and the splits: the
    user's folder (:func:`fxrebirth.retraining.folders.user_data`), or the embedded Shapes set (its test split
    apart; the validation split a seeded hold-out of the training split)."""
    size = _image_size(config)
    if config.data is None:
        teacher_config = replace(config.teacher, arch=config.model_name, image_size=size,
                                 train_images=config.train_images, test_images=config.test_images)
        model, meta = (config.model, {"source": "given"}) if config.model is not None else \
            default_teacher(teacher_config, progress=progress, device=config.rebirth.device)
        train, val = hold_out(Shapes("train", config.train_images, size, seed=teacher_config.seed), config.val_share)
        test = Shapes("test", config.test_images, size, seed=teacher_config.seed)
        facts = {"data": "the embedded Shapes set", "size": size, "train": len(train), "val": len(val),
                 "test": len(test), "normalisation": "the set's own"}
        return model.eval(), meta, Splits(train, val, test, facts)
    if config.model is None:
        raise FxRebirthError("--data needs a model trained on it (MODEL and --weights)")
    data = user_data(config.data, size=size, channels=input_channels(config.model), mean=config.mean,
                     std=config.std, val_share=config.val_share, model=config.model)
    return config.model.eval(), {"source": "given"}, Splits(data.train, data.val, data.test, data.preprocessing)


def _teacher_cost(config: RunConfig, meta: dict, data: Splits) -> dict[str, Any] | None:
    """What training the teacher cost: the default teacher's from its record; a given model's as its user
    states it, images or epochs (of the training images the run was given, validation hold-out included)."""
    if "epochs" in meta:  # the default teacher, trained here
        return {"images": meta["epochs"] * meta["train_images"], "wall_s": meta.get("wall_s")}
    cost = {k: v for k, v in (config.teacher_cost or {}).items() if v is not None}
    if cost.get("images") is None and cost.get("epochs") is not None:
        cost["images"] = int(round(cost["epochs"] * (len(data.train) + len(data.val))))
    return cost or None


def _check_teacher(model: nn.Module, val: Any, users: bool) -> float:
    """The teacher's validation top-1. On the user's images (``users``), a teacher near chance means they are
    not prepared as it was trained on them (normalisation, size, class order): refused before any training."""
    top1 = evaluate(model, val, name="the validation split").top1
    classes = len(getattr(val, "classes", ())) or 0
    if users and classes > 1 and top1 < 1.5 / classes:
        raise FxRebirthError(f"the model scores {top1:.1%} on the validation split, near chance ({1 / classes:.1%}): "
                             "the images are not what it was trained on; give --mean/--std and --image-size as you "
                             "trained it")
    return top1


def run(config: RunConfig, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run the main job and write its report folder; return the report as a dict."""
    applicable = check_run(config)
    os.makedirs(config.out, exist_ok=True)
    model, meta, data = _teacher_and_data(config, progress)
    teacher_cost = _teacher_cost(config, meta, data)
    meta = {**meta, "val_top1": _check_teacher(model, data.val, users=config.data is not None)}
    plan = _plan(_search_space(config, applicable), model, data.train)
    if config.max_drop is not None and not config.targets:
        return _searched(config, model, plan, data, meta, teacher_cost, progress)
    targets = config.targets or (None,)
    if len(targets) == 1:
        return _point(config, model, plan, targets[0], data, meta, teacher_cost, config.out, progress)
    points = [_point(config, model, plan, t, data, meta, teacher_cost, os.path.join(config.out, f"point-{t:g}"),
                     progress) for t in targets]
    result = {"environment": environment(), "model": config.model_name, "teacher": meta,
              "plan": {"latency_s": plan.latency_s, "source": plan.source, "candidates": len(plan.candidates),
                       "front": [vars(p) for p in plan.front]},
              "points": [_point_summary(p) for p in points], "published": PUBLISHED.get(config.model_name, [])}
    with open(os.path.join(config.out, "report.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(os.path.join(config.out, "report.md"), "w") as f:
        f.write(summary_markdown(config, result, plan))
    return result


def _search_space(config: RunConfig, applicable: list[str]) -> RunConfig:
    """The accuracy budget's search explores every geometry a strategy offers unless the user chose one: the
    streamline chains once per kernel policy (``streamline_kernel="each"``), so the front holds e.g. a stem that
    keeps its pooling beside one that does not."""
    searching = config.max_drop is not None and not config.targets
    if not searching or "streamline" not in applicable or "streamline_kernel" in config.strategy_options:
        return config
    return replace(config, strategy_options={**config.strategy_options, "streamline_kernel": "each"})


def _searched(config: RunConfig, model: nn.Module, plan: Plan, data: Splits, meta: dict,
              teacher_cost: dict | None, progress: ProgressFn | None) -> dict[str, Any]:
    """The accuracy-budgeted run: the search along the plan's front (:mod:`fxrebirth.paper.search`), then the
    chosen point evaluated once on the test split (with the scratch control when asked) and finished."""
    teacher_images = (teacher_cost or {}).get("images")
    tries = most_tries(len(front_points(plan, config.keep)))
    budget_images = int(config.budget * teacher_images) if config.budget is not None and teacher_images else None
    if "epochs" in config.explicit or budget_images is None:
        per_point = int(round(config.rebirth.epochs * len(data.train)))
        if budget_images is None:
            log.warning("run: the teacher's training cost is unknown (give --teacher-images or --teacher-epochs): "
                        "each point retrains %d images, %.2g epochs", per_point, config.rebirth.epochs)
    else:
        per_point = budget_images // max(tries, 1)
    if budget_images is not None and per_point * tries > budget_images:
        log.warning("run: --epochs %.2g per point may spend up to %d images in %d points, over the budget of %d",
                    config.rebirth.epochs, per_point * tries, tries, budget_images)
    point_config = replace(config.rebirth, epochs=per_point / len(data.train))
    path = os.path.join(config.out, "search.json")
    result, chosen, _, _ = search(model, plan, data.train, data.val, max_drop=config.max_drop, config=point_config,
                                  folder=config.out, budget_images=budget_images, teacher_images=teacher_images,
                                  keep=config.keep, progress=progress, on_trial=lambda r: save_search(path, r))
    if chosen is None:
        closest = min(result.trials, key=lambda t: t.drop, default=None)
        said = f"; the closest, {closest.estimated_speedup:.2f}x, lost {closest.drop:.2f} pt" if closest else ""
        raise NothingWithinDrop(f"no point of the front stays within --max-drop {config.max_drop:g} on the validation "
                                f"split{said} ({path}); allow a larger drop or a larger --budget")
    folder = point_folder(config.out, result.points[result.chosen])
    # the chosen point's finished checkpoint is read back; the test split is evaluated here, once
    reborn, report = rebirth(model, chosen, data.train, test_data=data.test, config=point_config,
                             checkpoint_dir=os.path.join(folder, "checkpoints"), progress=progress,
                             control=config.control, teacher_cost=teacher_cost)
    return finish_point(config, model, chosen, reborn, report, data.test, config.out, progress,
                        size=_image_size(config), teacher=meta, target=None, search=result.to_dict(),
                        data=data.preprocessing)


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
    example = torch.randn(1, input_channels(model, config.plan_size), config.plan_size, config.plan_size)
    plan = make_plan(model, example, strategies=strategies,
                     calibration=calibration, runtime=config.runtime, rounds=config.plan_rounds,
                     device_table=config.plan_table, **config.strategy_options)
    with open(plan_path, "w") as f:
        f.write(plan.to_json(indent=1))
    with open(settings_path, "w") as f:
        json.dump(settings, f, indent=1)
    return plan


def _point(config: RunConfig, model: nn.Module, plan: Plan, target: float | None, data: Splits, meta: dict,
           teacher_cost: dict | None, folder: str, progress: ProgressFn | None) -> dict[str, Any]:
    """One retrained point: the plan's choice for ``target``, retrained, finished, evaluated and timed."""
    chosen = Plan.from_json(plan.to_json())
    chosen.select(target_speedup=target, keep=config.keep)
    os.makedirs(folder, exist_ok=True)
    reborn, report = rebirth(model, chosen, data.train, test_data=data.test, config=config.rebirth,
                             checkpoint_dir=os.path.join(folder, "checkpoints"), progress=progress,
                             control=config.control, teacher_cost=teacher_cost)
    return finish_point(config, model, chosen, reborn, report, data.test, folder, progress, size=_image_size(config),
                        teacher=meta, target=target, data=data.preprocessing)


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


