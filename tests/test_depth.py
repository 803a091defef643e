"""Depth segments (passes/depth.py) and their student form and exact merge (passes/linearise.py).

Proven here: the student form keeps every output size at every input size and equals the activation-free
original away from the border; the merge equals the student form in float64 (1e-9) and float32 (1e-5) at
several sizes and batch 2; the geometry computed without weights is the merged layer's; and the refusals
(a second input, a non-linear join, reflect padding, ceil-mode pooling, overlapping choices).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxrebirth
from fxrebirth.equivalence import LOCAL_TOLERANCE, relative_error, tolerance
from fxrebirth.passes.depth import find_segments, segment_between
from fxrebirth.passes.linearise import linearise, merge


class Chain(nn.Module):
    """Convolutions (+ BN) with activations between them, and optionally ``x + chain(x)``."""

    def __init__(self, layers, channels, residual=False, act=nn.ReLU, bn=True):
        super().__init__()
        mods, c = [], channels
        for i, (out, k, s, p, g) in enumerate(layers):
            mods.append(nn.Conv2d(c, out, k, s, p, groups=g, bias=not bn))
            if bn:
                mods.append(nn.BatchNorm2d(out))
            if i < len(layers) - 1:
                mods.append(act())
            c = out
        self.body = nn.Sequential(*mods)
        self.residual = residual

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


def _randomise(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
    return model.eval()


@st.composite
def chains(draw):
    channels = draw(st.sampled_from([2, 4]))
    n = draw(st.integers(2, 3))
    layers, c, stride_total = [], channels, 1
    for _ in range(n):
        k = draw(st.sampled_from([1, 2, 3, 5]))
        s = draw(st.sampled_from([1, 2]))
        p = draw(st.integers(0, k // 2 + (k == 2)))
        depthwise = draw(st.booleans())
        out, g = (c, c) if depthwise else (draw(st.sampled_from([2, 4, 6])), 1)
        layers.append((out, k, s, p, g))
        c, stride_total = out, stride_total * s
    same = all(s == 1 and 2 * p == k - 1 for _, k, s, p, _ in layers) and c == channels
    residual = same and draw(st.booleans())
    size = draw(st.integers(24, 29))
    return layers, channels, residual, size


def _whole(gm):
    """The segment from the graph's input to the last linear node before the output."""
    nodes = list(gm.graph.nodes)
    x = next(n for n in nodes if n.op == "placeholder")
    last = nodes[-1].args[0]
    return segment_between(x, last, max_convs=8)


def _merged_conv(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.conv2d]


@given(chains(), st.sampled_from([torch.float64, torch.float32]))
def test_student_form_keeps_sizes_and_merges_exactly(case, dtype):
    layers, channels, residual, size = case
    model = _randomise(Chain(layers, channels, residual)).to(dtype)
    gm = fxrebirth.capture(model, torch.randn(2, channels, size, size, dtype=dtype))
    seg = _whole(gm)
    assert seg is not None and len(seg.activations) == len(layers) - 1
    student = linearise(gm, [seg])
    merged = merge(student)
    (conv,) = _merged_conv(merged)
    geo = seg.geometry
    assert tuple(conv.kwargs["weight"].meta["tensor_meta"].shape[2:]) == geo.kernel_size
    assert (tuple(conv.kwargs["stride"]), tuple(conv.kwargs["padding"]), conv.kwargs["groups"]) == \
        (geo.stride, geo.padding, geo.groups)
    bound = LOCAL_TOLERANCE if dtype == torch.float64 else tolerance(torch.float32)
    for n in (size, size + 1, size + 6):
        x = torch.randn(2, channels, n, n, dtype=dtype)
        original, s, m = gm(x), student(x), merged(x)
        assert s.shape == original.shape == m.shape
        assert relative_error(s, m) <= bound


def _no_activations(model):
    for name, m in list(model.body.named_children()):
        if isinstance(m, nn.ReLU):
            model.body[int(name)] = nn.Identity()
    return model


@given(chains())
def test_student_form_is_the_linear_original_away_from_the_border(case):
    layers, channels, residual, size = case
    model = _randomise(Chain(layers, channels, residual)).double()
    gm = fxrebirth.capture(model, torch.randn(2, channels, size, size, dtype=torch.float64))
    seg = _whole(gm)
    student = linearise(gm, [seg])
    linear = _no_activations(model)
    x = torch.randn(2, channels, size + 3, size + 3, dtype=torch.float64)
    want, got = linear(x), student(x)
    (k,), (s,), (p,) = seg.geometry.kernel_size[:1], seg.geometry.stride[:1], seg.geometry.padding[:1]
    n = x.shape[-1]
    first, last = -(-p // s), (n - k + p) // s  # outputs whose window lies inside the input
    if last >= first:
        inner = (..., slice(first, last + 1), slice(first, last + 1))
        assert relative_error(want[inner], got[inner]) <= LOCAL_TOLERANCE


def _geometry(layers, channels=8, residual=False, size=16):
    model = _randomise(Chain(layers, channels, residual))
    gm = fxrebirth.capture(model, torch.randn(2, channels, size, size))
    return gm, _whole(gm)


def test_two_3x3_become_one_5x5_at_25_over_18_the_work():
    _, seg = _geometry([(8, 3, 1, 1, 1), (8, 3, 1, 1, 1)])
    assert (seg.geometry.kernel_size, seg.geometry.padding) == ((5, 5), (2, 2))
    assert seg.geometry.growth == pytest.approx(25 / 18)


def test_inverted_residual_becomes_one_dense_3x3_with_its_identity():
    gm, seg = _geometry([(48, 1, 1, 0, 1), (48, 3, 1, 1, 48), (8, 1, 1, 0, 1)], residual=True)
    geo = seg.geometry
    assert (geo.kernel_size, geo.groups, geo.padding) == ((3, 3), 1, (1, 1))
    assert geo.growth < 1  # 9*8*8 per pixel against 8*48 + 9*48 + 48*8
    student = linearise(gm, [seg])
    x = torch.randn(2, 8, 13, 13, dtype=torch.float64)
    assert relative_error(student.double()(x), merge(student).double()(x)) <= 1e-9


def test_depthwise_chains_stay_depthwise():
    _, seg = _geometry([(8, 3, 1, 1, 8), (8, 3, 2, 1, 8)])
    assert (seg.geometry.groups, seg.geometry.kernel_size, seg.geometry.stride) == (8, (5, 5), (2, 2))


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.c(torch.relu(self.b(y)) + y * torch.sigmoid(y.mean((2, 3), keepdim=True)))


def test_refuses_a_second_input_and_a_nonlinear_join():
    gm = fxrebirth.capture(_TwoInputs().eval(), torch.randn(2, 4, 10, 10))
    nodes = {n.name: n for n in gm.graph.nodes}
    x = nodes["x"]
    # from b's input the add also reads the gated branch: never a segment; nothing spans the gating mul
    assert segment_between(nodes["relu"], nodes["add"]) is None
    assert segment_between(x, nodes["conv2d_2"]) is None
    # the first ReLU's value also feeds the gate, so no segment may remove it: none at all
    assert find_segments(gm) == []


def test_refuses_reflect_padding_and_partial_ceil_pooling():
    reflect = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    ceil = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AvgPool2d(3, 2, ceil_mode=True), nn.Conv2d(4, 4, 1))
    for model in (reflect, ceil):
        gm = fxrebirth.capture(model.eval(), torch.randn(2, 3, 11, 11))
        assert find_segments(gm) == []


def test_overlapping_choices_and_bad_cuts_are_errors():
    gm = fxrebirth.capture(_randomise(Chain([(4, 3, 1, 1, 1)] * 3, 4)), torch.randn(2, 4, 9, 9))
    segments = find_segments(gm)
    assert len(segments) >= 2
    with pytest.raises(ValueError, match="share node|reads"):
        linearise(gm, segments[-2:])
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with pytest.raises(ValueError, match="cannot prune"):
        segment_between(x, list(gm.graph.nodes)[-2], pruned=("x",))
    with pytest.raises(ValueError, match="student form"):
        merge(gm)


def test_pruning_a_conv_and_dropping_a_residual_branch():
    gm, seg = _geometry([(8, 3, 1, 1, 1), (8, 3, 1, 1, 1)], residual=True)
    nodes = list(gm.graph.nodes)
    x, out = nodes[0], nodes[-1].args[0]
    second = seg.convs[1]
    pruned = segment_between(x, out, pruned=(second,))
    assert pruned.geometry.kernel_size == (3, 3) and pruned.geometry.growth == 0.5  # one 3x3 of the two
    student = linearise(gm, [pruned])
    assert second not in {n.name for n in student.graph.nodes}
    xx = torch.randn(2, 8, 12, 12)
    assert relative_error(student(xx), merge(student)(xx)) <= 1e-5
    branch = next(n for n in out.args if n.op != "placeholder")
    dropped = segment_between(x, out, dropped=(branch.name,))
    assert torch.equal(linearise(gm, [dropped])(xx), xx)  # the block is its identity shortcut


def test_never_changes_its_argument():
    gm, seg = _geometry([(8, 3, 1, 1, 1), (8, 3, 1, 1, 1)])
    code = gm.code
    student = linearise(gm, [seg])
    student_code = student.code
    merge(student)
    assert gm.code == code and student.code == student_code


def _zoo(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name.startswith("timm:"):
            timm = pytest.importorskip("timm")
            return timm.create_model(name[5:], pretrained=False).eval()
        return torchvision.models.get_model(name, weights=None).eval()


def _disjoint(segments):
    chosen, used, outputs = [], set(), set()
    for seg in segments:
        if not used & set(seg.nodes) and (seg.input not in used or seg.input in outputs):
            chosen.append(seg)
            used |= set(seg.nodes)
            outputs.add(seg.output)
    return chosen


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "timm:efficientnet_b0"])
def test_zoo_segments_merge_exactly_at_two_sizes(name):
    model = _zoo(name)
    gm = fxrebirth.capture(model, torch.randn(2, 3, 64, 64))
    segments = find_segments(gm)
    chosen = _disjoint(segments)
    assert len(chosen) >= 5
    student = linearise(gm, chosen)
    merged = merge(student)
    assert len(_merged_conv(merged)) < len(_merged_conv(student))
    for size in (64, 72):
        x = torch.randn(2, 3, size, size)
        assert relative_error(student(x), merged(x)) <= tolerance(torch.float32)


def test_mobilenet_v2_inverted_residuals_merge_into_cheaper_dense_3x3():
    gm = fxrebirth.capture(_zoo("mobilenet_v2"), torch.randn(1, 3, 64, 64))
    blocks = [s for s in find_segments(gm) if s.output.startswith("add") and len(s.convs) == 3]
    assert len(blocks) == 10  # every stride-1 inverted residual with its shortcut
    assert all(s.geometry.kernel_size == (3, 3) and s.geometry.groups == 1 for s in blocks)
    assert sum(s.geometry.growth < 1 for s in blocks) >= 9



def test_a_wrong_merge_is_refused(monkeypatch):
    """The verification can fail: a merged bias 1e-6 off (relative ~1e-7, far above 1e-9) is caught and named."""
    from dataclasses import replace

    from fxrebirth.errors import EquivalenceError
    from fxrebirth.passes import linearise as module

    gm, seg = _geometry([(8, 3, 1, 1, 1), (8, 3, 1, 1, 1)])
    student = linearise(gm, [seg])
    right = module._kernel_of
    monkeypatch.setattr(module, "_kernel_of", lambda *a: replace(right(*a), bias=right(*a).bias + 1e-6))
    with pytest.raises(EquivalenceError, match="segment 'depth:x->"):
        merge(student)


class SharedShortcut(nn.Module):
    """``y = bn(conv(x)); out = y + bn(conv(relu(y)))``: the shortcut ``y`` is read by the branch too."""

    def __init__(self, c=4):
        super().__init__()
        self.a, self.b = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c)), nn.Sequential(
            nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.a(x)
        return y + self.b(torch.relu(y))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dropping_the_input_shortcut_keeps_the_branch_and_merges_exactly(dtype):
    model = _randomise(Chain([(8, 3, 1, 1, 1), (8, 3, 1, 1, 1)], 8, residual=True)).to(dtype)
    gm = fxrebirth.capture(model, torch.randn(2, 8, 16, 16, dtype=dtype))
    nodes = list(gm.graph.nodes)
    x, out = nodes[0], nodes[-1].args[0]
    whole = segment_between(x, out)
    chain = segment_between(x, out, dropped=(x.name,))  # the add's operand only: the branch still reads x
    assert chain.geometry.kernel_size == (5, 5) and chain.geometry.macs_merged == whole.geometry.macs_merged
    student = linearise(gm, [chain])
    merged = merge(student)
    bound = LOCAL_TOLERANCE if dtype == torch.float64 else tolerance(torch.float32)
    for size in (12, 13, 17):
        xx = torch.randn(2, 8, size, size, dtype=dtype)
        with torch.no_grad():
            assert relative_error(student(xx), merged(xx)) <= bound
            assert relative_error(linearise(gm, [whole])(xx), student(xx) + xx) <= bound  # only the identity went


def test_an_operand_the_segment_reads_elsewhere_cannot_be_dropped():
    gm = fxrebirth.capture(_randomise(SharedShortcut()), torch.randn(2, 4, 9, 9))
    nodes = list(gm.graph.nodes)
    x, out = nodes[0], nodes[-1].args[0]
    shortcut = next(a for a in out.args if len(a.users) > 1)
    assert segment_between(x, out) is not None
    with pytest.raises(ValueError, match="cannot drop .*droppable"):
        segment_between(x, out, dropped=(shortcut.name,))
