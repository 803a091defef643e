"""Metadata is not data (fxrebirth.metadata): shape, rank, dtype and device queries never block a rewrite,
static ones are resolved at capture, and the ones that may vary stay queries that follow their value."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxrebirth
from fxrebirth.graph.capture import capture
from fxrebirth.graph.metadata import SYMBOLIC_KEY, is_metadata_query
from fxrebirth.testing import assert_equivalent, count_kind, randomize_batchnorm


class NormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d pattern: assert the rank, then the batch norm, then the activation (written
    out: BatchNorm2d's own forward raises on ``x.dim() != 4``, Python control flow fx cannot trace)."""

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return F.relu(y)


class ConvNormAct(nn.Module):
    def __init__(self, cin, cout, k=3, stride=1):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), NormAct(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


def _model(*layers):
    return randomize_batchnorm(nn.Sequential(*layers), torch.Generator().manual_seed(3)).eval()


def _queries(gm):
    return [n for n in gm.graph.nodes if is_metadata_query(n)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rank_asserts_do_not_block_folding(dtype):
    model = _model(ConvNormAct(3, 8), ConvNormAct(8, 8, stride=2)).to(dtype)
    x = torch.randn(2, 3, 12, 12, dtype=dtype)
    gm, report = fxrebirth.optimize(model, x)
    assert count_kind(gm, "batch_norm") == 0 and not _queries(gm)
    assert not any(n.target is torch._assert for n in gm.graph.nodes)
    for size in (12, 13, 16):
        assert_equivalent(model, gm, torch.randn(2, 3, size, size, dtype=dtype))


class ChannelView(nn.Module):
    """The channel count (fixed by the conv) and the spatial sizes (free) both read from the shape."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.conv(x)
        n, c, h, w = y.shape
        z = self.bn(y).view(n, c // 2, 2, h * w).mean(2)
        return z.view(n, c // 2, h, w) * (c / 6)


def test_static_channels_resolve_and_spatial_sizes_stay_symbolic():
    model = _model(ChannelView())
    x = torch.randn(2, 3, 10, 10)
    gm = capture(model, x)
    # the conv fixes c = 6 (folded); n, h, w may vary and stay queries of the value they read
    queried = {tuple(n.args[1:]) if n.op == "call_method" else n.args[1] for n in _queries(gm)}
    assert queried == {"shape"}
    optimized, _ = fxrebirth.optimize(model, x)
    assert count_kind(optimized, "batch_norm") == 0
    for shape in ((2, 3, 10, 10), (3, 3, 7, 13), (1, 3, 32, 5)):
        assert_equivalent(model, optimized, torch.randn(*shape))


class Stride16Size(nn.Module):
    """A feature map of size floor-ish(H / 16): 2 at 32, 33 and 35 (the example and its variants), 4 at
    64. A resolver that judged 'static' from the sizes it saw would fold it to 2."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 4, 4), nn.Conv2d(4, 4, 4, 4)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.b(self.a(x))
        h, w = y.shape[2], y.shape[3]
        return self.bn(y).reshape(y.shape[0], 4, h * w).softmax(-1).reshape(-1, 4, h, w)


def test_a_size_equal_at_every_variant_is_not_taken_for_static():
    model = _model(Stride16Size())
    gm, report = fxrebirth.optimize(model, torch.randn(2, 3, 32, 32))
    assert count_kind(gm, "batch_norm") == 0
    for size in (32, 33, 64, 80):
        assert_equivalent(model, gm, torch.randn(2, 3, size, size))


class ChannelAgnostic(nn.Module):
    """Nothing fixes the channel count: ``x.shape[1]`` must stay a query."""

    def forward(self, x):
        return x.mean(1, keepdim=True) * x.shape[1] + x.dim()


def test_a_size_nothing_fixes_stays_a_query():
    model = ChannelAgnostic().eval()
    gm, _ = fxrebirth.optimize(model, torch.randn(2, 3, 8, 8))
    assert any(n.op == "call_function" and n.args[1:] == ("shape",) for n in _queries(gm))
    for channels in (1, 3, 5):
        assert_equivalent(model, gm, torch.randn(2, channels, 8, 8))


class InterpolateToShape(nn.Module):
    """GhostNetV3's gate: a pooled branch resized to the size of a conv's output that a BN then reads.
    Folding the BN removes the conv the size is read from: the query must move to the folded conv."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.gate = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        g = torch.sigmoid(self.gate(F.avg_pool2d(x, 2)))
        return self.bn(y) * F.interpolate(g, size=(y.shape[-2], y.shape[-1]), mode="nearest")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_size_query_moves_to_the_value_that_replaces_its_subject(dtype):
    model = _model(InterpolateToShape()).to(dtype)
    x = torch.randn(2, 3, 12, 12, dtype=dtype)
    gm, report = fxrebirth.optimize(model, x)
    assert count_kind(gm, "batch_norm") == 0, report
    subjects = {n.args[0] for n in _queries(gm)}
    assert subjects and all(s.op != "placeholder" and s in gm.graph.nodes for s in subjects)
    for size in (12, 13, 15, 20):
        assert_equivalent(model, gm, torch.randn(2, 3, size, size, dtype=dtype))


def test_symbolic_shapes_are_recorded_and_prove_equal_shapes():
    gm = capture(_model(InterpolateToShape()), torch.randn(2, 3, 12, 12))
    (bn,) = (n for n in gm.graph.nodes if fxrebirth.graph.ops.kind_of(n) == "batch_norm")
    conv = bn.kwargs["input"]
    assert conv.meta[SYMBOLIC_KEY] == bn.meta[SYMBOLIC_KEY]
    assert conv.meta[SYMBOLIC_KEY][1] == "8" and not conv.meta[SYMBOLIC_KEY][2].isdigit()


class SizeAssert(nn.Module):
    """An assertion on a size that may vary is kept: the optimised model raises where the original does."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        torch._assert(y.shape[-1] == 10, "width must be 10")
        return self.bn(y)


def test_an_assertion_on_a_varying_size_is_kept():
    model = _model(SizeAssert())
    gm, _ = fxrebirth.optimize(model, torch.randn(2, 3, 12, 12))
    assert count_kind(gm, "batch_norm") == 0
    assert_equivalent(model, gm, torch.randn(3, 3, 12, 12))
    for m in (model, gm):
        with pytest.raises(AssertionError, match="width must be 10"):
            m(torch.randn(2, 3, 13, 13))


class DtypeCast(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y).to(y.dtype) + torch.ones(1, device=y.device, dtype=y.dtype) * y.is_floating_point()


def test_dtype_and_device_queries_fold():
    model = _model(DtypeCast())
    x = torch.randn(2, 3, 8, 8)
    gm, _ = fxrebirth.optimize(model, x)
    assert count_kind(gm, "batch_norm") == 0 and not _queries(gm)
    assert_equivalent(model, gm, x)


@pytest.mark.parametrize("entry", ["export", "backend"])
def test_every_entry_point_folds_through_rank_asserts(entry, reset_dynamo):
    model = _model(ConvNormAct(3, 8), ConvNormAct(8, 8))
    x = torch.randn(2, 3, 12, 12)
    if entry == "export":
        from fxrebirth.frontends.export import optimize_exported

        program, report = optimize_exported(torch.export.export(model, (x,)))
        optimized = program.module()
        assert not any("batch_norm" in str(n.target) for n in program.graph.nodes)
    else:
        optimized = torch.compile(model, backend="fxrebirth", options={"compiler": "eager"})
    with torch.no_grad():
        assert_equivalent(model, optimized, x)
