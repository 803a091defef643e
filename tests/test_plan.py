"""Planning: costs, selection, JSON round trip, edits, and rejection of bad plans."""

from __future__ import annotations

import pytest
import torch

import fxrebirth
from fxrebirth.paper.models import googlenet_lrn
from fxrebirth.graph.regions import RegionError


@pytest.fixture(scope="module")
def small_plan():
    model = googlenet_lrn(width=0.25).eval()
    x = torch.randn(1, 3, 64, 64)
    return model, x, fxrebirth.plan(model, x, repeats=2)


def test_plan_measures_every_region_and_selects_only_gains(small_plan):
    _, _, plan = small_plan
    assert len(plan.regions) == 11
    assert all(r.cost_now_s > 0 and r.cost_rebirth_s > 0 for r in plan.regions)
    assert all(r.gain_s > 0 for r in plan.selected)
    assert all(not r.selected for r in plan.regions if r.gain_s <= 0)
    assert plan.estimated_latency_s <= plan.latency_s
    table = plan.table()
    assert "conv1.conv, conv1.relu, pool1, norm1" in table and "estimated latency" in table


def test_json_round_trip_and_validation(small_plan):
    model, x, plan = small_plan
    again = fxrebirth.Plan.from_json(plan.to_json())
    assert again.to_json() == plan.to_json()
    again.validate(fxrebirth.capture(model, x))


def test_edits_that_break_shapes_are_rejected(small_plan):
    model, x, plan = small_plan
    gm = fxrebirth.capture(model, x)
    edited = fxrebirth.Plan.from_json(plan.to_json())
    for r in edited.regions:
        r.selected = True
    edited.regions[0].region.proposal["out_channels"] += 1
    with pytest.raises(RegionError, match="streamline:conv1.conv.*produces"):
        edited.validate(gm)
    edited = fxrebirth.Plan.from_json(plan.to_json())
    branch = next(r for r in edited.regions if r.region.kind == "branch")
    branch.selected = True
    branch.region.proposal["branches"][1]["layers"][0]["out_channels"] = 3  # a thinner reduce layer fits
    edited.validate(gm)
    branch.region.proposal["branches"][1]["layers"][-1]["out_channels"] += 2  # a wider output does not
    with pytest.raises(RegionError, match="produces"):
        edited.validate(gm)


def test_overlapping_plan_is_rejected(small_plan):
    model, x, plan = small_plan
    edited = fxrebirth.Plan.from_json(plan.to_json())
    a, b = edited.regions[2], edited.regions[3]
    a.selected = b.selected = True
    b.region.nodes = b.region.nodes + (a.region.nodes[0],)
    with pytest.raises(RegionError):
        edited.validate(fxrebirth.capture(model, x))


def test_drop_and_targets(small_plan):
    model, x, plan = small_plan
    edited = fxrebirth.Plan.from_json(plan.to_json())
    if edited.selected:
        edited.drop(edited.selected[0].region.id)
        assert len(edited.selected) == len(plan.selected) - 1
    with pytest.raises(KeyError, match="no region 'nope'"):
        edited.drop("nope")
    from fxrebirth.rewrite.cost import measure_latency

    table = measure_latency(fxrebirth.capture(model, x), (x,), repeats=1)  # fixed costs: no timing noise
    roomy = fxrebirth.plan(model, x, latency_table=table, budget_s=1e9)
    assert roomy.selected == []  # already within budget
    tight = fxrebirth.plan(model, x, latency_table=table, budget_s=0.0)
    assert tight.selected == [r for r in tight.regions if r.gain_s > 0]
    half = fxrebirth.plan(model, x, latency_table=table, target_speedup=1.0 + 1e-9)
    assert len(half.selected) == 1 and half.selected[0].gain_s == max(r.gain_s for r in half.regions)
    with pytest.raises(ValueError, match="select='some'"):
        fxrebirth.plan(model, x, select="some", latency_table=table)


def test_latency_table_from_another_device(small_plan):
    from fxrebirth.rewrite.cost import measure_latency

    model, x, _ = small_plan
    table = measure_latency(fxrebirth.capture(model, x), (x,), repeats=1)
    plan = fxrebirth.plan(model, x, latency_table=table)
    assert plan.source == "latency table" and len(plan.regions) == 11
    assert all(r.cost_rebirth_s > 0 for r in plan.regions)


def test_rebuild_replaces_selected_regions_and_keeps_shapes(small_plan):
    from fxrebirth.retraining.layers import rebuild

    model, x, plan = small_plan
    edited = fxrebirth.Plan.from_json(plan.to_json())
    for r in edited.regions:
        r.selected = True
    gm = fxrebirth.capture(model, x)
    reborn = rebuild(gm, edited)
    kinds = {fxrebirth.graph.ops.kind_of(n) for n in reborn.graph.nodes}
    assert "lrn" not in kinds and "max_pool" not in {fxrebirth.graph.ops.kind_of(n) for n in reborn.graph.nodes
                                                      if n.meta.get("fxrebirth.region")}
    assert sum(n.op == "call_module" and n.target.startswith("rebirth_") for n in reborn.graph.nodes) == 11
    with torch.no_grad():
        assert reborn(x).shape == model(x).shape
        assert reborn(torch.randn(2, 3, 224, 224)).shape == (2, 1000)
