"""The retraining-strategy protocol from the outside: a strategy written here, touching no file of fxrebirth,
is planned, chosen among the others, trained, finished and reported by the library's one planner and one job."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import fxrebirth
from fxrebirth.graph.ops import kind_of
from fxrebirth.graph.regions import Proposal, Region
from fxrebirth.paper.data import Shapes
from fxrebirth.retraining.strategy import SwitchStrategy, register_strategy, strategy_names, unregister_strategy
from fxrebirth.rewrite.validate import OptionError


@dataclass
class StridedProposal(Proposal):
    """A max-pooling replaced by a learned depthwise convolution of the same window and stride."""

    type: ClassVar[str] = "test-strided"
    channels: int
    kernel: int
    stride: int

    @property
    def depth(self) -> int:
        return 1


class StridedStrategy(SwitchStrategy):
    """Every 2-D max-pooling of a square window becomes a depthwise strided convolution (a toy: it only has
    to be a strategy the library has never seen)."""

    name = "test-strided"
    options = frozenset({"strided_min_channels"})

    def mark(self, gm, *, strided_min_channels: int = 1, **_):
        found = []
        for node in gm.graph.nodes:
            if kind_of(node) != "max_pool" or len(node.meta["tensor_meta"].shape) != 4:
                continue
            source = node.all_input_nodes[0]
            channels = source.meta["tensor_meta"].shape[1]
            kernel, stride = node.kwargs.get("kernel_size"), node.kwargs.get("stride") or node.kwargs.get("kernel_size")
            kernel, stride = (k[0] if isinstance(k, (list, tuple)) else k for k in (kernel, stride))
            if channels < strided_min_channels or node.kwargs.get("padding") not in (0, (0, 0), [0, 0], None):
                continue
            found.append(Region(f"test-strided:{node.name}", self.name, (node.name,), source.name, node.name,
                                (node.name,), StridedProposal(channels, kernel, stride)))
        return found

    def layer(self, region):
        p = region.proposal
        return nn.Conv2d(p.channels, p.channels, p.kernel, p.stride, groups=p.channels)


class Net(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


@pytest.fixture
def strided():
    strategy = register_strategy(StridedStrategy())
    yield strategy
    unregister_strategy(strategy.name)


def _planned(model):
    plan = fxrebirth.plan(model, torch.randn(1, 3, 16, 16), strategies=["test-strided"], rounds=1)
    for c in plan.candidates:  # every candidate, whatever this machine's timings say
        c.selected = True
    return plan


def test_a_strategy_written_in_a_test_plans_trains_and_reports(strided):
    torch.manual_seed(0)
    model = Net(len(Shapes.classes)).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert "test-strided" in strategy_names() and "test-strided" in fxrebirth.strategy_names()
    plan = _planned(model)
    assert [c.strategy for c in plan.candidates] == ["test-strided"] * 2
    again = fxrebirth.Plan.from_json(plan.to_json())  # its proposal type round-trips through JSON
    assert again.to_json() == plan.to_json() and "test-strided:" in again.table()
    train, test = Shapes("train", 96, 16, seed=0), Shapes("test", 32, 16, seed=0)
    reborn, report = fxrebirth.rebirth(model, again, train, test_data=test, epochs=0.5, batch_size=32, eval_images=16)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # the user's model is not touched
    assert not any(kind_of(n) == "max_pool" for n in reborn.graph.nodes)
    assert sum(isinstance(m, nn.Conv2d) and m.groups == 8 for m in reborn.modules()) == 2
    assert [r["id"] for r in report.regions] == [c.region.id for c in again.candidates]
    assert report.trained_images == 48 and report.student is not None and 0 <= report.student["top1"] <= 1
    assert reborn(torch.randn(2, 3, 16, 16)).shape == (2, len(Shapes.classes))


def test_a_test_strategy_is_one_of_every_strategy_and_its_options_are_routed(strided):
    model = Net(3).eval()
    x = torch.randn(1, 3, 16, 16)
    found = fxrebirth.retraining.planning.mark(model, x)  # every registered strategy that finds a candidate
    assert set(found) >= {"test-strided"} and "branch" not in found
    assert fxrebirth.retraining.planning.mark(model, x, strategies=["test-strided"], strided_min_channels=9) == {
        "test-strided": []}
    with pytest.raises(OptionError, match="strided_min_channels: read by the test-strided strategy"):
        fxrebirth.retraining.planning.mark(model, x, strategies=["depth"], strided_min_channels=9)
    with pytest.raises(OptionError, match="no retraining strategy 'nope'; known: .*test-strided"):
        fxrebirth.plan(model, x, strategies=["nope"])


def test_a_training_option_the_plan_s_strategies_do_not_read_is_refused_before_work(strided):
    model = Net(len(Shapes.classes)).eval()
    plan = _planned(model)
    with pytest.raises(OptionError, match="init='lstsq' is read by the streamline and branch strategies"):
        fxrebirth.rebirth(model, plan, Shapes("train", 8, 16, seed=0), init="lstsq")


def test_one_job_trains_a_plan_that_mixes_every_strategy(tmp_path):
    """Streamline, branch and depth candidates chosen together (a depth segment reading a streamline region's
    output among them, when the model has one) are trained by one job and finished into one model: rebirth layers
    in place of the regions, one convolution per depth segment."""
    from fxrebirth.paper.models import googlenet_lrn

    torch.manual_seed(0)
    model = googlenet_lrn(num_classes=len(Shapes.classes), width=0.125).eval()
    plan = fxrebirth.plan(model, torch.randn(1, 3, 32, 32), calibration=torch.randn(4, 3, 32, 32), rounds=1)
    assert {"streamline", "branch", "depth"} <= set(plan.strategies)
    outputs = {c.region.output for c in plan.candidates if c.strategy == "streamline"}
    ranked = sorted(plan.candidates, key=lambda c: (c.strategy != "depth" or c.region.input not in outputs, c.span))
    chosen, seen = [], set()
    for c in ranked:  # one of each strategy, disjoint in graph order
        c.selected = False
        if c.strategy not in seen and all(c.span[1] < o.span[0] or o.span[1] < c.span[0] for o in chosen):
            chosen.append(c)
            seen.add(c.strategy)
    for c in chosen:
        c.selected = True
    assert seen == {"streamline", "branch", "depth"}
    train = Shapes("train", 64, 32, seed=0)
    reborn, report = fxrebirth.rebirth(model, plan, train, epochs=0.25, batch_size=32, checkpoint_dir=tmp_path)
    assert sorted(r["id"] for r in report.regions) == sorted(c.region.id for c in chosen)
    merged = [n for n in reborn.graph.nodes if n.op == "call_function" and n.target is torch.conv2d
              and "depth_merged" in str(n.kwargs.get("weight", ""))]
    assert len(merged) == 1
    assert sum(n.op == "call_module" and n.target.startswith("rebirth_") for n in reborn.graph.nodes) == 2
    assert reborn(torch.randn(2, 3, 32, 32)).shape == (2, len(Shapes.classes))
