"""Rebirth variants on the default teacher: one retraining per named set of options, results appended
to a JSON-lines file, resumable.

Not collected by the plain test command. Run::

    python -m benchmarks.rebirth_variants '{"defaults": {}, "flip+shift": {"augment": "flip+shift"}}' \\
        [--teacher-epochs 4] [--images 20000] [--eval validation|test] [--cache .budget-cache]

Each variant is a name and options of :class:`~fxrebirth.retraining.config.RebirthConfig`, plus
``"images"`` (its retraining budget, images forward and backward; default ``--images``) and ``"control"``
(also train the scratch control). Every variant merges the regions of the plan that
``benchmarks.budget_curve`` saved in ``--cache`` (made on first use), checkpoints under
``--cache/variants/``, and appends one line to ``--cache/variants-t<epochs>-<eval>.jsonl``; a variant
already there is skipped, so an interrupted sweep resumes. ``--eval validation`` scores on 5,000 images
drawn apart from the test set (``Shapes("test", 5000, seed=1)``), for screening without touching the test
set; ``test`` on the test set of the docs tables.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from benchmarks.budget_curve import cached_plan
from fxrebirth.paper.data import Shapes
from fxrebirth.paper.teacher import TeacherConfig, default_teacher
from fxrebirth.retraining.engine import rebirth


def main(variants: dict, teacher_epochs: int, images: int, evaluate_on: str, cache: str) -> list[dict]:
    config = TeacherConfig(epochs=teacher_epochs)
    teacher, _ = default_teacher(config)
    plan = cached_plan(teacher, cache)
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
        options.setdefault("epochs", budget / len(train))
        start = time.perf_counter()
        _, report = rebirth(teacher, plan, train, test_data=scored, control=control, **options,
                            checkpoint_dir=os.path.join(cache, "variants", f"t{teacher_epochs}-{name}"))
        record = {"name": name, "options": options, "images": report.trained_images,
                  "teacher": report.teacher["top1"], "reborn": report.student["top1"],
                  "reborn_minus_teacher": list(report.difference_interval),
                  "wall_s": round(time.perf_counter() - start, 1)}
        if control:
            record["control"] = report.control["top1"]
        done[name] = record
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")
    return [done[name] for name in variants]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", help="JSON object: name -> rebirth options")
    parser.add_argument("--teacher-epochs", type=int, default=4)
    parser.add_argument("--images", type=int, default=20000, help="default budget of a variant (images)")
    parser.add_argument("--eval", dest="evaluate_on", choices=("validation", "test"), default="validation")
    parser.add_argument("--cache", default=".budget-cache")
    args = parser.parse_args()
    print("| variant | retraining images | top-1 | reborn - teacher (paired 95%) | wall s |")
    print("|---|---|---|---|---|")
    for r in main(json.loads(args.variants), args.teacher_epochs, args.images, args.evaluate_on, args.cache):
        lo, hi = r["reborn_minus_teacher"]
        print(f"| {r['name']} | {r['images']:,} | {r['reborn']:.2%} | {r['reborn'] - r['teacher']:+.2%} "
              f"[{lo:+.2%}, {hi:+.2%}] | {r['wall_s']:.0f} |")
