"""Marking non-linear regions: which regions are found, their proposals' shapes, and region validity."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxrebirth
from fxrebirth.paper.models import MIN_INPUT, alexnet_lrn, googlenet_lrn
from fxrebirth.passes.inception import mark_inception
from fxrebirth.passes.streamline import mark_streamline
from fxrebirth.retraining.layers import build_rebirth
from fxrebirth.graph.regions import REGION_KEY, REGIONS_KEY, Region, RegionError, check_regions


def _marked(model: nn.Module, size: int):
    gm = fxrebirth.capture(model.eval(), torch.randn(1, 3, size, size))
    regions = mark_streamline(gm) + mark_inception(gm)
    return gm, regions


def _tv(name: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {"init_weights": False} if name == "googlenet" else {}
        return torchvision.models.get_model(name, weights=None, **kwargs)


def test_caffe_googlenet_streamline_and_nine_branch_regions():
    gm, regions = _marked(googlenet_lrn(width=0.25), 64)
    by_id = {r.id: r for r in regions}
    assert by_id["streamline:conv1.conv"].replaces == ("conv1.conv", "conv1.relu", "pool1", "norm1")
    assert by_id["streamline:conv2.conv"].replaces == ("conv2.conv", "conv2.relu", "norm2", "pool2")
    branches = sorted(r.id for r in regions if r.kind == "branch")
    assert branches == [f"branch:blocks.inception{n}" for n in ("3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b")]
    assert len(regions) == 11


def test_alexnet_conv_lrn_pool_regions():
    _, regions = _marked(alexnet_lrn(width=0.25), 96)
    assert [r.replaces for r in regions] == [
        ("conv1.conv", "conv1.relu", "norm1", "pool1"),
        ("conv2.conv", "conv2.relu", "norm2", "pool2"),
        ("conv5.conv", "conv5.relu", "pool5"),
    ]


def test_resnet50_stem():
    _, regions = _marked(_tv("resnet50"), 64)
    assert [r.replaces for r in regions] == [("conv1", "bn1", "relu", "maxpool")]


def test_torchvision_googlenet_stem_and_inception_branches():
    _, regions = _marked(_tv("googlenet"), 64)
    assert regions[0].replaces == ("conv1.conv", "conv1.bn", "relu", "maxpool1")
    assert sum(r.kind == "branch" for r in regions) == 9


def test_marking_changes_no_numerics_and_records_metadata():
    model = googlenet_lrn(width=0.25).eval()
    x = torch.randn(2, 3, 64, 64)
    gm = fxrebirth.capture(model, x)
    with torch.no_grad():
        before = gm(x)
    code = gm.code
    regions = mark_streamline(gm) + mark_inception(gm)
    with torch.no_grad():
        assert torch.equal(gm(x), before)
    assert gm.code == code
    assert set(gm.meta[REGIONS_KEY]) == {r.id for r in regions}
    for region in regions:
        assert all(n.meta[REGION_KEY] == region.id for n in gm.graph.nodes if n.name in region.nodes)


@pytest.mark.parametrize("factory", [googlenet_lrn, alexnet_lrn])
def test_rebirth_layers_fit_at_low_resolution_and_at_224(factory):
    for size in (MIN_INPUT[factory.__name__], MIN_INPUT[factory.__name__] + 1, 96, 224):
        gm, regions = _marked(factory(width=0.25), size)
        nodes = {n.name: n for n in gm.graph.nodes}
        for region in regions:
            x = torch.zeros(tuple(nodes[region.input].meta["tensor_meta"].shape))
            with torch.no_grad():
                out = build_rebirth(region.proposal)(x)
            assert tuple(out.shape) == tuple(nodes[region.output].meta["tensor_meta"].shape), (size, region.id)


@st.composite
def chains(draw):
    """A conv followed by a subset of BN, ReLU, LRN and pooling, in an order real networks use."""
    k, s = draw(st.integers(1, 7)), draw(st.integers(1, 4))
    p = draw(st.integers(0, k // 2))
    layers = [nn.Conv2d(3, 4, k, s, p)]
    if draw(st.booleans()):
        layers.append(nn.BatchNorm2d(4))
    if draw(st.booleans()):
        layers.append(nn.ReLU())
    pk, ps = draw(st.integers(2, 3)), draw(st.integers(1, 2))
    pool = draw(st.sampled_from([nn.MaxPool2d, nn.AvgPool2d]))(pk, ps, draw(st.integers(0, pk // 2)),
                                                              ceil_mode=draw(st.booleans()))
    tail = [pool, nn.LocalResponseNorm(3)] if draw(st.booleans()) else [nn.LocalResponseNorm(3), pool]
    if draw(st.booleans()):
        tail = [pool]
    return nn.Sequential(*layers, *tail)


@given(model=chains(), sizes=st.lists(st.integers(12, 80), min_size=2, max_size=3))
def test_random_chain_proposals_match_the_region_shape_at_every_size(model, sizes):
    for size in sizes:
        gm = fxrebirth.capture(model.eval(), torch.randn(1, 3, size, size))
        (region,) = mark_streamline(gm)
        out = gm.graph.find_nodes(op="output")[0].args[0]
        with torch.no_grad():
            got = build_rebirth(region.proposal)(torch.zeros(1, 3, size, size)).shape
        assert tuple(got) == tuple(out.meta["tensor_meta"].shape)


def test_invalid_regions_are_rejected_with_the_reason():
    gm, regions = _marked(googlenet_lrn(width=0.25), 64)
    first = regions[0]
    overlapping = Region("other", "streamline", first.nodes[-2:], first.nodes[-3], first.output, ())
    with pytest.raises(RegionError, match="overlap at node"):
        check_regions(gm.graph, [first, overlapping])
    leaking = Region("leak", "streamline", first.nodes[:-1], first.input, first.nodes[-2], ())
    check_regions(gm.graph, [leaking])  # a prefix of a chain is itself valid
    two_outputs = Region("two", "streamline", first.nodes[:2] + first.nodes[3:], first.input, first.output, ())
    with pytest.raises(RegionError):
        check_regions(gm.graph, [two_outputs])


@st.composite
def inception_modules(draw):
    """Random inception-like modules: 1x1, reduce->kxk and pool->proj branches in a random order."""
    c = draw(st.integers(2, 6))

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            k = draw(st.sampled_from([3, 5]))
            self.order = draw(st.permutations(["one", "kxk", "pool"]))
            self.one = nn.Sequential(nn.Conv2d(c, draw(st.integers(1, 4)), 1), nn.ReLU())
            r = draw(st.integers(1, 4))
            self.kxk = nn.Sequential(nn.Conv2d(c, r, 1), nn.ReLU(), nn.Conv2d(r, draw(st.integers(1, 4)), k,
                                                                               padding=k // 2), nn.ReLU())
            self.pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(c, draw(st.integers(1, 4)), 1), nn.ReLU())

        def forward(self, x):
            return torch.cat([getattr(self, name)(x) for name in self.order], 1)

    return M().eval(), c


@given(spec=inception_modules(), size=st.integers(5, 40), ratio=st.sampled_from([0.5, 1.0]))
def test_random_inception_modules_keep_their_output_shape(spec, size, ratio):
    model, c = spec
    x = torch.randn(1, c, size, size)
    gm = fxrebirth.capture(model, x)
    regions = mark_inception(gm, reduce_ratio=ratio)
    pool_next_to_kxk = abs(model.order.index("pool") - model.order.index("kxk")) == 1
    assert len(regions) == (1 if pool_next_to_kxk else 0)
    for region in regions:
        with torch.no_grad():
            assert build_rebirth(region.proposal)(x).shape == model(x).shape


@given(model=chains(), sizes=st.lists(st.integers(12, 80), min_size=2, max_size=3))
def test_conv_kernel_policy_keeps_the_region_shape_at_every_size_and_never_a_larger_kernel(model, sizes):
    """DeepRebirth's geometry ("conv": the first convolution's kernel, the pooling's stride multiplied in)
    must reproduce the chain's output size as the receptive-field default does, at every size."""
    for size in sizes:
        gm = fxrebirth.capture(model.eval(), torch.randn(1, 3, size, size))
        (paper,) = mark_streamline(gm, kernel_policy="conv")
        (field,) = mark_streamline(fxrebirth.capture(model.eval(), torch.randn(1, 3, size, size)))
        out = gm.graph.find_nodes(op="output")[0].args[0]
        with torch.no_grad():
            got = build_rebirth(paper.proposal)(torch.zeros(2, 3, size, size)).shape
        assert tuple(got)[1:] == tuple(out.meta["tensor_meta"].shape)[1:]
        assert all(p <= f for p, f in zip(paper.proposal.kernel_size, field.proposal.kernel_size))
        assert paper.proposal.stride == field.proposal.stride


def test_an_unknown_kernel_policy_is_refused_by_name():
    gm = fxrebirth.capture(googlenet_lrn(width=0.25).eval(), torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="kernel policy 'huge'"):
        mark_streamline(gm, kernel_policy="huge")


@given(model=chains(), sizes=st.lists(st.integers(12, 80), min_size=2, max_size=3),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_pool_policy_removes_only_the_normalisation_at_every_size(model, sizes, dtype):
    """The "pool" policy marks exactly the chains with an LRN and a max-pooling (or no pooling). Its rebirth
    layer, initialised with the original weights (the BatchNorm after the convolution folded into it), computes
    the chain with its LRN removed, at every size: maxpool(relu(x)) = relu(maxpool(x)), so the order does not
    matter.
    A chain without an LRN, or with an average pooling, is not marked."""
    from fxrebirth.equivalence import relative_error, tolerance
    from fxrebirth.retraining.initialise import Initialiser

    model = model.eval().to(dtype)
    kinds = {type(m) for m in model}
    if any(isinstance(m, nn.BatchNorm2d) for m in model):  # statistics away from the identity, so a lost fold shows
        bn = next(m for m in model if isinstance(m, nn.BatchNorm2d))
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    without_norm = nn.Sequential(*(m for m in model if not isinstance(m, nn.LocalResponseNorm)))
    for size in sizes:
        x = torch.randn(2, 3, size, size, dtype=dtype)
        try:
            with torch.no_grad():
                model(x)
        except RuntimeError:  # a stride-4 conv then a pooling: some sizes are too small for the chain itself
            continue
        gm = fxrebirth.capture(model, x)
        regions = mark_streamline(gm, kernel_policy="pool")
        if nn.LocalResponseNorm not in kinds or nn.AvgPool2d in kinds:
            assert regions == []
            continue
        (region,) = regions
        assert region.proposal.pool is not None and region.proposal.kernel_size == list(model[0].kernel_size)
        rebirth = build_rebirth(region.proposal).to(dtype)
        with torch.no_grad():
            assert Initialiser(gm, [region], "lstsq", 1e-3).apply(region, rebirth)["fit"] == "original"
            expected, got = without_norm(x), rebirth(x)
        assert got.shape == model(x).shape
        bound = 1e-9 if dtype == torch.float64 else tolerance(dtype)
        assert relative_error(expected, got) <= bound
        again = type(region.proposal).from_dict(region.proposal.to_dict())
        assert again == region.proposal  # the kept pooling survives plan.json


def test_each_policy_offers_every_geometry_and_a_plan_merges_one_per_chain():
    """``"each"``: one candidate per kernel policy whose proposal differs, the first under the chain's own id and
    the others as ``<id>@<policy>``; they overlap, so a plan (whatever it selects) merges at most one per chain
    and its selection still fits the model."""
    model = googlenet_lrn(width=0.25).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = fxrebirth.capture(model, x)
    regions = mark_streamline(gm, kernel_policy="each")
    by_chain: dict = {}
    for region in regions:
        by_chain.setdefault(region.id.split("@")[0], []).append(region)
    assert set(by_chain) == {r.id for r in mark_streamline(fxrebirth.capture(model, x))}
    for chain, variants in by_chain.items():
        assert len(variants) >= 2 and len({v.nodes for v in variants}) == 1, chain
        proposals = [v.proposal for v in variants]
        assert all(a != b for i, a in enumerate(proposals) for b in proposals[i + 1:])
        assert {v.id.partition("@")[2] for v in variants[1:]} <= {"conv", "pool"}
    plan = fxrebirth.plan(model, x, strategies=("streamline",), rounds=1, streamline_kernel="each")
    plan.select()
    chosen = [c.region.id.split("@")[0] for c in plan.selected]
    assert len(chosen) == len(set(chosen))
    plan.validate(fxrebirth.capture(model, x))
