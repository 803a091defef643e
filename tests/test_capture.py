"""Capture: the canonical form, its metadata, clear errors, and the user's model left untouched."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from torch import nn

import fxrebirth
from fxrebirth import CaptureError, capture
from fxrebirth.graph.ops import kind_of
from fxrebirth.testing import assert_equivalent
from fxrebirth.graph.tracing import OPAQUE_KEY


class _Positional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.w, None, 1, 1)


class _Keywords(_Positional):
    def forward(self, x):
        return F.conv2d(input=x, weight=self.w, padding=(1, 1))


class _Module(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("cls", [_Positional, _Keywords, _Module])
def test_every_spelling_of_a_conv_becomes_the_same_canonical_call(cls):
    gm = capture(cls(), torch.randn(1, 3, 8, 8))
    (conv,) = [n for n in gm.graph.nodes if kind_of(n) == "conv"]
    assert conv.target is F.conv2d and conv.args == ()
    kwargs = dict(conv.kwargs)
    assert kwargs.pop("input").op == "placeholder"
    assert kwargs.pop("weight").op == "get_attr"
    assert kwargs == {"bias": None, "stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1}


def test_every_node_has_shape_metadata_and_parameters_are_copies():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(2, 3, 6, 6)
    model(x)  # materialise the lazy layer
    model.eval()
    gm = capture(model, x)
    for node in gm.graph.nodes:
        if node.op != "output":
            assert "tensor_meta" in node.meta, node.name
    assert gm.graph.find_nodes(op="call_module") == []
    ours = {id(p) for p in gm.parameters()}
    assert ours.isdisjoint(id(p) for p in model.parameters())
    assert all(isinstance(p, nn.Parameter) for p in gm.parameters())
    assert_equivalent(model, gm, x)


def test_method_and_function_arithmetic_become_operators():
    class M(nn.Module):
        def forward(self, x):
            return torch.mul(x.add(1.0), 2.0).div(3.0).flatten(1)

    gm = capture(M(), torch.randn(2, 3, 4))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    import operator

    assert targets == [operator.add, operator.mul, operator.truediv, torch.flatten]


class _DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.gate = _DataDependent()

    def forward(self, x):
        return self.gate(self.conv(x))


def test_an_untraceable_submodule_is_kept_opaque_and_reported():
    model, x = _Net().eval(), torch.randn(2, 3, 4, 4)
    gm = capture(model, x)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["gate"]
    (note,) = gm.meta[OPAQUE_KEY]
    assert "_DataDependent (first at 'gate')" in note and "never rewritten" in note
    for sample in (x, -x, torch.randn(3, 3, 7, 5)):
        assert_equivalent(model, gm, sample)


def test_an_untraceable_root_is_named_with_the_fix():
    with pytest.raises(CaptureError) as info:
        capture(_DataDependent(), torch.randn(1, 3, 4, 4))
    message = str(info.value)
    assert "module '<root>' (_DataDependent)" in message
    assert "leaf_modules=[_DataDependent]" in message
    assert info.value.__traceback__ is not None and info.value.__cause__ is None


class _SamePad(nn.Module):
    """timm's Conv2dSame pattern: the padding computed in Python from the traced size (``max`` of it)."""

    def __init__(self, cin, cout, k, stride):
        super().__init__()
        self.conv, self.k, self.stride = nn.Conv2d(cin, cout, k, stride), k, stride

    def forward(self, x):
        ih, iw = x.shape[-2:]
        pad_h = max((-(-ih // self.stride) - 1) * self.stride + self.k - ih, 0)
        pad_w = max((-(-iw // self.stride) - 1) * self.stride + self.k - iw, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return self.conv(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_same_padding_convs_stay_opaque_and_the_rest_folds(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(_SamePad(3, 8, 3, 2), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), _SamePad(8, 4, 3, 2))
    model = fxrebirth.testing.randomize_batchnorm(model).eval().to(dtype)
    x = torch.randn(2, 3, 9, 9, dtype=dtype)
    gm, report = fxrebirth.optimize(model, x)
    assert any("kept opaque: _SamePad" in c for c in report.checks)
    assert report.stats("bn_into_preceding").rewrites == 1  # the conv's BN; the one after _SamePad stays
    for size in (9, 12, 17):
        assert_equivalent(model, gm, torch.randn(3, 3, size, size, dtype=dtype))


class _WritesInput(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            x.add_(1)
        return x * 2


def test_an_opaque_module_that_writes_its_input_is_never_silently_wrong():
    """The opaque call is taken to be pure; where it is not, the result still matches or is refused."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.gate = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), _WritesInput()

        def forward(self, x):
            y = self.bn(self.conv(x))
            return self.gate(y) + y

    model, x = fxrebirth.testing.randomize_batchnorm(Net()).eval(), torch.randn(2, 3, 4, 4).abs()
    try:
        gm, _ = fxrebirth.optimize(model, x)
    except fxrebirth.EquivalenceError:
        return
    for sample in (x, -x, x + 1):
        assert_equivalent(model, gm, sample)


def test_leaf_modules_make_it_traceable():
    model, x = _Net().eval(), torch.randn(1, 3, 4, 4)
    gm, report = fxrebirth.optimize(model, x, leaf_modules=[_DataDependent])
    assert_equivalent(model, gm, x)


def test_wrong_example_inputs_name_the_module():
    with pytest.raises(CaptureError, match=r"(?s)failed at 'conv' \(node conv2d\).*example_inputs"):
        capture(_Module(), torch.randn(1, 5, 8, 8))


@pytest.mark.parametrize("bad", [nn.Conv2d, "model"])
def test_non_modules_are_rejected(bad):
    with pytest.raises(CaptureError, match="expected a torch.nn.Module"):
        capture(bad, torch.randn(1))


def test_bad_example_inputs_type():
    with pytest.raises(CaptureError, match="example_inputs must be a tensor or a tuple"):
        capture(_Module(), {"x": torch.randn(1, 3, 4, 4)})


def test_inplace_relu_read_elsewhere_becomes_out_of_place_with_later_reads_redirected():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            y = x * 1.0
            z = self.relu(y)
            return y + z  # y was modified in place: the result is 2 * relu(x)

    from fxrebirth.graph.mutation import mutated_input

    model, x = M(), torch.randn(2, 5)
    gm = capture(model, x)
    assert not any(mutated_input(n) is not None for n in gm.graph.nodes)
    assert model.relu.inplace  # the user's module is untouched; capture's copy runs out of place
    assert_equivalent(model, gm, x)


def test_padding_mode_becomes_explicit_pad():
    model = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")
    x = torch.randn(1, 2, 6, 6)
    gm = capture(model, x)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [F.pad, F.conv2d]
    assert_equivalent(model, gm, x)


def test_optimize_never_mutates_the_users_model():
    model = fxrebirth.testing.randomize_batchnorm(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(), nn.Conv2d(4, 2, 1))
    ).eval()
    state = copy.deepcopy(model.state_dict())
    tree = repr(model)
    params = [id(p) for p in model.parameters()]
    gm, _ = fxrebirth.optimize(model, torch.randn(1, 3, 8, 8))
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(1.0)  # training the result must not touch the original either
    assert repr(model) == tree and [id(p) for p in model.parameters()] == params
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_device_and_dtype_are_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).double().eval()
    gm, _ = fxrebirth.optimize(model, torch.randn(1, 3, 5, 5, dtype=torch.float64))
    assert {p.dtype for p in gm.parameters()} == {torch.float64}
    assert {p.device for p in gm.parameters()} == {torch.device("cpu")}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_stays_on_cuda():
    model = fxrebirth.testing.randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).cuda().eval()
    x = torch.randn(1, 3, 8, 8, device="cuda")
    gm, report = fxrebirth.optimize(model, x)
    assert report.stats("bn_into_preceding").rewrites == 1
    assert {p.device.type for p in gm.parameters()} == {"cuda"}
    assert_equivalent(model, gm, x)


def test_a_graph_module_calling_containers_is_traced_into() -> None:
    """A GraphModule whose graph calls an nn.Sequential (as the reborn model calls its rebirth layers) is
    captured with the container's layers as canonical nodes, not as an opaque call."""
    import torch.fx as fx

    root = nn.Module()
    root.seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_module("seq", (x,)))
    gm = fx.GraphModule(root, graph)
    inp = torch.randn(2, 3, 8, 8)
    captured = capture(gm, (inp,))
    assert not any(n.op == "call_module" for n in captured.graph.nodes)
    assert [kind_of(n) for n in captured.graph.nodes if kind_of(n)] == ["conv", "relu"]
    torch.testing.assert_close(captured(inp), gm(inp))


@settings(max_examples=40)
@given(st.lists(st.integers(1, 4), min_size=0, max_size=5), st.randoms(use_true_random=False),
       st.sampled_from(["plain", "permuted", "sliced", "channels_last"]), st.booleans())
def test_tensor_metadata_matches_torch(shape, rng, layout, grad):
    """capture's fast tensor record equals torch.fx's own for any shape, layout and stride."""
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    from fxrebirth.graph.capture import tensor_metadata

    t = torch.randn(*shape) if shape else torch.tensor(1.0)
    if layout == "permuted" and t.dim() > 1:
        order = list(range(t.dim()))
        rng.shuffle(order)
        t = t.permute(*order)
    elif layout == "sliced" and t.dim() > 0:
        t = t[..., ::2]
    elif layout == "channels_last" and t.dim() in (4, 5):
        t = t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    t.requires_grad_(grad)
    assert tensor_metadata(t) == _extract_tensor_metadata(t)


def test_item_assignment_is_a_mutation_that_is_kept():
    import operator

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            y[:, 0] = 0.0
            return y * 2

    model, x = M().eval(), torch.randn(2, 3, 6, 6)
    gm, report = fxrebirth.optimize(model, x)
    assert any(n.target is operator.setitem for n in gm.graph.nodes)
    assert_equivalent(model, gm, x)


def test_a_buffer_the_forward_increments_counts_in_the_result_and_not_in_the_model():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.register_buffer("count", torch.zeros(()))

        def forward(self, x):
            self.count.add_(1)
            return self.conv(x) * self.count

    model, x = Counter().eval(), torch.randn(2, 3, 6, 6)
    gm, _ = fxrebirth.optimize(model, x)
    reference = copy.deepcopy(model)
    for _ in range(3):
        assert_equivalent(reference, gm, x)
    assert model.count.item() == 0 and gm.count.item() == 3 and reference.count.item() == 3


def test_hooks_of_the_root_module_run_around_the_result():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    seen = []
    model.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    model.register_forward_hook(lambda m, args, out: seen.append(out.shape) or out + 1)
    x = torch.randn(2, 3, 6, 6)
    gm, report = fxrebirth.optimize(model, x)
    assert report.stats("bn_into_preceding").rewrites == 1
    seen.clear()
    assert_equivalent(model, gm, x)
    assert len(seen) == 2  # once for the original, once for the result
