"""The main job, end to end: teacher -> plan -> rebirth and retraining -> evaluation -> latency -> report.

:func:`run` is what ``fxrebirth run`` calls. Defaults reproduce DeepRebirth's experiment on this machine:
the Caffe-style GoogLeNet, trained once on the embedded :class:`~fxrebirth.data.Shapes` set at 32x32 and
cached, planned at 224x224 (the resolution whose latency matters), retrained at 32x32, and timed at
224x224. Every stage reports progress through ``progress``; the retraining checkpoints after each step
under ``out/checkpoints`` so an interrupted run resumes.

The report folder holds ``report.md`` (tables), ``report.json`` (every number), ``plan.json``, PNG figures
(matplotlib), and the reborn model as a torch.export program (``reborn.pt2``, loads without unpickling).
"""

from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .data import Shapes, image_folder
from .plan import Plan, plan as make_plan
from .retrain import RebirthConfig, RebirthReport, rebirth
from .teacher import TeacherConfig, default_teacher
from .train import ProgressFn

__all__ = ["RunConfig", "run", "write_report"]

log = logging.getLogger(__name__)


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


def _environment() -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}


def run(config: RunConfig, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run the main job and write its report folder; return the report as a dict."""
    os.makedirs(config.out, exist_ok=True)
    if config.data is None:
        teacher_config = TeacherConfig(**{**config.teacher.__dict__, "image_size": config.image_size,
                                          "train_images": config.train_images, "test_images": config.test_images})
        model, teacher_meta = (config.model, {"source": "given"}) if config.model is not None else \
            default_teacher(teacher_config, progress=progress)
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
    plan_path = os.path.join(config.out, "plan.json")
    checkpoint_dir = os.path.join(config.out, "checkpoints")
    if os.path.exists(plan_path) and os.path.exists(os.path.join(checkpoint_dir, "rebirth.ckpt")):
        # resuming: the plan the checkpoint was trained for (planning again could select other regions
        # where timings are close)
        with open(plan_path) as f:
            plan = Plan.from_json(f.read())
        log.info("run: resuming with %s", plan_path)
    else:
        plan = make_plan(model, example, repeats=config.plan_repeats)
        with open(plan_path, "w") as f:
            f.write(plan.to_json(indent=1))
    reborn, report = rebirth(model, plan, train, test_data=test, config=config.rebirth,
                             checkpoint_dir=checkpoint_dir, progress=progress,
                             latency_input=example, latency_rounds=config.latency_rounds)
    latency = report.latency
    batch = torch.export.Dim("batch", max=4096)  # exported with a batch of 2: a size-1 example would specialise
    program = torch.export.export(reborn, (torch.randn(2, 3, config.image_size, config.image_size),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, os.path.join(config.out, "reborn.pt2"))
    result = {"environment": _environment(), "teacher": teacher_meta, "plan": json.loads(plan.to_json()),
              "planned_speedup": plan.estimated_speedup, "rebirth": report.to_dict(), "latency": latency}
    write_report(config.out, result, plan, report)
    return result


def write_report(out: str, result: dict[str, Any], plan: Plan, report: RebirthReport) -> None:
    """``report.md``, ``report.json`` and the figures."""
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    figures = _figures(out, report, result)
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
