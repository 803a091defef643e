"""The accuracy-budgeted search (fxrebirth.paper.search): the points it takes from a plan's front, the order it
tries them in, what it chooses and what it records, with the retraining of each point replaced by a table of
validation accuracies (the real retraining is exercised end to end by tests/test_cli.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxrebirth.paper.search as search_module
from fxrebirth.graph.regions import Region
from fxrebirth.paper.search import NothingWithinDrop, bisection_order, front_points, most_tries, search
from fxrebirth.retraining.engine import RebirthConfig
from fxrebirth.retraining.plandata import Candidate, Plan
from fxrebirth.retraining.report import RebirthReport, StepRecord


def _plan(gains, importances) -> Plan:
    """A plan of disjoint candidates c0, c1, ... with these gains (of a 100 ms model) and importances."""
    candidates = []
    for i, (gain, imp) in enumerate(zip(gains, importances)):
        region = Region(id=f"depth:c{i}", kind="depth", nodes=(f"n{i}",), input=f"n{i}", output=f"n{i}",
                        replaces=(f"conv{i}",))
        candidates.append(Candidate(region, 0.01, 0.01 - gain, imp, (2 * i, 2 * i + 1)))
    return Plan(model="Toy", input_shape=[1, 3, 8, 8], latency_s=0.1, source="test", candidates=candidates)


def test_bisection_finds_the_fastest_point_within_for_every_boundary():
    for n in range(1, 24):
        for boundary in range(-1, n):  # points 0..boundary are within the drop
            order, tried = bisection_order(n), []
            index = next(order)
            while True:
                tried.append(index)
                try:
                    index = order.send(index <= boundary)
                except StopIteration:
                    break
            assert max([t for t in tried if t <= boundary], default=-1) == boundary, (n, boundary, tried)
            assert len(tried) <= most_tries(n) and len(set(tried)) == len(tried)


def test_front_points_are_distinct_sets_by_speedup_ending_with_every_candidate():
    plan = _plan([0.004, 0.002, 0.001], [3.0, 1.0, 0.5])
    points = front_points(plan)
    assert [p.speedup for p in points] == sorted(p.speedup for p in points)
    assert len({tuple(p.chosen) for p in points}) == len(points)
    assert points[-1].chosen == ["depth:c0", "depth:c1", "depth:c2"]
    assert points[0].chosen == ["depth:c2"]  # the least important merge first
    # a kept candidate is in no point
    assert all("depth:c0" not in p.chosen for p in front_points(plan, keep=["depth:c0"]))


class _Fake:
    """Stands in for one point's retraining: a validation top-1 per number of merges, images per point."""

    def __init__(self, accuracy_by_merges, teacher=0.90):
        self.accuracy, self.teacher, self.calls = accuracy_by_merges, teacher, []

    def __call__(self, model, plan, point, train, val, config, folder, progress):
        self.calls.append(list(point.chosen))
        chosen = Plan.from_json(plan.to_json())
        for c in chosen.candidates:
            c.selected = c.region.id in point.chosen
        report = RebirthReport({}, len(train))
        images = int(round(config.epochs * len(train)))
        report.steps.append(StepRecord(name="end-to-end distillation", regions=[], trained_images=images, calibration_images=8,
                                       wall_s=1.0))
        report.teacher = {"top1": self.teacher}
        report.student = {"top1": self.accuracy[len(point.chosen)]}
        return chosen, nn.Identity(), report


def _search(monkeypatch, fake, plan, max_drop, tmp_path, **kwargs):
    monkeypatch.setattr(search_module, "_retrain", fake)
    train = [(torch.zeros(3, 8, 8), 0)] * 100
    return search(nn.Identity(), plan, train, train, max_drop=max_drop, config=RebirthConfig(epochs=0.5),
                  folder=str(tmp_path), **kwargs)


def test_the_search_returns_the_fastest_point_within_the_drop_and_records_every_point(monkeypatch, tmp_path):
    plan = _plan([0.004, 0.003, 0.002, 0.001], [4.0, 3.0, 2.0, 1.0])
    n = len(front_points(plan))
    fake = _Fake({1: 0.899, 2: 0.897, 3: 0.893, 4: 0.880})  # drops 0.1, 0.3, 0.7, 2.0 pt
    seen = []
    result, chosen, reborn, report = _search(monkeypatch, fake, plan, 0.5, tmp_path, teacher_images=1000,
                                             on_trial=lambda r: seen.append(len(r.trials)))
    assert fake.calls[0] == front_points(plan)[-1].chosen  # the fastest point first
    assert len(result.trials) == len(fake.calls) <= most_tries(n) and seen == list(range(1, len(fake.calls) + 1))
    best = max((t for t in result.trials if t.drop <= 0.5), key=lambda t: t.index)
    assert result.chosen == best.index and len(best.chosen) == 2
    assert sorted(c.region.id for c in chosen.selected) == best.chosen and report.student["top1"] == 0.897
    # every point is recorded with its accuracy, speed and images; the cost is the sum
    record = result.to_dict()
    assert record["trained_images"] == 50 * len(fake.calls) and record["teacher_share"] == record["trained_images"] / 1000
    assert record["forward_images"] == 8 * len(fake.calls)
    assert all(t["drop"] == pytest.approx(100 * (0.9 - t["val_top1"])) for t in record["trials"])
    # a generous drop is met by the fastest point at once
    fake = _Fake({1: 0.899, 2: 0.897, 3: 0.893, 4: 0.880})
    result, _, _, _ = _search(monkeypatch, fake, plan, 2.5, tmp_path)
    assert len(fake.calls) == 1 and result.chosen == n - 1


def test_nothing_within_the_drop_returns_no_model(monkeypatch, tmp_path):
    plan = _plan([0.004, 0.003], [4.0, 3.0])
    fake = _Fake({1: 0.80, 2: 0.70})
    result, chosen, reborn, report = _search(monkeypatch, fake, plan, 0.5, tmp_path)
    assert result.chosen is None and chosen is None and reborn is None and len(result.trials) == 2
    with pytest.raises(Exception, match="positive number of points"):
        _search(monkeypatch, fake, plan, 0.0, tmp_path)
    assert issubclass(NothingWithinDrop, Exception)
