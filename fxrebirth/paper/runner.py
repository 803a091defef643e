"""The main job, end to end: teacher -> plan -> rebirth and retraining -> evaluation -> latency -> report.

:func:`run` is what ``fxrebirth run`` calls. Defaults reproduce DeepRebirth's experiment on this machine:
the Caffe-style GoogLeNet, trained once on the embedded :class:`~fxrebirth.paper.data.Shapes` set at 32x32 and
cached, planned at 224x224 (the resolution whose latency matters), retrained at 32x32, and timed at
224x224. Every stage reports progress through ``progress``; the retraining checkpoints after each step
under ``out/checkpoints`` so an interrupted run resumes.

The report folder holds ``report.md`` (tables), ``report.json`` (every number), ``plan.json``, PNG figures
(matplotlib), and the reborn model as a torch.export program (``reborn.pt2``, loads without unpickling).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fxrebirth.errors import FxRebirthError
from fxrebirth.frontends.deploy import lower_for
from fxrebirth.frontends.library import optimize
from fxrebirth.paper.data import Shapes, image_folder
from fxrebirth.graph.capture import capture
from fxrebirth.retraining.planning import Plan, kept_ids, mark_regions, plan as make_plan
from fxrebirth.retraining.engine import RebirthConfig, RebirthReport, rebirth
from fxrebirth.paper.teacher import TeacherConfig, build_teacher, default_teacher
from fxrebirth.measure.speed import RUNTIMES, SpeedTable, benchmark, environment, layer_times, variants_for
from fxrebirth.measure.table import layers_markdown
from fxrebirth.retraining.train import Arithmetic, Progress, ProgressFn, evaluate, resolve_device

__all__ = ["ResumeMismatch", "RunConfig", "run", "write_report"]

log = logging.getLogger(__name__)


class ResumeMismatch(FxRebirthError, ValueError):
    """The report folder holds a checkpointed run planned with other settings than the ones given."""


@dataclass
class RunConfig:
    """Settings of the main job (``fxrebirth run``)."""

    out: str = "fxrebirth-report"
    data: str | None = None
    """An ImageFolder path (the user's data; needs ``model`` and ``weights``); None: the embedded set."""
    model: nn.Module | None = None
    model_name: str = "googlenet_lrn"
    image_size: int = 32
    plan_size: int = 224
    train_images: int = 20000
    test_images: int = 10000
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    rebirth: RebirthConfig = field(default_factory=RebirthConfig)
    latency_rounds: int = 20
    plan_repeats: int = 3
    reduce_ratio: float | None = None
    """Width of the inception reduce layers in the rebirth layers (None: the planner's default, 0.5);
    thinner is faster and costs more accuracy (docs/results.md, "What the paper's 3.87x would take")."""
    streamline_kernel: str = "field"
    """The streamline rebirth layers' kernel policy: ``field`` (covers the chain's receptive field),
    ``conv`` (the first convolution's kernel, DeepRebirth's geometry; fewer FLOPs, docs/results.md) or
    ``pool`` (the convolution and its max-pooling kept, only the LRN removed)."""
    keep: tuple[str, ...] = ()
    """Regions never merged (ids or id prefixes, :func:`fxrebirth.retraining.planning.kept_ids`): the
    original layers stay, for accuracy (docs/results.md measures what each region costs)."""
    plan_runtime: str = "eager"
    """The runtime every region is timed through when planning (:func:`fxrebirth.plan`'s ``runtime``)."""
    plan_table: str | None = None
    """A device table of ``fxrebirth profile`` (:func:`fxrebirth.plan`'s ``device_table``) instead."""
    bench: str = "full"
    """The speed table's runtimes: ``full`` (every runtime of :mod:`fxrebirth.measure.speed`), ``fast`` (eager and
    ONNX Runtime: no compilation) or ``none``."""
    bench_batches: tuple[int, ...] = (1, 8)
    bench_memory: bool = True
    """Size on disk and peak inference memory, each variant in a process of its own."""
    control: bool = True
    """Also train the scratch control: the reborn architecture re-initialised, same loss and budget."""
    teacher_cost: dict[str, Any] | None = None
    """What training a given ``model`` cost (``images`` forward and backward, ``wall_s``), as its user states;
    the default teacher's is read from its training record."""


def run(config: RunConfig, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run the main job and write its report folder; return the report as a dict."""
    # a device or precision this machine lacks is refused before the teacher trains
    Arithmetic.check(config.rebirth.precision, resolve_device(config.rebirth.device))
    _check_keep(config)
    os.makedirs(config.out, exist_ok=True)
    if config.data is None:
        teacher_config = TeacherConfig(**{**config.teacher.__dict__, "image_size": config.image_size,
                                          "train_images": config.train_images, "test_images": config.test_images})
        model, teacher_meta = (config.model, {"source": "given"}) if config.model is not None else \
            default_teacher(teacher_config, progress=progress, device=config.rebirth.device)
        train = Shapes("train", config.train_images, config.image_size, seed=teacher_config.seed)
        test = Shapes("test", config.test_images, config.image_size, seed=teacher_config.seed)
    else:
        if config.model is None:
            raise ValueError("--data needs a model trained on it (MODEL and --weights)")
        model, teacher_meta = config.model, {"source": "given"}
        folder = image_folder(config.data, config.image_size)
        n_test = max(1, len(folder) // 5)
        generator = torch.Generator().manual_seed(0)
        train, test = torch.utils.data.random_split(folder, [len(folder) - n_test, n_test], generator=generator)
        train.classes = test.classes = folder.classes
    model = model.eval()
    example = torch.randn(1, 3, config.plan_size, config.plan_size)
    checkpoint_dir = os.path.join(config.out, "checkpoints")
    plan = _plan(config, model, example, checkpoint_dir)
    teacher_cost = config.teacher_cost
    if "epochs" in teacher_meta:  # the default teacher, trained here
        teacher_cost = {"images": teacher_meta["epochs"] * teacher_meta["train_images"],
                        "wall_s": teacher_meta.get("wall_s")}
    reborn, report = rebirth(model, plan, train, test_data=test, config=config.rebirth,
                             checkpoint_dir=checkpoint_dir, progress=progress, latency_input=example,
                             latency_rounds=config.latency_rounds, control=config.control,
                             teacher_cost=teacher_cost)
    batch = torch.export.Dim("batch", max=4096)  # exported with a batch of 2: a size-1 example would specialise
    program = torch.export.export(reborn, (torch.randn(2, 3, config.image_size, config.image_size),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, os.path.join(config.out, "reborn.pt2"))
    exact, _ = optimize(model, example)
    result = {"environment": environment(), "teacher": teacher_meta, "plan": json.loads(plan.to_json()),
              "planned_speedup": plan.estimated_speedup, "rebirth": report.to_dict(), "latency": report.latency,
              "accuracy": _accuracies(report, exact, test)}
    if config.bench == "full":  # the bf16 rows' accuracy beside their speed
        result["accuracy"].update(runtime_accuracies({"original": model, "reborn": reborn}, test, config.image_size))
    table = _speed(config, model, exact, reborn, progress)
    if table is not None:
        result["speed"] = table.to_dict()
    result["layers_ms"] = table.layers_ms if table is not None else layer_times(model, reborn, example)
    write_report(config.out, result, plan, report, table)
    return result


def _check_keep(config: RunConfig) -> None:
    """Refuse a ``keep`` that names no region before anything trains: the regions and their ids come from the
    architecture alone, so the untrained default teacher (or the given model) is marked, nothing timed."""
    if not config.keep:
        return
    model = config.model if config.model is not None else build_teacher(config.teacher.arch, len(Shapes.classes),
                                                                         config.teacher.width)
    gm = capture(model.eval(), (torch.randn(1, 3, config.plan_size, config.plan_size),), variants=False)
    ids = [r.id for r in mark_regions(gm, reduce_ratio=config.reduce_ratio, streamline_kernel=config.streamline_kernel)]
    kept_ids(ids, config.keep)


def _plan_settings(config: RunConfig) -> dict[str, Any]:
    settings = {"reduce_ratio": config.reduce_ratio, "streamline_kernel": config.streamline_kernel,
                "plan_runtime": config.plan_runtime, "plan_table": config.plan_table, "plan_size": config.plan_size}
    if config.keep:  # only when set, so that runs saved before the option existed still resume
        settings["keep"] = list(config.keep)
    return settings


def _plan(config: RunConfig, model: nn.Module, example: torch.Tensor, checkpoint_dir: str) -> Plan:
    """The plan of this run: the saved one when a checkpoint resumes (planning again could select other
    regions where timings are close), refused when it was made with other planning settings."""
    plan_path = os.path.join(config.out, "plan.json")
    settings_path = os.path.join(config.out, "plan-settings.json")
    settings = _plan_settings(config)
    if os.path.exists(plan_path) and os.path.exists(os.path.join(checkpoint_dir, "rebirth.ckpt")):
        saved = None
        if os.path.exists(settings_path):
            with open(settings_path) as f:
                saved = json.load(f)
        if saved is not None and saved != settings:
            changed = ", ".join(f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in settings.items()
                                if saved.get(k) != v)
            raise ResumeMismatch(f"{config.out} holds a run planned with other settings ({changed}); resume "
                                 "it with the same settings, or give a fresh --out")
        with open(plan_path) as f:
            plan = Plan.from_json(f.read())
        log.info("run: resuming with %s", plan_path)
        return plan
    plan = make_plan(model, example, repeats=config.plan_repeats, reduce_ratio=config.reduce_ratio,
                     streamline_kernel=config.streamline_kernel, runtime=config.plan_runtime,
                     lowering=lower_for, device_table=config.plan_table, keep=config.keep)
    with open(plan_path, "w") as f:
        f.write(plan.to_json(indent=1))
    with open(settings_path, "w") as f:
        json.dump(settings, f, indent=1)
    return plan


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
                       runtime: str = "openvino bf16") -> dict[str, float]:
    """Held-out top-1 of each model as ``runtime`` computes it (OpenVINO at the precision it names: a
    bf16 row's accuracy), keyed ``"<name> (<runtime>)"``; nothing when the runtime is unavailable here
    (logged). Each model is exported at the test images' size with a free batch dimension."""
    import tempfile

    from fxrebirth.measure.deploy import OPENVINO_PRECISION, OpenVINOModule, unavailable
    from fxrebirth.measure.runners import export_onnx

    reason = unavailable(runtime)
    if reason:
        log.info("run: no %s accuracy: %s", runtime, reason)
        return {}
    out = {}
    x = torch.randn(2, 3, image_size, image_size)
    with tempfile.TemporaryDirectory(prefix="fxrebirth-accuracy-") as folder, torch.no_grad():
        for name, model in models.items():
            lowered, _ = lower_for(model.eval(), runtime, x)  # OpenVINO: ceil-mode windows wider than the input
            path = export_onnx(lowered, x, os.path.join(folder, f"{name}.onnx"), dynamic_batch=True)
            reference = evaluate(model, test).predictions
            got = evaluate(OpenVINOModule(path, OPENVINO_PRECISION[runtime]), test, reference=reference)
            log.info("run: %s under %s: top-1 %.2f%%, %.2f%% of its predictions as in f32 eager", name, runtime,
                     100 * got.top1, 100 * got.agreement)
            out[f"{name} ({runtime})"] = got.top1
    return out


def _speed(config: RunConfig, model: nn.Module, exact: nn.Module, reborn: nn.Module,
           progress: ProgressFn | None) -> SpeedTable | None:
    if config.bench == "none":
        return None
    if config.bench not in ("full", "fast"):
        raise ValueError(f"bench={config.bench!r}: use full, fast or none")
    runtimes = RUNTIMES if config.bench == "full" else ("eager", "onnxruntime")
    variants = variants_for(runtimes)
    steps = itertools.count()
    total = len(variants) * len(config.bench_batches) * 2 + (len(variants) if config.bench_memory else 0)

    def say(message: str) -> None:
        log.info("speed table: %s", message)
        if progress is not None:
            progress(Progress("speed table", min(next(steps), total), total, unit="step", info={"message": message}))

    return benchmark(model, exact=exact, reborn=reborn, image_size=config.plan_size, batches=config.bench_batches,
                     rounds=config.latency_rounds, runtimes=runtimes, memory=config.bench_memory,
                     name=config.model_name, progress=say, lowering=lower_for)


def write_report(out: str, result: dict[str, Any], plan: Plan, report: RebirthReport,
                 table: SpeedTable | None = None) -> None:
    """``report.md``, ``report.json`` and the figures."""
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    figures = _figures(out, report, result) + _speed_figures(out, result)
    lat = result["latency"]
    env = result["environment"]
    lines = [
        "# fxrebirth report", "",
        f"Environment: {env['cpu']}, {env['cpu_count']} CPUs, torch {env['torch']} with {env['torch_threads']} "
        f"threads, Python {env['python']}.", "",
        "## Accuracy and retraining", "", "```", report.table(), "```", "",
        "## Speed", "",
        f"| model | latency (ms, batch 1, {lat['input_shape'][2]}x{lat['input_shape'][3]}, eager) | speed-up |",
        "|---|---|---|",
        f"| original | {lat['original_ms']:.2f} | 1.00x |",
        f"| reborn | {lat['reborn_ms']:.2f} | {lat['speedup']:.2f}x |", "",
        f"The planner predicted {result['planned_speedup']:.2f}x; measured/predicted = "
        f"{lat['speedup'] / result['planned_speedup']:.2f}.", "",
    ]
    if table is not None:
        lines += ["### Every runtime, side by side", "",
                  "The original and the reborn model in eager are measured again here, among all the rows; "
                  "where the two measurements differ, the difference is the machine's noise.", "",
                  table.markdown(), ""]
    layers = result.get("layers_ms")
    if layers:
        lines += ["### Time by layer kind (eager, batch 1, every node timed on its own)", "",
                  layers_markdown(layers), ""]
    acc = result.get("accuracy", {})
    lines += ["### Accuracy of each model variant", "",
              "| model | held-out top-1 |", "|---|---|"]
    lines += [f"| {k} | {v:.2%} |" if v is not None else f"| {k} | not evaluated |" for k, v in acc.items()]
    lines += [
        "",
        "## Plan (which layers each rebirth layer replaces)", "", "```", plan.table(), "```", "",
    ]
    lines += [f"![{name}]({name})" for name in figures]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _figures(out: str, report: RebirthReport, result: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    offset = 0
    for step in report.steps:
        if step.curve:
            ax.plot([offset + d for d, _ in step.curve], [loss for _, loss in step.curve], label=step.name[:30])
            offset += step.trained_images
    ax.set_xlabel("images trained (forward + backward)")
    ax.set_ylabel("loss")
    ax.set_title("retraining curves")
    if offset:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=100)
    plt.close(fig)
    names.append("curves.png")
    steps = [s for s in report.steps if s.top1 is not None]
    if steps:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(range(len(steps)), [s.top1 * 100 for s in steps], "o-", label="reborn")
        if report.teacher:
            ax.axhline(report.teacher["top1"] * 100, color="grey", ls="--", label="teacher (whole test set)")
        ax.set_xticks(range(len(steps)), [s.name[:24] for s in steps], rotation=15, fontsize=7)
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"accuracy after each step (first {report.config['eval_images']} held-out images)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "steps.png"), dpi=100)
        plt.close(fig)
        names.append("steps.png")
    return names


def _speed_figures(out: str, result: dict[str, Any]) -> list[str]:
    """``layers.png`` (eager time by layer kind, before/after) and ``tradeoff.png`` (accuracy against
    speed-up over the original in eager, one point per model variant and runtime)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    layers = result.get("layers_ms")
    if layers:
        before, after = layers["original"], layers["reborn"]
        kinds = list({**before, **after})[::-1]
        fig, ax = plt.subplots(figsize=(6, 0.3 * len(kinds) + 1.2))
        ys = range(len(kinds))
        ax.barh([y + 0.2 for y in ys], [before.get(k, 0.0) for k in kinds], 0.4, label="original")
        ax.barh([y - 0.2 for y in ys], [after.get(k, 0.0) for k in kinds], 0.4, label="reborn")
        ax.set_yticks(list(ys), kinds, fontsize=8)
        ax.set_xlabel("eager ms (batch 1, every node timed on its own)")
        ax.set_title("time by layer kind")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "layers.png"), dpi=100)
        plt.close(fig)
        names.append("layers.png")
    acc = result.get("accuracy", {})
    points = []  # (label, speed-up over original eager, top-1)
    speed = result.get("speed")
    if speed:
        base = next((r for r in speed["rows"] if r["variant"] == "original" and r["runtime"] == "eager"), None)
        batch = speed["batches"][0]
        for row in speed["rows"]:
            if base and batch in row["ms"] and acc.get(row["variant"]) is not None:
                points.append((f"{row['variant']}, {row['runtime']}", base["ms"][batch] / row["ms"][batch],
                               acc[row["variant"]]))
    elif acc.get("original") is not None and acc.get("reborn") is not None:
        points = [("original, eager", 1.0, acc["original"]), ("reborn, eager", result["latency"]["speedup"],
                                                                acc["reborn"])]
    if points:
        fig, ax = plt.subplots(figsize=(8, 4))
        markers = {"original": "o", "exact tier": "^", "reborn": "s"}
        for label, x, y in points:
            ax.scatter(x, y * 100, marker=markers.get(label.split(",")[0], "o"), s=40, label=label)
        ax.set_xlabel("speed-up over the original in eager (batch 1)")
        ax.set_ylabel("held-out top-1 (%)")
        ax.set_title("accuracy against speed-up (a runtime keeps its model's accuracy)", fontsize=10)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "tradeoff.png"), dpi=100)
        plt.close(fig)
        names.append("tradeoff.png")
    return names
