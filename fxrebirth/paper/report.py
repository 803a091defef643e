"""The report folder of ``fxrebirth run``: ``report.md``, ``report.json`` and PNG figures of one retrained
point (:func:`write_report`), and the summary of a run with several targets (:func:`summary_markdown`).
"""

from __future__ import annotations

import json
import os
from typing import Any

from fxrebirth.measure.runtimes import DEFAULT_RUNTIME
from fxrebirth.measure.speed import SpeedTable
from fxrebirth.measure.table import layers_markdown
from fxrebirth.retraining.plandata import Plan
from fxrebirth.retraining.report import RebirthReport

__all__ = ["write_report", "summary_markdown", "PUBLISHED"]

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


def write_report(out: str, result: dict[str, Any], plan: Plan, report: RebirthReport,
                 table: SpeedTable | None = None) -> None:
    """``report.md``, ``report.json`` and the figures."""
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    figures = _figures(out, report, result) + _speed_figures(out, result) + _front_figure(out, result)
    lat = result["latency"]
    env = result["environment"]
    lines = [
        "# fxrebirth report", "",
        f"Environment: {env['cpu']}, {env['cpu_count']} CPUs, torch {env['torch']} with {env['torch_threads']} "
        f"threads, Python {env['python']}.", "",
        *_data_lines(result.get("data")), *_search_lines(result.get("search"), result),
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


def _data_lines(data: dict[str, Any] | None) -> list[str]:
    """What the run did to the images: the splits and the preprocessing."""
    if not data:
        return []
    return ["## Data", "", *[f"- {key}: {value}" for key, value in data.items()], ""]


def _search_lines(search: dict[str, Any] | None, result: dict[str, Any]) -> list[str]:
    """The accuracy-budgeted search: every point tried, on the validation split, and what it cost."""
    if not search:
        return []
    teacher = result.get("teacher", {}).get("val_top1")
    share = search.get("teacher_share")
    lines = ["## Accuracy budget (the search, on the validation split)", "",
             f"The fastest point within {search['max_drop']:g} pt of the teacher's validation top-1"
             + (f" ({teacher:.2%})" if teacher is not None else "") + f": {len(search['trials'])} of "
             f"{len(search['points'])} points of the front retrained, {search['per_point_images']} images each.", "",
             "| point | merges | estimated speed-up | validation top-1 | vs teacher (pt) | images trained | "
             "forward only | wall s | |", "|---|---|---|---|---|---|---|---|---|"]
    for t in sorted(search["trials"], key=lambda t: t["index"]):
        mark = "**chosen**" if t["index"] == search["chosen"] else ("within" if t["drop"] <= search["max_drop"]
                                                                     else "over")
        lines.append(f"| {t['index']} | {len(t['chosen'])} | {t['estimated_speedup']:.2f}x | {t['val_top1']:.2%} | "
                     f"{-t['drop']:+.2f} | {t['trained_images']} | {t['forward_images']} | {t['wall_s']:.0f} | {mark} |")
    lines += ["", f"Retraining in all points tried: {search['trained_images']} images forward and backward"
              + (f", {share:.1%} of the teacher's {search['teacher_images']}" if share is not None else
                 " (the teacher's training cost was not given)")
              + (f"; the budget was {search['budget_images']}" if search.get("budget_images") else "")
              + f"; {search['forward_images']} images forward only. The chosen point alone trained "
              f"{search['per_point_images']}.", ""]
    return lines


def _front_figure(out: str, result: dict[str, Any]) -> list[str]:
    """``front.png``: validation top-1 against estimated speed-up of every point tried, the teacher's line, the
    drop allowed and the chosen point (with its measured speed-up on the plan's runtime when timed)."""
    search = result.get("search")
    teacher = result.get("teacher", {}).get("val_top1")
    if not search or not search["trials"] or teacher is None:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    trials = search["trials"]
    ax.plot([t["estimated_speedup"] for t in trials], [100 * t["val_top1"] for t in trials], "o", label="points tried")
    for t in trials:
        ax.annotate(str(t["index"]), (t["estimated_speedup"], 100 * t["val_top1"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.axhline(100 * teacher, color="grey", ls="--", label="teacher")
    ax.axhline(100 * teacher - search["max_drop"], color="grey", ls=":", label=f"-{search['max_drop']:g} pt")
    if search["chosen"] is not None:
        chosen = next(t for t in trials if t["index"] == search["chosen"])
        ax.plot([chosen["estimated_speedup"]], [100 * chosen["val_top1"]], "*", ms=14, label="chosen")
    ax.set_xlabel("estimated speed-up on the plan's runtime (batch 1)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("the accuracy budget's search", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "front.png"), dpi=100)
    plt.close(fig)
    return ["front.png"]


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
        base = next((r for r in speed["rows"] if r["variant"] == "original" and r["runtime"] == DEFAULT_RUNTIME), None)
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


def _best_compiled(speed: dict[str, Any] | None) -> str:
    """The fastest f32 reborn row against the fastest f32 original row, eager left out (the runtime a user
    would pick for each), with both runtimes named."""
    if not speed:
        return "not measured"

    def fastest(variant: str) -> tuple[float, str] | None:
        rows = [(r["ms"].get(1) or r["ms"].get("1"), r["runtime"]) for r in speed["rows"]
                if r["variant"] == variant and r["runtime"] != DEFAULT_RUNTIME and r.get("precision", "fp32") == "fp32"]
        return min((ms, rt) for ms, rt in rows if ms) if any(ms for ms, _ in rows) else None

    original, reborn = fastest("original"), fastest("reborn")
    if original is None or reborn is None:
        return "not measured"
    return f"{original[0] / reborn[0]:.2f}x ({reborn[1]} {reborn[0]:.2f} ms vs {original[1]} {original[0]:.2f} ms)"


def summary_markdown(config: Any, result: dict[str, Any], plan: Plan) -> str:
    """The report of a run with several targets: the measured front, one retrained point per target."""
    env, teacher = result["environment"], result["teacher"]
    lines = [f"# fxrebirth report: {config.model_name}, one point per target", "",
             f"Environment: {env['cpu']}, {env['cpu_count']} CPUs, torch {env['torch']} with {env['torch_threads']} "
             f"threads.", "",
             f"Teacher: {config.model_name} ({teacher.get('source', 'trained here')}); "
             f"held-out top-1 {result['points'][0]['teacher_top1']:.2%}.",
             "", "## Measured front (each point retrained, merged exactly, then timed at batch 1, "
             f"{config.plan_size}x{config.plan_size})", "",
             "| target | estimated | eager vs original | eager vs exact tier | best f32 runtime, each side's own | top-1 | "
             "vs teacher (95% CI) | scratch control | retrained images (share of teacher's) | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        eager = p["eager_latency"]
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
    exact, reborn = rows.get(("exact tier", DEFAULT_RUNTIME)), rows.get(("reborn", DEFAULT_RUNTIME))
    return f"{exact / reborn:.2f}x" if exact and reborn else "not measured"
