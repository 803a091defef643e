"""The main job for today's CNNs (``fxrebirth run mobilenet_v2``, ``fxrebirth run resnet18``): depth merges.

:func:`run_depth`:

1. **Teacher**: the torchvision architecture trained once on the embedded
   :class:`~fxrebirth.paper.data.Shapes` set at 64x64 (at 32x32 ResNet-18's last stage would see 1x1 maps, and
   every 3x3 convolution there would be a 1x1 one) and cached (:func:`fxrebirth.paper.teacher.default_teacher`).
2. **Plan** (:func:`fxrebirth.retraining.depthplan.plan_depth`): importance on calibration images at 64x64,
   latency on the plan runtime at 224x224, batch 1; the estimated front. Saved as ``plan.json`` (a resumed run
   reads it back).
3. **Points of the front**: per target speed-up (at most four are worth their cost), the plan's choice for it,
   retrained by :func:`fxrebirth.rebirth` (distillation, checkpoints, resume, the scratch control), merged
   exactly; then the exact tier on the original and on the reborn model (BatchNorms folded), and both timed
   side by side, eager and under the runtimes of ``bench``. Each point writes the paper runner's report in
   ``point-<target>/``.
4. ``report.md`` and ``report.json``: the front, measured, beside the estimate and the published points.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from fxrebirth.frontends.deploy import lower_for
from fxrebirth.frontends.library import optimize
from fxrebirth.measure.speed import RUNTIMES, benchmark, environment, eager_latency
from fxrebirth.paper.data import Shapes
from fxrebirth.paper.teacher import TeacherConfig, default_teacher
from fxrebirth.retraining.depthplan import DepthPlan, plan_depth
from fxrebirth.retraining.engine import RebirthConfig, rebirth
from fxrebirth.retraining.train import Arithmetic, ProgressFn, resolve_device

__all__ = ["DepthRunConfig", "run_depth", "PUBLISHED"]

log = logging.getLogger(__name__)

PUBLISHED = {
    "mobilenet_v2": [
        ("Kim et al. ICML 2023 (depth compression)", "72.89 -> 72.83 top-1 at 1.62x (PyTorch) / 1.41x (TensorRT)",
         "ImageNet, GPU, batch 128, 180 epochs of fine-tuning"),
        ("LayerMerge ICML 2024", "72.89 -> 72.99 top-1 at 1.63x", "ImageNet, GPU, batch 128, 180 epochs"),
    ],
    "resnet18": [
        ("LayerMerge ICML 2024 (ResNet-34)", "74.42 -> 74.26 top-1 at 1.36x", "ImageNet, GPU, batch 128, 90 epochs"),
    ],
}


@dataclass
class DepthRunConfig:
    """Settings of the depth job (``fxrebirth run <torchvision architecture>``)."""

    model_name: str = "mobilenet_v2"
    out: str = "fxrebirth-report"
    image_size: int = 64
    plan_size: int = 224
    train_images: int = 20000
    test_images: int = 10000
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(image_size=64, epochs=6))
    rebirth: RebirthConfig = field(default_factory=lambda: RebirthConfig(epochs=1.5))
    """1.5 epochs: 25% of the default teacher's 6 epochs."""
    targets: tuple[float, ...] = (1.5,)
    calibration_images: int = 256
    plan_runtime: str = "eager"
    plan_table: str | None = None  # a device table of `fxrebirth profile --depth` instead of timing on plan_runtime
    plan_rounds: int = 20
    prune: str = "grown"
    latency_rounds: int = 20
    bench: str = "fast"
    """Runtimes of each point's speed table: ``full`` (all), ``fast`` (eager and ONNX Runtime) or ``none``."""
    control: bool = True


def _plan(config: DepthRunConfig, model: nn.Module, train: Any) -> DepthPlan:
    path = os.path.join(config.out, "plan.json")
    if os.path.exists(path):
        with open(path) as f:
            plan = DepthPlan.from_json(f.read())
        if plan.model == type(model).__name__ and plan.input_shape == [1, 3, config.plan_size, config.plan_size]:
            log.info("depth run: the plan of %s", path)
            return plan
    calibration = torch.stack([train[i][0] for i in range(min(config.calibration_images, len(train)))])
    example = torch.randn(1, 3, config.plan_size, config.plan_size)
    plan = plan_depth(model, (example,), calibration, runtime=config.plan_runtime, rounds=config.plan_rounds,
                      prune=config.prune, lowering=lower_for, device_table=config.plan_table)
    with open(path, "w") as f:
        f.write(plan.to_json(indent=1))
    return plan


def _point(config: DepthRunConfig, model: nn.Module, plan: DepthPlan, target: float, train: Any, test: Any,
           teacher_cost: dict[str, Any], progress: ProgressFn | None) -> dict[str, Any]:
    from fxrebirth.paper.runner import write_report

    chosen = DepthPlan.from_json(plan.to_json())
    chosen.select(target_speedup=target)
    folder = os.path.join(config.out, f"point-{target:g}")
    os.makedirs(folder, exist_ok=True)
    example = torch.randn(1, 3, config.plan_size, config.plan_size)
    reborn, report = rebirth(model, chosen, train, test_data=test, config=config.rebirth,
                             checkpoint_dir=os.path.join(folder, "checkpoints"), progress=progress,
                             control=config.control, teacher_cost=teacher_cost)
    exact, _ = optimize(model, example)
    reborn_exact, _ = optimize(reborn, example)
    latency = eager_latency(model, reborn_exact, example, config.latency_rounds)
    table = None
    if config.bench != "none":
        runtimes = RUNTIMES if config.bench == "full" else ("eager", "onnxruntime")
        table = benchmark(model, exact=exact, reborn=reborn_exact, image_size=config.plan_size, batches=(1,),
                          rounds=config.latency_rounds, runtimes=runtimes, memory=False,
                          name=config.model_name, lowering=lower_for)
    top1 = {"original": report.teacher["top1"], "exact tier": report.teacher["top1"], "reborn": report.student["top1"]}
    result = {"environment": environment(), "target": target, "planned_speedup": chosen.estimated_speedup,
              "plan": json.loads(chosen.to_json()), "rebirth": report.to_dict(), "latency": latency,
              "accuracy": top1}
    if table is not None:
        result["speed"] = table.to_dict()
    write_report(folder, result, chosen, report, table)
    return {"target": target, "estimated_speedup": chosen.estimated_speedup, "segments": len(chosen.selected),
            "eager": latency, "speed": result.get("speed"), "teacher_top1": report.teacher["top1"],
            "top1": report.student["top1"], "difference_interval": report.difference_interval,
            "control_top1": (report.control or {}).get("top1"),
            "reborn_minus_control": (report.control or {}).get("reborn_minus_control"),
            "trained_images": report.trained_images, "teacher_share": report.teacher_share,
            "calibration_images": report.calibration_images, "wall_s": report.wall_s,
            "control_wall_s": (report.control or {}).get("wall_s"), "folder": folder}


def run_depth(config: DepthRunConfig, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run the depth job and write its report folder; return the report as a dict."""
    # a device or precision this machine lacks is refused before the teacher trains
    Arithmetic.check(config.rebirth.precision, resolve_device(config.rebirth.device))
    os.makedirs(config.out, exist_ok=True)
    teacher_config = replace(config.teacher, arch=config.model_name, image_size=config.image_size,
                             train_images=config.train_images, test_images=config.test_images)
    model, meta = default_teacher(teacher_config, progress=progress, device=config.rebirth.device)
    train = Shapes("train", config.train_images, config.image_size, seed=teacher_config.seed)
    test = Shapes("test", config.test_images, config.image_size, seed=teacher_config.seed)
    teacher_cost = {"images": meta["epochs"] * meta["train_images"], "wall_s": meta.get("wall_s")}
    plan = _plan(config, model, train)
    points = [_point(config, model, plan, t, train, test, teacher_cost, progress) for t in config.targets]
    result = {"environment": environment(), "model": config.model_name, "teacher": meta,
              "plan": {"latency_s": plan.latency_s, "source": plan.source, "candidates": len(plan.candidates),
                       "front": [vars(p) for p in plan.front]},
              "points": points, "published": PUBLISHED.get(config.model_name, [])}
    with open(os.path.join(config.out, "report.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(os.path.join(config.out, "report.md"), "w") as f:
        f.write(_markdown(config, result, plan))
    return result


def _best_compiled(speed: dict[str, Any] | None) -> str:
    """The fastest f32 reborn row against the fastest f32 original row, eager left out (the runtime a user
    would pick for each), with both runtimes named."""
    if not speed:
        return "not measured"

    def fastest(variant: str) -> tuple[float, str] | None:
        rows = [(r["ms"].get(1) or r["ms"].get("1"), r["runtime"]) for r in speed["rows"]
                if r["variant"] == variant and r["runtime"] != "eager" and r.get("precision", "fp32") == "fp32"]
        return min((ms, rt) for ms, rt in rows if ms) if any(ms for ms, _ in rows) else None

    original, reborn = fastest("original"), fastest("reborn")
    if original is None or reborn is None:
        return "not measured"
    return f"{original[0] / reborn[0]:.2f}x ({reborn[1]} {reborn[0]:.2f} ms vs {original[1]} {original[0]:.2f} ms)"


def _markdown(config: DepthRunConfig, result: dict[str, Any], plan: DepthPlan) -> str:
    env, teacher = result["environment"], result["teacher"]
    lines = [f"# fxrebirth depth report: {config.model_name}", "",
             f"Environment: {env['cpu']}, {env['cpu_count']} CPUs, torch {env['torch']} with {env['torch_threads']} "
             f"threads.", "",
             f"Teacher: torchvision {config.model_name}, trained on the embedded Shapes set at "
             f"{config.image_size}x{config.image_size}, {teacher['epochs']} epochs of {teacher['train_images']} "
             f"images ({teacher.get('wall_s') or 0:.0f} s); held-out top-1 {teacher.get('top1', float('nan')):.2%}.",
             "", "## Measured front (each point retrained, merged exactly, then timed at batch 1, "
             f"{config.plan_size}x{config.plan_size})", "",
             "| target | estimated | eager vs original | eager vs exact tier | best f32 runtime, each side's own | top-1 | "
             "vs teacher (95% CI) | scratch control | retrained images (share of teacher's) | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        eager = p["eager"]
        lo, hi = p["difference_interval"] or (float("nan"), float("nan"))
        control = f"{p['control_top1']:.2%}" if p["control_top1"] is not None else "not trained"
        vs_exact = _vs_exact(p["speed"])
        lines.append(f"| {p['target']:.2f}x | {p['estimated_speedup']:.2f}x | {eager['speedup']:.2f}x | {vs_exact} | "
                     f"{_best_compiled(p['speed'])} | {p['top1']:.2%} | {p['top1'] - p['teacher_top1']:+.2%} "
                     f"[{lo:+.2%}, {hi:+.2%}] | {control} | {p['trained_images']} ({p['teacher_share'] or 0:.1%}) | "
                     f"{p['wall_s']:.0f} |")
    lines += ["", "Published points (their hardware, batch and fine-tuning):", ""]
    lines += [f"- {who}: {what} ({how})" for who, what, how in result["published"]]
    lines += ["", "## Plan", "", "```", plan.table(), "```", ""]
    return "\n".join(lines) + "\n"


def _vs_exact(speed: dict[str, Any] | None) -> str:
    if not speed:
        return "not measured"
    rows = {(r["variant"], r["runtime"]): r["ms"].get(1) or r["ms"].get("1") for r in speed["rows"]}
    exact, reborn = rows.get(("exact tier", "eager")), rows.get(("reborn", "eager"))
    return f"{exact / reborn:.2f}x" if exact and reborn else "not measured"
