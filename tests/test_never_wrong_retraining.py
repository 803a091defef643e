"""Never silently wrong, part 2: the retraining tier, the CLI and the marking passes (issue 37).

Tiny models at 8x8-16x16, one epoch on ~16 images: crashes on normal use (a last batch of one, zero batch, a
bad label late in the data, a binary ``--table``), numeric options checked in one place, ``run --keep`` checked
before anything trains, BatchNorm after an activation, activations other than ReLU, and the same regions
through torch.fx and torch.export.
"""

from __future__ import annotations

import json
import math

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import fxrebirth
from fxrebirth.cli import main
from fxrebirth.graph.capture import capture
from fxrebirth.graph.regions import RegionError
from fxrebirth.measure.bundle import TableMismatch, read_table
from fxrebirth.passes.batchnorm import BatchNormPastPool
from fxrebirth.retraining.data import DataError
from fxrebirth.retraining.planning import mark


def mark_regions(gm):
    """The paper's strategies' candidates, as fxrebirth.plan marks them (without timing)."""
    found = mark(gm, strategies=["streamline", "branch"])
    return found["streamline"] + found["branch"]
from fxrebirth.retraining.train import batch_count, batches, pass_sizes
from fxrebirth.rewrite.validate import OptionError
from fxrebirth.testing.kit import check_rule
from fxrebirth.testing.strategies import batchnorm_modules

FAST = {"epochs": 1.0, "calibration_images": 16, "batch_size": 8, "eval_images": 8}


class Items(Dataset):
    """A plain map-style dataset: no ``labels``/``targets`` attribute, so labels are only seen when drawn."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


class SqueezeHead(nn.Module):
    """conv -> ReLU -> LRN -> max-pool (a streamline region), then a 1x1 convolution on the global pool (its
    output is 1x1: a training BatchNorm there sees one value per channel in a batch of one)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LocalResponseNorm(3)
        self.pool = nn.MaxPool2d(2, 2)
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.norm(torch.relu(self.conv(x))))
        return self.head(F.adaptive_avg_pool2d(x, 1)).flatten(1)


def _data(n: int, classes: int = 4, size: int = 8, seed: int = 0) -> Items:
    g = torch.Generator().manual_seed(seed)
    return Items(torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g))


def _plan(model: nn.Module, size: int = 8) -> fxrebirth.Plan:
    plan = fxrebirth.plan(model, torch.randn(1, 3, size, size), strategies=("streamline", "branch"), rounds=1)
    for r in plan.candidates:
        r.selected = True
    return plan


@pytest.fixture(scope="module")
def squeeze():
    torch.manual_seed(0)
    model = SqueezeHead().eval()
    return model, _plan(model)


# --- crashes on normal use ---------------------------------------------------------------------------------

@pytest.mark.parametrize("images, options", [
    (17, {}),                                 # 17 = 2 x 8 + 1: the pass ends on one image
    (4, {"batch_size": 1}),                   # every batch is one image
    (16, {"epochs": 17 / 16}),                # the second pass holds one image
    (9, {"train_batch_norm": False}),
], ids=["last-batch-of-one", "batch-size-1", "pass-of-one", "no-training-bn"])
def test_a_batch_of_one_image_trains_and_gives_a_finite_model(squeeze, images, options):
    model, plan = squeeze
    reborn, report = fxrebirth.rebirth(model, plan, _data(images), **{**FAST, **options})
    assert report.trained_images >= images
    assert torch.isfinite(reborn(torch.randn(3, 3, 8, 8))).all()


@pytest.mark.parametrize("images, batch_size", [(17, 8), (9, 8), (1, 8), (5, 1), (16, 8), (33, 16), (2, 1)])
def test_no_pass_ends_on_a_batch_of_one_and_batch_count_agrees(images, batch_size):
    sizes = pass_sizes(images, batch_size)
    assert sum(sizes) == images
    assert all(s <= batch_size + 1 for s in sizes)
    assert batch_size == 1 or images == 1 or 1 not in sizes
    data = _data(images)  # the DataLoader path (no .tensors())
    drawn = [len(x) for x, _ in batches(data, batch_size, seed=3, images=2 * images + 1)]
    assert sum(drawn) == 2 * images + 1 and len(drawn) == batch_count(images, batch_size, 2 * images + 1)


@pytest.mark.parametrize("label", [4, 7, -1], ids=["equal-to-classes", "above", "negative"])
def test_a_bad_label_late_in_the_data_names_the_item_and_the_class_count(squeeze, label):
    model, plan = squeeze
    data = _data(17)
    data.y = data.y.clone()
    data.y[15] = label
    with pytest.raises(DataError, match=rf"train_data: item 15 has label {label}, out of range .* 4 classes"):
        fxrebirth.rebirth(model, plan, data, **FAST)


def test_a_bad_test_label_is_named_too(squeeze):
    model, plan = squeeze
    test = _data(9, seed=1)
    test.y = test.y.clone()
    test.y[6] = 9
    with pytest.raises(DataError, match="test_data: item 6 has label 9"):
        fxrebirth.rebirth(model, plan, _data(16), test_data=test, **{**FAST, "epochs": 0.5})


def test_zero_batch_examples_are_refused_before_capture(squeeze):
    model, _ = squeeze
    with pytest.raises(RegionError, match="batch 0"):
        fxrebirth.plan(model, torch.randn(0, 3, 8, 8), strategies=("streamline", "branch"), rounds=1)
    with pytest.raises(RegionError, match="batch 0"):
        fxrebirth.plan(model, torch.randn(0, 3, 8, 8), calibration=torch.randn(4, 3, 8, 8))
    with pytest.raises(RegionError, match="calibration"):
        fxrebirth.plan(model, torch.randn(1, 3, 8, 8), strategies="depth", calibration=torch.randn(0, 3, 8, 8))
    with pytest.raises(DataError, match="empty"):
        fxrebirth.rebirth(model, _plan(model), _data(0), **FAST)
    with pytest.raises(RegionError, match="latency_input: the example input has batch 0"):
        fxrebirth.rebirth(model, _plan(model), _data(16), latency_input=torch.randn(0, 3, 8, 8), **FAST)


def test_a_binary_or_malformed_table_is_a_one_line_error(tmp_path, capsys):
    binary = tmp_path / "some.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    assert main(["plan", "googlenet_lrn", "--input-size", "32", "--table", str(binary)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be read as JSON" in err and "Traceback" not in err
    for text, message in (("[1, 2]", "JSON object"), ('{"format": "fxrebirth-latency-table/1"', "cannot be read")):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(TableMismatch, match=message):
            read_table(str(bad), "regions", {}, (1, 3, 8, 8))
    from fxrebirth.measure import devicetimer

    with pytest.raises(TableMismatch, match="missing or malformed"):
        read_table({"format": devicetimer.TABLE_FORMAT, "planner": "regions", "whole": {}}, "regions", {}, (1, 3, 8, 8))


# --- numeric options: one place, one line ----------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [
    ("target_speedup", math.nan), ("target_speedup", -1.0), ("target_speedup", 0), ("target_speedup", math.inf),
    ("budget_s", -1.0), ("budget_s", math.nan), ("rounds", 0), ("rounds", 2.5), ("rounds", True),
    ("reduce_ratio", 0.0), ("reduce_ratio", math.nan), ("reduce_ratio", 1.5),
])
def test_plan_refuses_each_bad_number_naming_the_option_and_its_range(squeeze, option, value):
    model, _ = squeeze
    with pytest.raises(OptionError, match=rf"^plan: {option}=.* give (a|a whole) number"):
        fxrebirth.plan(model, torch.randn(1, 3, 8, 8), **{"rounds": 1, option: value})


@pytest.mark.parametrize("option, value", [
    ("lr", math.nan), ("epochs", math.nan), ("kd_weight", math.nan), ("kd_weight", 1.5), ("temperature", 0),
    ("temperature", -2.0), ("batch_size", 0), ("batch_size", 4.0), ("layerwise_lr", math.inf), ("warmup", 1.0),
    ("ridge", -1e-3), ("eval_images", -1), ("seed", 0.5), ("new_layer_lr_mult", 0), ("feature_weight", math.nan),
    ("calibration_images", 2.5),
])
def test_rebirth_refuses_each_bad_number_before_anything_runs(squeeze, option, value):
    model, plan = squeeze
    with pytest.raises(OptionError, match=rf"^rebirth: {option}="):
        fxrebirth.rebirth(model, plan, None, **{option: value})  # no data needed: refused first
    with pytest.raises(OptionError, match=option):
        fxrebirth.RebirthConfig(**{option: value})


def test_rebirth_flags_and_plan_depth_numbers_are_checked_too(squeeze):
    model, _ = squeeze
    with pytest.raises(fxrebirth.FxRebirthError, match="train_batch_norm"):
        fxrebirth.RebirthConfig(train_batch_norm="no")
    for option, value in (("max_convs", 0), ("rounds", 0), ("target_speedup", math.nan), ("budget_s", -1.0)):
        with pytest.raises(OptionError, match=rf"^plan: {option}="):
            fxrebirth.plan(model, torch.randn(1, 3, 8, 8), strategies="depth", calibration=torch.randn(2, 3, 8, 8),
                           **{option: value})


def test_a_typo_in_run_keep_is_reported_before_the_teacher_trains(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["-q", "run", "googlenet_lrn", "--keep", "streamline:conv9", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "keep 'streamline:conv9'" in err and "streamline:conv1.conv" in err
    assert not out.exists()  # refused before the run made its folder, let alone trained


# --- idioms: BatchNorm after an activation ---------------------------------------------------------------------

@st.composite
def _relu_bn_pool(draw):
    channels = draw(st.integers(1, 4))
    bn = draw(batchnorm_modules(channels))
    if draw(st.booleans()):
        pool = nn.MaxPool2d(draw(st.integers(1, 3)), draw(st.integers(1, 2)), ceil_mode=draw(st.booleans()))
    else:
        k = draw(st.integers(1, 3))
        pool = nn.AvgPool2d(k, draw(st.integers(1, 2)), padding=draw(st.integers(0, k // 2)),
                            ceil_mode=draw(st.booleans()), count_include_pad=draw(st.booleans()))
    model = nn.Sequential(nn.Conv2d(2, channels, 3, padding=1), draw(st.sampled_from([nn.ReLU(), nn.SiLU()])), bn,
                          pool)
    return model.eval(), torch.randn(2, 2, draw(st.integers(5, 9)), draw(st.integers(5, 9)))


def _commutes(model: nn.Sequential, x: torch.Tensor) -> int:
    bn, pool = model[2], model[3]
    scale = (bn.weight if bn.affine else torch.ones_like(bn.running_mean)) / torch.sqrt(bn.running_var + bn.eps)
    if isinstance(pool, nn.MaxPool2d):
        return int(bool((scale > 0).all()))
    return int(pool.padding == 0 and not pool.ceil_mode)


def test_bn_past_pool_is_exact_where_it_rewrites_and_refuses_elsewhere():
    check_rule(BatchNormPastPool(), _relu_bn_pool(), expected_rewrites=_commutes, max_examples=30)


def _randomized(bn: nn.BatchNorm2d, positive: bool = True) -> nn.BatchNorm2d:
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
        bn.weight.uniform_(0.5, 1.5) if positive else bn.weight.uniform_(-1.5, -0.5)
    return bn.eval()


@pytest.mark.parametrize("tail, folded, reason", [
    (lambda: [nn.MaxPool2d(2), nn.Conv2d(8, 4, 1)], True, None),
    (lambda: [nn.MaxPool2d(2), nn.Conv2d(8, 4, 3)], True, None),
    (lambda: [nn.AvgPool2d(2), nn.Conv2d(8, 4, 1)], True, None),
    (lambda: [nn.MaxPool2d(2), nn.Conv2d(8, 4, 3, padding=1)], False, "zero-pads"),
    (lambda: [nn.Conv2d(8, 4, 3, padding=1)], False, "zero-pads"),
], ids=["max-1x1", "max-3x3", "avg-1x1", "max-padded-conv", "padded-conv"])
def test_batchnorm_after_relu_is_folded_or_refused_with_its_reason(tail, folded, reason):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), _randomized(nn.BatchNorm2d(8)),
                          *tail()).eval()
    x = torch.randn(2, 3, 12, 12)
    gm, report = fxrebirth.optimize(model, x)
    left = [n for n in gm.graph.nodes if "batch_norm" in str(n.target)]
    assert (not left) == folded
    if reason:
        assert any(reason in r.reason for r in report.stats("bn_into_following").refusals)
    assert torch.allclose(gm(x), model(x), atol=1e-5)


def test_a_negative_batchnorm_scale_before_a_max_pool_is_refused_with_its_reason():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), _randomized(nn.BatchNorm2d(8), positive=False),
                          nn.MaxPool2d(2), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 12, 12)
    gm, report = fxrebirth.optimize(model, x)
    assert any("scale <= 0" in r.reason for r in report.stats("bn_past_pool").refusals)
    assert torch.allclose(gm(x), model(x), atol=1e-5)


# --- idioms: any element-wise activation in a region --------------------------------------------------------------

ACTIVATIONS = {
    "prelu": lambda: nn.PReLU(8), "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1), "gelu": nn.GELU, "elu": nn.ELU, "relu_inplace": lambda: nn.ReLU(True),
}


class _Functional(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("make", list(ACTIVATIONS.values()) + [lambda: _Functional(F.silu),
                                                                lambda: _Functional(F.hardswish)],
                         ids=list(ACTIVATIONS) + ["F.silu", "F.hardswish"])
@pytest.mark.parametrize("capture_with", ["fx", "export"])
def test_a_streamline_region_is_marked_whatever_the_activation(make, capture_with):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), make(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 12, 12)
    source = model if capture_with == "fx" else torch.export.export(model, (x,)).module()
    gm = capture(source, x)
    (region,) = mark_regions(gm)
    assert region.kind == "streamline" and len(region.nodes) == 4  # conv, BN, the activation, the pool
    assert region.proposal.relu and region.proposal.stride == [2, 2]


class _Block(nn.Module):
    """An inception block whose branches use ``act``."""

    def __init__(self, act) -> None:
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(8, 4, 1), act())
        self.b2 = nn.Sequential(nn.Conv2d(8, 2, 1), act(), nn.Conv2d(2, 4, 3, padding=1), act())
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(8, 4, 1), act())

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x)], 1)


@pytest.mark.parametrize("act", [nn.SiLU, nn.Hardswish, lambda: nn.LeakyReLU(0.2), nn.ReLU])
def test_an_inception_region_is_marked_whatever_the_activation(act):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), _Block(act)).eval()
    regions = mark_regions(capture(model, torch.randn(1, 3, 8, 8)))
    (branch,) = [r for r in regions if r.kind == "branch"]
    assert [layer.relu for b in branch.proposal.branches for layer in b.layers] == [True, True, True]


# --- the same regions through torch.fx and torch.export ---------------------------------------------------------

def _regions(model: nn.Module, x: torch.Tensor, how: str) -> list:
    if how == "export":
        model = torch.export.export(model, (x,)).module()
    elif how == "decomposed":
        model = torch.export.export(model, (x,)).run_decompositions().module()
    regions = mark_regions(capture(model, x, variants=False))  # what plan() marks, without timing it
    # module names ("source", "absorbs") are the fx capture's; an exported program names nodes only
    return [(r.kind, len(r.replaces), _geometry(r.proposal.to_dict())) for r in regions]


def _geometry(data):
    if isinstance(data, dict):
        return {k: _geometry(v) for k, v in data.items() if k not in ("source", "absorbs")}
    return [_geometry(v) for v in data] if isinstance(data, list) else data


@pytest.mark.parametrize("how", ["decomposed"])  # aten.convolution, max_pool2d_with_indices + getitem, aten.relu
def test_a_small_resnet_has_the_same_regions_through_fx_and_export(how):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.randn(1, 3, 32, 32)
    fx_regions = _regions(model, x, "fx")
    assert fx_regions and fx_regions == _regions(model, x, how)


@pytest.mark.parametrize("how", ["export", "decomposed"])
def test_googlenet_lrn_has_the_same_regions_through_fx_and_export(how):
    from fxrebirth.paper.models import googlenet_lrn

    torch.manual_seed(0)
    model = googlenet_lrn(num_classes=4, width=0.25).eval()
    x = torch.randn(1, 3, 32, 32)
    fx_regions = _regions(model, x, "fx")
    assert len(fx_regions) == 11 and fx_regions == _regions(model, x, how)
