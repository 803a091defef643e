"""Planning: costs, selection, JSON round trip, edits, and rejection of bad plans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fxrebirth

PAPER = ("streamline", "branch")  # the paper's strategies: GoogLeNet's regions
from fxrebirth.paper.models import googlenet_lrn
from fxrebirth.graph.regions import RegionError


@pytest.fixture(scope="module")
def small_plan():
    model = googlenet_lrn(width=0.25).eval()
    x = torch.randn(1, 3, 64, 64)
    return model, x, fxrebirth.plan(model, x, strategies=PAPER, rounds=2)


def test_plan_measures_every_region_and_selects_only_gains(small_plan):
    _, _, plan = small_plan
    assert len(plan.candidates) == 11
    assert all(r.latency_now_s > 0 and r.latency_new_s > 0 for r in plan.candidates)
    assert all(r.gain_s > 0 for r in plan.selected)
    assert all(not r.selected for r in plan.candidates if r.gain_s <= 0)
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
    for r in edited.candidates:
        r.selected = True
    edited.candidates[0].region.proposal.out_channels += 1
    with pytest.raises(RegionError, match="streamline:conv1.conv.*produces"):
        edited.validate(gm)
    edited = fxrebirth.Plan.from_json(plan.to_json())
    branch = next(r for r in edited.candidates if r.region.kind == "branch")
    branch.selected = True
    branch.region.proposal.branches[1].layers[0].out_channels = 3  # a thinner reduce layer fits
    edited.validate(gm)
    branch.region.proposal.branches[1].layers[-1].out_channels += 2  # a wider output does not
    with pytest.raises(RegionError, match="produces"):
        edited.validate(gm)


def test_overlapping_plan_is_rejected(small_plan):
    model, x, plan = small_plan
    edited = fxrebirth.Plan.from_json(plan.to_json())
    a, b = edited.candidates[2], edited.candidates[3]
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
    with pytest.raises(KeyError, match="no candidate 'nope'"):
        edited.drop("nope")
    from fxrebirth.rewrite.cost import measure_latency

    table = measure_latency(fxrebirth.capture(model, x), (x,), repeats=1)  # fixed costs: no timing noise
    roomy = fxrebirth.plan(model, x, strategies=PAPER, latency_table=table, budget_s=1e9)
    assert roomy.selected == []  # already within budget
    every = fxrebirth.plan(model, x, strategies=PAPER, latency_table=table)  # no goal: all worth merging
    assert every.selected == [r for r in every.candidates if r.gain_s > 0]
    with pytest.raises(ValueError, match="no set of merges reaches"):
        fxrebirth.plan(model, x, strategies=PAPER, latency_table=table, budget_s=0.0)
    half = fxrebirth.plan(model, x, strategies=PAPER, latency_table=table, target_speedup=1.0 + 1e-9)
    assert len(half.selected) == 1 and half.selected[0].gain_s == max(r.gain_s for r in half.candidates)
    with pytest.raises(ValueError, match=r"unknown planning option\(s\) \['select'\]"):
        fxrebirth.plan(model, x, select="some", latency_table=table)


def test_keep_leaves_the_named_regions_unmerged(small_plan):
    """keep= takes ids and id prefixes: those regions are measured and listed but never selected, also when a
    target speed-up then has to be met by other regions; a name that matches nothing is an error naming the
    ids, never a plan that silently merges the region the user meant to keep."""
    from fxrebirth.rewrite.cost import measure_latency

    model, x, _ = small_plan
    table = measure_latency(fxrebirth.capture(model, x), (x,), repeats=1)  # fixed costs: no timing noise
    every = fxrebirth.plan(model, x, strategies=PAPER, latency_table=table)
    assert any(r.region.kind == "streamline" for r in every.selected)
    kept = fxrebirth.plan(model, x, strategies=PAPER, latency_table=table, keep=["streamline:", "branch:blocks.inception3a"])
    assert len(kept.candidates) == 11
    assert {r.region.id for r in every.selected} - {r.region.id for r in kept.selected} == {
        r.region.id for r in every.selected if r.region.kind == "streamline" or r.region.id.endswith("inception3a")}
    one = fxrebirth.plan(model, x, strategies=PAPER, latency_table=table, target_speedup=1.0 + 1e-9, keep=[every.selected[0].region.id])
    best_other = max((r for r in one.candidates if r.region.id != every.selected[0].region.id), key=lambda r: r.gain_s)
    assert [r.region.id for r in one.selected] == [best_other.region.id]
    edited = fxrebirth.Plan.from_json(every.to_json())
    edited.keep(("streamline:conv2.conv",))
    assert "streamline:conv2.conv" in {r.region.id for r in every.selected}  # a copy: every is untouched
    assert "streamline:conv2.conv" not in {r.region.id for r in edited.selected}
    assert len(edited.selected) == len(every.selected) - 1
    for bad in (["streamline:conv9"], ["inception3a"]):  # a prefix, not a substring
        with pytest.raises(RegionError, match="no candidate has that id or prefix; candidates: streamline:conv1.conv"):
            fxrebirth.plan(model, x, strategies=PAPER, latency_table=table, keep=bad)
        with pytest.raises(RegionError, match=bad[0]):
            edited.keep(bad)


def test_latency_table_from_another_device(small_plan):
    from fxrebirth.rewrite.cost import measure_latency

    model, x, _ = small_plan
    table = measure_latency(fxrebirth.capture(model, x), (x,), repeats=1)
    plan = fxrebirth.plan(model, x, strategies=PAPER, latency_table=table)
    assert plan.source == "latency table" and len(plan.candidates) == 11
    assert all(r.latency_new_s > 0 for r in plan.candidates)


def test_rebuild_replaces_selected_regions_and_keeps_shapes(small_plan):
    from fxrebirth.retraining.planning import rebuild

    model, x, plan = small_plan
    edited = fxrebirth.Plan.from_json(plan.to_json())
    for r in edited.candidates:
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


# ---------------------------------------------------------------------------------- plan.json compatibility

DATA = Path(__file__).parent / "data"


class _PoolBetween(torch.nn.Module):
    """The model tests/data/plan-0.2.0-pool-between.json was saved from (by fxrebirth 0.2.0): an inception
    module whose pool branch sits between two conv branches, so the absorbing branch's extra channels come
    *before* its own."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.LocalResponseNorm(3))
        self.b1 = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU())
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.proj = nn.Sequential(nn.Conv2d(8, 3, 1), nn.ReLU())
        self.b3 = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())

    def forward(self, x):
        x = self.stem(x)
        return torch.cat([self.b1(x), self.proj(self.pool(x)), self.b3(x)], 1)


SAVED = {"plan-0.2.0-googlenet_lrn.json": (lambda: googlenet_lrn(), (1, 3, 64, 64)),
         "plan-0.2.0-pool-between.json": (_PoolBetween, (1, 3, 32, 32))}


@pytest.mark.parametrize("name", sorted(SAVED))
def test_a_plan_saved_by_0_2_loads_as_the_typed_plan_marked_today(name):
    """A 0.2 plan.json (untyped proposals, no node names) loads into the same typed regions that marking the
    same model gives today, validates, builds the same rebirth layers, and round-trips through JSON."""
    from fxrebirth.graph.regions import ConvProposal, InceptionProposal
    from fxrebirth.passes import inception, streamline
    from fxrebirth.retraining.layers import build_rebirth

    factory, shape = SAVED[name]
    text = (DATA / name).read_text()
    old = fxrebirth.Plan.from_json(text)
    model, x = factory().eval(), torch.randn(shape)
    gm = fxrebirth.capture(model, x)
    today = streamline.mark_streamline(gm) + inception.mark_inception(gm)
    assert [r.region.to_dict() for r in old.candidates] == [r.to_dict() for r in today]
    assert {type(r.region.proposal) for r in old.candidates} <= {ConvProposal, InceptionProposal}
    assert any(isinstance(r.region.proposal, InceptionProposal) for r in old.candidates)
    for r in old.candidates:
        r.selected = True
    old.validate(gm)
    for planned, region in zip(old.candidates, today):
        shapes = [p.shape for p in build_rebirth(planned.region.proposal).parameters()]
        assert shapes == [p.shape for p in build_rebirth(region.proposal).parameters()]
    # the figures are kept as saved, and today's JSON round-trips exactly
    assert [r.latency_now_s for r in old.candidates] == [r["cost_now_s"] for r in json.loads(text)["regions"]]
    again = fxrebirth.Plan.from_json(old.to_json())
    assert again.to_json() == old.to_json()


def test_the_absorbed_side_of_a_0_2_plan_is_kept():
    from fxrebirth.graph.regions import InceptionProposal

    plan = fxrebirth.Plan.from_json((DATA / "plan-0.2.0-pool-between.json").read_text())
    proposal = next(r.region.proposal for r in plan.candidates if isinstance(r.region.proposal, InceptionProposal))
    absorbing = [b for b in proposal.branches if b.absorbs]
    assert len(absorbing) == 1 and absorbing[0].absorbed_position == "before"
    assert len(proposal.pool) == len(absorbing[0].absorbs) == 3  # max_pool, conv, relu


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["regions"][0]["region"]["proposal"].update(type="nope"), "unknown proposal type 'nope'"),
    (lambda p: p["regions"][0]["region"]["proposal"].update(colour=1), r"unknown field\(s\) \['colour'\]"),
    (lambda p: p["regions"][2]["region"].update(nodes=p["regions"][2]["region"]["nodes"][1:]),
     "does not fit its region's nodes"),
])
def test_a_broken_plan_file_is_a_clear_error(edit, message):
    data = json.loads((DATA / "plan-0.2.0-googlenet_lrn.json").read_text())
    edit(data)
    with pytest.raises(RegionError, match=message):
        fxrebirth.Plan.from_json(json.dumps(data))


def test_a_proposal_naming_nodes_outside_its_region_is_refused(small_plan):
    model, x, plan = small_plan
    edited = fxrebirth.Plan.from_json(plan.to_json())
    branch = next(r for r in edited.candidates if r.region.kind == "branch")
    branch.selected = True
    branch.region.proposal.pool = ["conv2d_0"]
    with pytest.raises(RegionError, match="must name nodes of the region"):
        edited.validate(fxrebirth.capture(model, x))


@pytest.mark.parametrize("runtime", ["onnxruntime", pytest.param("executorch", marks=pytest.mark.thorough)])
def test_a_plan_for_a_runtime_times_every_region_through_it(small_plan, runtime):
    """Each region is cut out and timed A/B against its rebirth layer by the runtime itself; ExecuTorch
    needs the regions holding LRN lowered first (the CLI passes the lowering)."""
    pytest.importorskip(runtime)
    model, x, _ = small_plan
    plan = fxrebirth.plan(model, x, strategies=PAPER, rounds=5, runtime=runtime)
    assert plan.source.startswith(f"measured here through {runtime}, median of 5 interleaved A/B rounds")
    assert len(plan.candidates) == 11 and plan.latency_s > 0
    assert all(r.latency_now_s > 0 and r.latency_new_s > 0 for r in plan.candidates)
    assert all(r.gain_s > 0 for r in plan.selected)


def test_a_merge_slower_on_the_target_runtime_is_never_selected(small_plan, monkeypatch):
    """With the runtime's timings replaced by known ones, exactly the regions whose rebirth layer is
    faster there are selected, whatever eager would say."""
    pytest.importorskip("onnxruntime")
    import fxrebirth.measure.timing as timing

    model, x, _ = small_plan
    calls = iter(range(10**6))

    def fake(runs, rounds, **kwargs):
        index = next(calls)
        if set(runs) == {"model"}:
            return {"model": 100.0}
        slower = index % 2 == 0  # every other region's rebirth layer is slower on the "runtime"
        return {"now": 2.0, "new": 3.0 if slower else 1.0}

    monkeypatch.setattr(timing, "interleaved_medians", fake)
    plan = fxrebirth.plan(model, x, strategies=PAPER, rounds=1, runtime="onnxruntime")
    slower = [r for r in plan.candidates if r.latency_new_s > r.latency_now_s]
    assert slower and len(plan.selected) == len(plan.candidates) - len(slower)
    assert not any(r.selected for r in slower)


def test_a_plan_takes_a_runtime_or_a_latency_table_not_both(small_plan):
    model, x, _ = small_plan
    with pytest.raises(ValueError, match="give one of latency_table=, device_table= or runtime="):
        fxrebirth.plan(model, x, latency_table={}, runtime="onnxruntime")
