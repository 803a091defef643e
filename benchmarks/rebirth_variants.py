"""Rebirth variants on the default teacher: one retraining per named set of options, results appended
to a JSON-lines file, resumable.

Not collected by the plain test command. Run::

    python -m benchmarks.rebirth_variants '{"defaults": {}, "flip+shift": {"augment": "flip+shift"}}' \\
        [--teacher-epochs 4] [--images 20000] [--eval validation|test] [--cache .budget-cache]

Each variant is a name and options of :class:`~fxrebirth.retraining.config.RebirthConfig`, plus
``"images"`` (its retraining budget, images forward and backward; default ``--images``), ``"control"``
(also train the scratch control) and ``"plan"`` (the geometry: ``{"keep": [region ids or prefixes left unmerged],
"reduce_ratio": 1.0, "streamline_kernel": "conv", "swap": {region id: {"streamline_kernel": "pool"}}}``, any of
them; default every region of the default plan). Every variant merges the regions of the plan that
``benchmarks.budget_curve`` saved in ``--cache`` (made on first use), checkpoints under ``--cache/variants/``,
and appends one line to ``--cache/variants-t<epochs>-<eval>.jsonl``; a variant
already there is skipped, so an interrupted sweep resumes. ``--eval validation`` scores on 5,000 images
drawn apart from the test set (``Shapes("test", 5000, seed=1)``), for screening without touching the test
set; ``test`` on the test set of the docs tables.

``--speed ROUNDS`` times the variants' geometries instead (no training: rebirth layers freshly initialised, which
does not change their cost): the original and every distinct geometry at 224x224, batch 1, eager fp32, in
shuffled interleaved rounds in one process; per-round speed-up against the original, median and interquartile
range.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import fxrebirth
from benchmarks.budget_curve import cached_plan
from fxrebirth.measure.timing import interleaved_times, ratio_spread
from fxrebirth.paper.data import Shapes
from fxrebirth.paper.models import googlenet_lrn
from fxrebirth.paper.teacher import TeacherConfig, default_teacher
from fxrebirth.retraining.engine import rebirth
from fxrebirth.retraining.planning import rebuild


def geometry_plan(model: torch.nn.Module, cache: str, geometry: dict) -> fxrebirth.Plan:
    """The cached plan of a variant's ``"plan"`` spec: ``keep`` and the planning options of
    :func:`~benchmarks.budget_curve.cached_plan`, and ``swap`` (region id -> planning options): that region's
    proposal taken from the plan those options give (one region under another policy)."""
    planning = {k: v for k, v in geometry.items() if k not in ("keep", "swap")}
    plan = cached_plan(model, cache, **planning)
    for region_id, other in geometry.get("swap", {}).items():
        donor = next((r for r in cached_plan(model, cache, **other).candidates if r.region.id == region_id), None)
        if donor is None:
            raise SystemExit(f"swap {region_id!r}: no such region; regions: {[r.region.id for r in plan.candidates]}")
        plan.candidates = [donor if r.region.id == region_id else r for r in plan.candidates]
    plan.keep(tuple(geometry.get("keep", ())))
    return plan


def main(variants: dict, teacher_epochs: int, images: int, evaluate_on: str, cache: str) -> list[dict]:
    config = TeacherConfig(epochs=teacher_epochs)
    teacher, _ = default_teacher(config)
    train = Shapes("train", config.train_images, config.image_size, seed=config.seed)
    scored = Shapes("test", config.test_images, config.image_size, seed=config.seed) if evaluate_on == "test" \
        else Shapes("test", 5000, config.image_size, seed=1)
    out = os.path.join(cache, f"variants-t{teacher_epochs}-{evaluate_on}.jsonl")
    done = {}
    if os.path.exists(out):
        with open(out) as f:
            done = {r["name"]: r for r in map(json.loads, f)}
    for name, spec in variants.items():
        if name in done:
            continue
        options = dict(spec)
        budget, control = options.pop("images", images), options.pop("control", False)
        geometry = options.pop("plan", {})
        plan = geometry_plan(teacher, cache, geometry)
        options.setdefault("epochs", budget / len(train))
        start = time.perf_counter()
        _, report = rebirth(teacher, plan, train, test_data=scored, control=control, **options,
                            checkpoint_dir=os.path.join(cache, "variants", f"t{teacher_epochs}-{name}"))
        record = {"name": name, "options": options, "plan": geometry, "regions": len(plan.selected),
                  "images": report.trained_images,
                  "teacher": report.teacher["top1"], "reborn": report.student["top1"],
                  "reborn_minus_teacher": list(report.difference_interval),
                  "wall_s": round(time.perf_counter() - start, 1)}
        if control:
            record["control"] = report.control["top1"]
            record["reborn_minus_control"] = list(report.control["reborn_minus_control"])
        done[name] = record
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")
    return [done[name] for name in variants]


def speed(variants: dict, rounds: int, cache: str) -> list[dict]:
    """Eager latency of each variant's geometry against the original, side by side (see the module docstring).
    Variants with the same geometry are timed once."""
    torch.manual_seed(0)
    teacher = googlenet_lrn(len(Shapes.classes)).eval()  # any weights do: only the architecture is timed
    x = torch.randn(1, 3, 224, 224)
    gm = fxrebirth.capture(teacher, x)
    runs, names = {"original": teacher}, {}
    for name, spec in variants.items():
        geometry = spec.get("plan", {})
        key = json.dumps(geometry, sort_keys=True)
        if key not in names:
            plan = geometry_plan(teacher, cache, geometry)
            names[key] = name
            runs[name] = rebuild(gm, plan).eval()
    with torch.inference_mode():
        times = interleaved_times({k: (lambda f=f: f(x)) for k, f in runs.items()}, rounds)
    rows = []
    for name, spec in variants.items():
        timed = names[json.dumps(spec.get("plan", {}), sort_keys=True)]
        median, q1, q3 = ratio_spread(times["original"], times[timed])
        rows.append({"name": name, "ms": sorted(times[timed])[len(times[timed]) // 2], "speedup": median,
                     "iqr": (q1, q3)})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", help="JSON object: name -> rebirth options")
    parser.add_argument("--teacher-epochs", type=int, default=4)
    parser.add_argument("--images", type=int, default=20000, help="default budget of a variant (images)")
    parser.add_argument("--eval", dest="evaluate_on", choices=("validation", "test"), default="validation")
    parser.add_argument("--cache", default=".budget-cache")
    parser.add_argument("--speed", type=int, metavar="ROUNDS", help="time the geometries instead of training")
    args = parser.parse_args()
    if args.speed:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, eager fp32, batch 1, 224x224, "
              f"{args.speed} shuffled interleaved rounds")
        print("| variant | reborn ms | speed-up against the original (median [IQR] of per-round ratios) |")
        print("|---|---|---|")
        for r in speed(json.loads(args.variants), args.speed, args.cache):
            print(f"| {r['name']} | {r['ms']:.2f} | {r['speedup']:.2f}x [{r['iqr'][0]:.2f}, {r['iqr'][1]:.2f}] |")
        raise SystemExit(0)
    print("| variant | retraining images | top-1 | reborn - teacher (paired 95%) | wall s |")
    print("|---|---|---|---|---|")
    for r in main(json.loads(args.variants), args.teacher_epochs, args.images, args.evaluate_on, args.cache):
        lo, hi = r["reborn_minus_teacher"]
        print(f"| {r['name']} | {r['images']:,} | {r['reborn']:.2%} | {r['reborn'] - r['teacher']:+.2%} "
              f"[{lo:+.2%}, {hi:+.2%}] | {r['wall_s']:.0f} |")
