"""The depth strategy through the one planner (fxrebirth/retraining/strategies.py, selection.py): the dynamic
programme is optimal (against brute force on random candidate sets), never picks a merge that is not faster, and its front never falls; importance
is zero for a removable activation and positive for one that matters; plans round-trip through JSON and
give back segments that merge exactly; bad requests are clear errors; the model is not changed."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxrebirth
from fxrebirth.equivalence import relative_error, tolerance
from fxrebirth.graph.regions import DepthProposal, Region, RegionError
from fxrebirth.passes.depth import find_segments
from fxrebirth.passes.linearise import linearise, merge
from fxrebirth.retraining.plandata import Candidate, Plan
from fxrebirth.retraining.selection import choose
from fxrebirth.retraining.strategies import DepthStrategy, region_of, segment_of
from fxrebirth.retraining.strategies import depth_candidates as candidates


def importance(gm, segments, images):
    return DepthStrategy().importance(gm, [region_of(s) for s in segments], images)


def plan_depth(model, example, calibration, **options):
    """The depth strategy alone through the one planner."""
    return fxrebirth.plan(model, example, strategies="depth", calibration=calibration, **options)


def _segments(plan, gm):
    plan.validate(gm)
    return [segment_of(gm, c.region) for c in plan.selected]


def _span(gm, seg):
    position = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    return min(position[n] for n in seg.nodes), position[seg.output]
from fxrebirth.retraining.layers import build_rebirth


def _candidate(i, span, gain, imp):
    proposal = DepthProposal(4, 4, [3, 3], [1, 1], [1, 1], 1)
    region = Region(f"c{i}", "depth", (f"n{i}",), "x", f"n{i}", (), proposal)
    return Candidate(region, 1.0, 1.0 - gain, imp, span)


@st.composite
def candidate_sets(draw):
    n = draw(st.integers(1, 8))
    out = []
    for i in range(n):
        start = draw(st.integers(0, 20))
        end = start + draw(st.integers(0, 6))
        gain = draw(st.sampled_from([-0.2, 0.0, 0.05, 0.1, 0.15, 0.3, 0.45]))
        out.append(_candidate(i, (start, end), gain, draw(st.floats(0, 5))))
    return out, draw(st.floats(0, 1.2))


def test_gains_that_reach_the_whole_latency_are_capped_not_a_division_by_zero():
    """Noisy A/B timings of small layers can add up to more than the model's own latency."""
    cands = [_candidate(i, (2 * i, 2 * i + 1), 0.4, 0.1 * i) for i in range(4)]  # 1.6 s saved of 1 s
    plan = Plan("m", [1, 3, 8, 8], 1.0, "test", cands, ["depth"], [2, 3, 8, 8])
    plan.select()
    assert plan.front and all(math.isfinite(p.speedup) for p in plan.front)
    plan.select(target_speedup=2.0)
    assert plan.selected and math.isfinite(plan.front[-1].speedup)


def _conflict_free(cands, chosen):
    spans = sorted(cands[i].span for i in chosen)
    return all(a[1] < b[0] for a, b in zip(spans, spans[1:]))


@given(candidate_sets())
def test_the_programme_is_optimal_against_brute_force(case):
    cands, need = case
    unit = 0.05
    picked, front, most = choose(cands, need, unit)
    units = {i: int(c.gain_s // unit) for i, c in enumerate(cands)}
    need_units = math.ceil(need / unit - 1e-9)
    best = math.inf
    for r in range(len(cands) + 1):
        for subset in itertools.combinations(range(len(cands)), r):
            if _conflict_free(cands, subset) and all(cands[i].gain_s > 0 for i in subset) and \
                    sum(units[i] for i in subset) >= need_units:
                best = min(best, sum(cands[i].importance for i in subset))
    if best == math.inf:
        assert picked == []
    else:
        assert _conflict_free(cands, picked) and all(cands[i].gain_s > 0 for i in picked)
        assert sum(cands[i].gain_s for i in picked) >= need - 1e-9
        assert sum(cands[i].importance for i in picked) == pytest.approx(best, abs=1e-9)
    gains = [g for g, _, _ in front]
    imps = [imp for _, imp, _ in front]
    assert gains == sorted(gains) and imps == sorted(imps) and imps[0] == 0.0  # the first: the least (empty) set
    assert gains[-1] <= most + 1e-12


class Block(nn.Module):
    """An inverted residual (expand 1x1, depthwise 3x3, project 1x1) with ReLU6, and a head."""

    def __init__(self, c=8, e=3, classes=5, k=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU6())
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.Conv2d(c, c * e, 1), nn.BatchNorm2d(c * e), nn.ReLU6(),
            nn.Conv2d(c * e, c * e, k, 1, k // 2, groups=c * e), nn.BatchNorm2d(c * e), nn.ReLU6(),
            nn.Conv2d(c * e, c, 1), nn.BatchNorm2d(c)) for _ in range(2))
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean((2, 3)))


def _trained_like(model, seed=0):
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
    return model.eval()


def test_importance_is_zero_where_an_activation_never_clips_and_positive_where_it_does():
    images = torch.randn(32, 3, 16, 16, dtype=torch.float64)
    clipping = fxrebirth.capture(_trained_like(Block(k=1)).double(), images[:2])
    segs = [s for s in find_segments(clipping) if len(s.convs) == 3 and "blocks.0" in " ".join(s.replaces)]
    assert importance(clipping, segs, images)[segs[0].id] > 1e-4
    calm = _trained_like(Block(k=1))
    for m in calm.modules():  # every pre-activation in (0, 6): ReLU6 is the identity on them
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.fill_(1e-2)
                m.bias.fill_(3.0)
    gm = fxrebirth.capture(calm.double(), images[:2])
    assert importance(gm, [segment_of(gm, region_of(segs[0]))], images)[segs[0].id] == pytest.approx(0, abs=1e-12)


def test_regions_round_trip_and_build_the_merged_layer():
    gm = fxrebirth.capture(_trained_like(Block()), torch.randn(2, 3, 16, 16))
    for seg in candidates(gm, prune="all"):
        region = Region.from_dict(region_of(seg).to_dict())
        assert isinstance(region.proposal, DepthProposal)
        assert segment_of(gm, region) == seg
        x = torch.randn(tuple(next(n for n in gm.graph.nodes if n.name == seg.input).meta["tensor_meta"].shape))
        out = next(n for n in gm.graph.nodes if n.name == seg.output).meta["tensor_meta"].shape
        assert tuple(build_rebirth(region.proposal)(x).shape) == tuple(out)


def test_cuts_are_offered_as_asked():
    gm = fxrebirth.capture(_trained_like(Block()), torch.randn(2, 3, 16, 16))
    none, grown, every = (set(s.id for s in candidates(gm, prune=p)) for p in ("none", "grown", "all"))
    assert none == {s.id for s in find_segments(gm)} and none <= grown <= every and len(every) > len(none)
    assert any(" -" in i for i in every)
    with pytest.raises(ValueError, match="prune="):
        candidates(gm, prune="some")
    other = fxrebirth.capture(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)), torch.randn(2, 3, 9, 9))
    with pytest.raises(RegionError, match="not a depth region|no such segment"):
        segment_of(other, region_of(next(iter(candidates(gm)))))


@pytest.fixture(scope="module")
def planned():
    model = _trained_like(Block())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_depth(model, (torch.randn(1, 3, 64, 64),), torch.randn(32, 3, 16, 16), rounds=3)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # the model is not changed
    return model, plan


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_plan_selects_only_faster_merges_and_its_segments_merge_exactly(planned, dtype):
    model, plan = planned
    plan = Plan.from_json(plan.to_json())  # a copy: the fixture is shared
    assert plan.front and plan.selected  # no target: the set that saves the most
    assert plan.estimated_speedup >= max(p.speedup for p in plan.front) * (1 - 1e-9)
    target = plan.front[len(plan.front) // 2].speedup
    plan.select(target_speedup=target)
    assert plan.selected and all(c.gain_s > 0 for c in plan.selected)
    assert plan.estimated_speedup >= target * (1 - 1e-9)
    again = Plan.from_json(plan.to_json())
    assert again.to_json() == plan.to_json() and "selected" in again.table()
    gm = fxrebirth.capture(copy.deepcopy(model).to(dtype), torch.randn(2, 3, 20, 20, dtype=dtype))
    student = linearise(gm, _segments(again, gm))
    merged = merge(student)
    bound = 1e-9 if dtype == torch.float64 else tolerance(torch.float32)
    for size in (20, 23):
        x = torch.randn(2, 3, size, size, dtype=dtype)
        with torch.no_grad():
            assert relative_error(student(x), merged(x)) <= bound


def test_an_unreachable_target_or_two_goals_are_errors(planned):
    _, plan = planned
    with pytest.raises(ValueError, match="no set of merges reaches .*lower the target"):
        plan.select(target_speedup=1e4)  # beyond the grid: noisy gains are capped at 2000 steps, 2000x
    with pytest.raises(ValueError, match="not both"):
        plan.select(target_speedup=1.1, budget_s=1.0)


# ------------------------------------------------------------------------------------------- retraining


@pytest.fixture(scope="module")
def shapes():
    from fxrebirth.paper.data import Shapes

    return Shapes("train", 192, 16, seed=0), Shapes("test", 64, 16, seed=0)


def _depth_plan(model, data):
    calibration = torch.stack([data[i][0] for i in range(32)])
    plan = plan_depth(model, (torch.randn(1, 3, 32, 32),), calibration, rounds=2)
    plan.select(target_speedup=plan.front[-1].speedup)  # the most the front offers: every merge it can
    return plan


def test_rebirth_of_a_depth_plan_retrains_merges_and_resumes(shapes, tmp_path):
    train, test = shapes
    model = _trained_like(Block(classes=10))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan = _depth_plan(model, train)
    convs = lambda gm: sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.conv2d)
    merged_away = sum(len(c.region.nodes) for c in plan.selected)
    reborn, report = fxrebirth.rebirth(model, plan, train, test_data=test, epochs=0.5, batch_size=32,
                                       checkpoint_dir=tmp_path, control=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    original = fxrebirth.capture(model, train[0][0][None])
    merged = [n for n in reborn.graph.nodes if n.op == "call_function" and n.target is torch.conv2d
              and "depth_merged" in n.kwargs["weight"].target]
    assert len(merged) == len(plan.selected) and merged_away > 0
    assert convs(reborn) < convs(original)
    assert report.trained_images == 96 and report.control["trained_images"] == 96
    assert [r["id"] for r in report.regions] == sorted((c.region.id for c in plan.selected),
                                                       key=[c.region.id for c in plan.selected].index)
    for size in (16, 19):  # the merged model runs at other sizes
        assert reborn(torch.randn(2, 3, size, size)).shape == (2, 10)
    again, _ = fxrebirth.rebirth(model, plan, train, epochs=0.5, batch_size=32, checkpoint_dir=tmp_path)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(again(x), reborn(x))  # resumed from the finished checkpoint: the same model


def test_a_depth_rebirth_refuses_what_it_cannot_do(shapes):
    from fxrebirth.errors import FxRebirthError

    train, _ = shapes
    model = _trained_like(Block(classes=10))
    plan = _depth_plan(model, train)
    with pytest.raises(FxRebirthError, match="init='lstsq' is read by the streamline and branch strategies"):
        fxrebirth.rebirth(model, plan, train, init="lstsq")
    with pytest.raises(FxRebirthError, match="layerwise_epochs=1.0 is read by"):
        fxrebirth.rebirth(model, plan, train, layerwise_epochs=1.0)
    empty = Plan.from_json(plan.to_json())
    for c in empty.candidates:
        c.selected = False
    with pytest.raises(FxRebirthError, match="selects no candidate"):
        fxrebirth.rebirth(model, empty, train)
    with pytest.raises(RegionError, match="made for a Block"):
        fxrebirth.rebirth(nn.Sequential(nn.Conv2d(3, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), plan, train)


def test_every_pair_a_plan_may_choose_merges_exactly():
    """Every two candidates whose spans do not overlap (what the programme may choose together), cuts included:
    shortcuts inside a segment (the stem's activation read by the first block's addition), additions dropped
    to a shortcut that is itself an activation, a segment reading one whose addition was dropped; in float64,
    listed in either order."""
    gm = fxrebirth.capture(_trained_like(Block()).double(), torch.randn(2, 3, 16, 16, dtype=torch.float64))
    every = candidates(gm, prune="all")
    pairs = [(a, b) for a, b in itertools.combinations(every, 2) if _span(gm, a)[1] < _span(gm, b)[0]]
    assert len(pairs) > 20
    for i, (a, b) in enumerate(pairs):
        student = linearise(gm, [b, a] if i % 2 else [a, b])
        merged = merge(student)
        x = torch.randn(2, 3, 16 + i % 5, 16 + i % 5, dtype=torch.float64)
        with torch.no_grad():
            assert relative_error(student(x), merged(x)) <= 1e-9, (a.id, b.id)


ZOO = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "timm:mobilenetv2_050"]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_plans_choose_sets_that_merge_exactly_at_two_sizes(name):
    """On models nobody here wrote: plan with every cut offered, take the front's largest set (the most
    combinations at once), linearise and merge it, in float64 at two sizes."""
    if name.startswith("timm:"):
        timm = pytest.importorskip("timm")
        model = timm.create_model(name[5:], pretrained=False, num_classes=10)
    else:
        import torchvision

        model = getattr(torchvision.models, name)(num_classes=10)
    model = _trained_like(model)
    plan = plan_depth(model, (torch.randn(1, 3, 64, 64),), torch.randn(8, 3, 32, 32), rounds=2, prune="all")
    assert plan.candidates and plan.front
    per_mac = plan.latency_s / sum(c.flops_now for c in plan.candidates)  # any disjoint set saves < the latency
    for c in plan.candidates:  # gains from MACs, so that the set chosen does not depend on the machine's noise
        c.latency_now_s, c.latency_new_s = c.flops_now * per_mac, c.flops_new * per_mac
    plan.select()  # the front of these gains
    plan.select(target_speedup=plan.front[-1].speedup)
    chosen = [c.region.id for c in plan.selected]
    assert len(chosen) >= 2 and all(c.gain_s > 0 for c in plan.selected)
    gm = fxrebirth.capture(copy.deepcopy(model).double(), torch.randn(2, 3, 48, 48, dtype=torch.float64))
    student = linearise(gm, _segments(plan, gm))
    merged = merge(student)
    for size in (48, 53):
        x = torch.randn(2, 3, size, size, dtype=torch.float64)
        with torch.no_grad():
            assert relative_error(student(x), merged(x)) <= 1e-9, chosen


def test_random_sets_of_mobilenet_v2_candidates_merge_exactly():
    """Seeded random conflict-free sets of every candidate and cut of torchvision mobilenet_v2, in float64."""
    import random

    import torchvision
    model = _trained_like(torchvision.models.mobilenet_v2(num_classes=10)).double()
    gm = fxrebirth.capture(model, torch.randn(2, 3, 48, 48, dtype=torch.float64))
    every = candidates(gm, prune="all")
    spans = {s.id: _span(gm, s) for s in every}
    rng = random.Random(0)
    for _ in range(8):
        chosen: list = []
        for s in rng.sample(every, len(every)):
            if rng.random() < 0.5 and all(spans[s.id][1] < spans[o.id][0] or spans[o.id][1] < spans[s.id][0]
                                          for o in chosen):
                chosen.append(s)
        student = linearise(gm, chosen)
        x = torch.randn(2, 3, 53, 53, dtype=torch.float64)
        with torch.no_grad():
            assert relative_error(student(x), merge(student)(x)) <= 1e-9, [s.id for s in chosen]


DDP_SCRIPT = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_depthplan import Block, _trained_like
import fxrebirth
from fxrebirth.paper.data import Shapes
from fxrebirth.retraining.plandata import Plan
torch.set_num_threads(1)
distributed = "RANK" in os.environ
if distributed:
    dist.init_process_group("gloo")
torch.manual_seed(0)
model = _trained_like(Block(classes=10))
with open(sys.argv[1]) as f:
    plan = Plan.from_json(f.read())
# batch statistics would normalise with each rank's half of the batch: compare with the running ones
reborn, _ = fxrebirth.rebirth(model, plan, Shapes("train", 128, 16, seed=0), epochs=1.0, batch_size=32,
                              train_batch_norm=False, eval_images=32)
if not distributed or dist.get_rank() == 0:
    torch.save(reborn.state_dict(), sys.argv[-1])
if distributed:
    dist.destroy_process_group()
"""


@pytest.mark.thorough  # one job: test_retrain's two-process test covers its data-parallel path in the ci profile
def test_a_depth_rebirth_on_two_processes_matches_one(shapes, tmp_path, one_and_two_processes):
    """The depth job under torchrun (gloo, two ranks, each half of every batch) trains the same merged
    model as one process: the engine's data-parallel path, reached through the depth job's student."""
    import os

    torch.manual_seed(0)
    plan = _depth_plan(_trained_like(Block(classes=10)), shapes[0])
    plan_path, script = tmp_path / "plan.json", tmp_path / "ddp.py"
    plan_path.write_text(plan.to_json())
    script.write_text(DDP_SCRIPT.format(tests=os.path.dirname(__file__)))
    a, b = one_and_two_processes(script, str(plan_path))
    assert a.keys() == b.keys() and any("depth_merged" in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)  # sums in another order, via Adam


def test_a_depth_plan_file_written_by_0_2_loads_into_the_one_plan():
    """0.2's depth planner wrote its own format (``candidates`` with ``latency_merged_s``, ``macs_*``, ``front``):
    it loads as today's plan, with its choice, costs and front; an unknown format is a one-line error."""
    import json

    proposal = DepthProposal(4, 4, [3, 3], [1, 1], [1, 1], 1).to_dict()
    region = Region("depth:a->b", "depth", ("a", "b"), "x", "b", ("conv",), proposal).to_dict()
    old = {"model": "Block", "input_shape": [1, 3, 8, 8], "calibration_shape": [2, 3, 8, 8], "latency_s": 1.0,
           "source": "test", "candidates": [{"region": region, "importance": 0.5, "latency_now_s": 0.4,
                                             "latency_merged_s": 0.1, "macs_now": 10, "macs_merged": 7,
                                             "span": [0, 1], "selected": True}],
           "front": [{"speedup": 1.43, "importance": 0.5, "chosen": ["depth:a->b"]}]}
    plan = Plan.from_json(json.dumps(old))
    (c,) = plan.candidates
    assert c.selected and c.strategy == "depth" and c.latency_new_s == 0.1 and c.importance == 0.5
    assert plan.strategies == ["depth"] and plan.front[0].chosen == ["depth:a->b"]
    assert Plan.from_json(plan.to_json()).to_json() == plan.to_json()
    with pytest.raises(RegionError, match="format 'fxrebirth-plan/99'.*plan again"):
        Plan.from_json(json.dumps({"format": "fxrebirth-plan/99"}))


def test_a_depth_segment_dropped_to_its_shortcut_after_a_merged_stem_finishes():
    """A depth segment whose addition is dropped to its shortcut becomes the identity; when its shortcut is a
    streamline region's output (ResNet's stem), the streamline finish renames that node first: the depth
    finish must still merge the rest (it raised KeyError on the renamed node)."""
    import torchvision

    from fxrebirth.retraining.planning import mark
    from fxrebirth.retraining.student import build_student, finish_student

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = fxrebirth.capture(model, x)
    found = mark(gm, strategies=["streamline", "depth"], prune="all")
    (stem,) = [r for r in found["streamline"] if r.id == "streamline:conv1"]
    # the first block's residual branch dropped (its last BatchNorm pruned): the block becomes its shortcut
    (dropped,) = [r for r in found["depth"] if r.id == f"depth:{stem.output}->iadd -batch_norm_2"]
    regions = [stem, dropped]
    candidates = [Candidate(r, 1.0, 0.5, 0.0, (i, i), selected=True) for i, r in enumerate(regions)]
    plan = Plan(model="ResNet", input_shape=[1, 3, 32, 32], latency_s=2.0, source="test", candidates=candidates,
                strategies=["streamline", "depth"])
    student, switches = build_student(gm, plan)
    for switch in switches.values():
        switch.active.fill_(True)
    reborn = finish_student(student, plan)
    with torch.no_grad():
        assert reborn(x).shape == (2, 10)
        assert relative_error(student.eval()(x), reborn(x)) <= tolerance(torch.float32)
