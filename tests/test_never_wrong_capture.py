"""Never silently wrong at capture (issue 37): what a traced graph does not show (backward hooks, grad-mode
and autocast regions), real-code idioms (size checks, flag arguments, optional inputs), and the crashes and
unclear errors of ``optimize()`` around capture (threads, inference mode, uncopyable attributes, SIGALRM,
an empty batch, torchvision feature extractors)."""

from __future__ import annotations

import signal
import tempfile
import threading

import pytest
import torch
from torch import nn

import fxrebirth
from fxrebirth import CaptureError, capture

X = torch.randn(2, 3, 8, 8)


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    return net.eval()


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- 1. backward hooks


def _hooked_grads(model: nn.Module, module: str, register: str) -> tuple[list, list]:
    """The grads a backward hook on ``model.<module>`` sees on the original and on the optimised model."""
    seen: list[torch.Tensor] = []

    def hook(mod, *grads):
        seen.append(tuple(g.clone() for g in grads[-1] if g is not None))

    getattr(model.get_submodule(module), register)(hook)
    out = []
    for frozen in (False, True):
        gm, _ = fxrebirth.optimize(model, X, frozen=frozen)
        for net in (model, gm):
            seen.clear()
            x = X.clone().requires_grad_()
            net(x).square().sum().backward()
            out.append(list(seen))
    return out[0], out[1:]


@pytest.mark.parametrize("register", ["register_full_backward_hook", "register_full_backward_pre_hook",
                                      "register_backward_hook"])
@pytest.mark.parametrize("module", ["1"])
def test_backward_hooks_fire_with_the_same_grads(register, module):
    original, optimised = _hooked_grads(_net(), module, register)
    assert original, "the hook fired on the original"
    for seen in optimised:
        assert len(seen) == len(original)
        for a, b in zip(seen, original):
            for ga, gb in zip(a, b):
                torch.testing.assert_close(ga, gb)


def test_backward_hook_on_the_root_is_kept():
    net, seen = _net(), []
    net.register_full_backward_hook(lambda mod, gi, go: seen.append(go[0].clone()))
    gm, _ = fxrebirth.optimize(net, X, frozen=False)
    seen.clear()  # the whole-model check may have run backward through both
    net(X.clone().requires_grad_()).sum().backward()
    gm(X.clone().requires_grad_()).sum().backward()
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], seen[1])


@pytest.mark.parametrize("register", ["register_module_full_backward_hook", "register_module_full_backward_pre_hook"])
def test_global_backward_hooks_are_refused(register):
    handle = getattr(torch.nn.modules.module, register)(lambda *a: None)
    try:
        with pytest.raises(CaptureError, match="global module backward hooks"):
            capture(_net(), X)
    finally:
        handle.remove()
    capture(_net(), X)


# ---------------------------------------------------------------- 2. grad-mode and autocast regions


class _Frozen(nn.Module):
    """A frozen backbone: its features are computed without gradients."""

    def __init__(self):
        super().__init__()
        self.backbone = _net()

    def forward(self, x):
        with torch.no_grad():
            return self.backbone(x)


class _FrozenByDecorator(_Frozen):
    @torch.no_grad()
    def forward(self, x):
        return self.backbone(x)


class _FrozenBySwitch(_Frozen):
    train_backbone = False

    def forward(self, x):
        with torch.set_grad_enabled(self.train_backbone):
            return self.backbone(x)


class _Head(nn.Module):
    def __init__(self, features: nn.Module):
        super().__init__()
        self.features = features
        self.head = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2).eval())

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("frozen_cls", [_Frozen, _FrozenByDecorator, _FrozenBySwitch])
def test_no_grad_region_in_a_submodule_is_kept(frozen_cls):
    model = _Head(frozen_cls()).eval()
    gm, report = fxrebirth.optimize(model, X, frozen=False)
    assert any("kept opaque" in c and frozen_cls.__name__ in c for c in report.checks)
    for net in (model, gm):
        net.zero_grad(set_to_none=True)
        net(X).sum().backward()
    grads = {n: p.grad is not None for n, p in model.named_parameters()}
    assert grads == {n: p.grad is not None for n, p in gm.named_parameters() if n in grads}
    assert not any(v for n, v in grads.items() if "backbone" in n) and grads["head.0.weight"]


def test_enable_grad_region_under_the_callers_no_grad():
    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            with torch.enable_grad():
                return self.conv(x)

    model = _Head(nn.Sequential(Probe(), nn.Conv2d(3, 2, 1))).eval()
    gm, _ = fxrebirth.optimize(model, X, frozen=False)
    with torch.no_grad():
        _same(gm(X), model(X))
        assert gm.get_submodule("features.0")(X).requires_grad and model.features[0](X).requires_grad


@pytest.mark.parametrize("model_cls", [_Frozen, _FrozenByDecorator])
def test_region_in_the_root_is_refused_by_name(model_cls):
    with pytest.raises(CaptureError, match=rf"(?s)'<root>' \({model_cls.__name__}\).*no_grad.*submodule"):
        fxrebirth.optimize(model_cls(), X, frozen=False)


class _Float32(nn.Module):
    """Forces float32 under the caller's autocast."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            return self.fc(x.float())


class _Bf16(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.fc(x).float()


@pytest.mark.parametrize("region", [_Float32, _Bf16])
def test_autocast_region_in_a_submodule_matches_under_the_callers_autocast(region):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), region(), nn.Linear(8, 4)).eval()
    x = torch.randn(4, 8)
    gm, _ = fxrebirth.optimize(model, x)
    for caller in (torch.autocast("cpu", dtype=torch.bfloat16), torch.autocast("cpu", enabled=False)):
        with caller:
            _same(gm(x), model(x))


@pytest.mark.parametrize("region", [_Float32, _Bf16])
def test_autocast_region_in_the_root_is_refused_by_name(region):
    with pytest.raises(CaptureError, match=rf"(?s)'<root>' \({region.__name__}\).*autocast"):
        fxrebirth.optimize(region(), torch.randn(2, 8))


# ---------------------------------------------------------------- 3a. conditions on sizes


class _Checked(nn.Module):
    def __init__(self, check: str):
        super().__init__()
        self.net, self.check = _net(), check

    def forward(self, x):
        if self.check == "width" and x.shape[-1] != 8:
            raise ValueError(f"expected width 8, got {x.shape[-1]}")
        if self.check == "ndim" and x.ndim != 4:
            raise ValueError("expected NCHW")
        if self.check == "assert":
            assert x.shape[1] == 3, "expected RGB"
        if self.check == "odd" and x.size(-1) % 2:
            raise ValueError("even widths only")
        if self.check == "batch" and x.shape[0] == 1:
            return self.net(x)[0]
        return self.net(x)


@pytest.mark.parametrize("check", ["width", "ndim", "assert", "odd"])
def test_size_check_in_forward_is_captured_and_folds(check):
    model = _Checked(check)
    gm, report = fxrebirth.optimize(model, X)
    assert report.rewrites >= 1
    _same(gm(X), model(X))
    y = torch.randn(3, 3, 8, 8)
    _same(gm(y), model(y))


@pytest.mark.parametrize("check, size", [("width", 9), ("odd", 9)])
def test_size_check_guards_the_other_branch(check, size):
    model, other = _Checked(check), torch.randn(2, 3, size, size)
    gm, _ = fxrebirth.optimize(model, X)
    with pytest.raises(ValueError):
        model(other)
    with pytest.raises(AssertionError, match="Optimise again"):
        gm(other)


def test_batch_condition_is_guarded_not_silently_taken():
    model = _Checked("batch")
    x1 = X[:1]
    gm = capture(model, x1)
    _same(gm(x1), model(x1))
    with pytest.raises(AssertionError, match="Optimise again"):
        gm(X)  # the original squeezes only at batch 1


def test_data_dependent_condition_is_still_refused():
    class Gate(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(CaptureError, match="control flow"):
        capture(Gate(), X)
    model = nn.Sequential(_net(), Gate())
    gm = capture(model, X)  # a submodule: kept opaque, runs its own forward
    for x in (X, -X.abs() - 10):
        _same(gm(x), model(x))


# ---------------------------------------------------------------- 3b/c. non-tensor and optional arguments


class _Flags(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _net()

    def forward(self, x, mask=None, embed: bool = False, scale: float = 1.0, mode: str = "a"):
        y = self.net(x)
        if mask is not None:
            y = y * mask
        if embed:
            y = y.mean((2, 3))
        if mode == "b":
            y = y + 1
        return y * scale


def test_flag_arguments_are_traced_as_their_defaults():
    model = _Flags()
    gm, report = fxrebirth.optimize(model, X)
    assert report.rewrites >= 1
    _same(gm(X), model(X))
    for kwargs in ({"embed": True}, {"scale": 2.0}, {"mode": "b"}, {"mask": torch.ones(1)}):
        with pytest.raises(AssertionError, match=f"argument '{next(iter(kwargs))}'"):
            gm(X, **kwargs)
    with pytest.raises(AssertionError, match="argument 'embed'"):
        gm(X, None, True)


def test_flag_arguments_from_the_example():
    model, mask = _Flags(), torch.rand(1, 2, 8, 8)
    gm, _ = fxrebirth.optimize(model, (X, mask, True, 0.5))
    _same(gm(X, mask, True, 0.5), model(X, mask, True, 0.5))
    with pytest.raises(AssertionError, match="argument 'embed'"):
        gm(X, mask, False, 0.5)


def test_optional_tensor_argument_given_in_the_example():
    model, mask = _Flags(), torch.rand(2, 2, 8, 8)
    gm, _ = fxrebirth.optimize(model, (X, mask))
    other = torch.rand(2, 2, 8, 8)
    _same(gm(X, other), model(X, other))


# ---------------------------------------------------------------- 4. crashes around capture


def test_optimize_inside_inference_mode():
    model = _net()
    with torch.inference_mode():
        gm, report = fxrebirth.optimize(model, X)
        out = gm(X)
    assert report.rewrites >= 1
    _same(out.clone(), model(X).detach())


def test_two_threads_trace_at_once():
    from torch.fx._symbolic_trace import is_fx_tracing

    models = [_Flags(), _Checked("width")]
    alone = [fxrebirth.optimize(m, X)[0](X) for m in models]
    call = nn.Module.__call__
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(2):
                results[i] = fxrebirth.optimize(models[i], X)[0](X)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for _ in range(20):  # this thread runs modules while the others trace
        _net()(X)
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        _same(results[i], alone[i])
    assert nn.Module.__call__ is call and not is_fx_tracing()
    _same(fxrebirth.optimize(models[0], X)[0](X), alone[0])


def test_lock_attribute_is_shared_and_a_file_is_named():
    model = _net()
    model.lock = threading.Lock()
    model[1].cv = threading.Condition()
    gm, _ = fxrebirth.optimize(model, X)
    _same(gm(X), model(X))
    with tempfile.TemporaryFile() as handle:
        model[1].log = handle
        with pytest.raises(CaptureError, match=r"attribute '1\.log' \(BufferedRandom\).*None"):
            fxrebirth.optimize(model, X)


def test_callers_alarm_survives():
    model = _Checked("assert")
    fired: list[int] = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    signal.setitimer(signal.ITIMER_REAL, 60)
    try:
        fxrebirth.optimize(model, X)
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 0 < left <= 60 and signal.getsignal(signal.SIGALRM) is not signal.SIG_DFL
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_zero_batch():
    model = _net()
    empty = torch.randn(0, 3, 8, 8)
    gm, report = fxrebirth.optimize(model, empty)
    assert gm(empty).shape == (0, 2, 8, 8)
    _same(gm(X), model(X))


def test_feature_extractor_keeps_eval_mode():
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=4).eval()
    extractor = create_feature_extractor(net, {"layer1": "f1", "layer2": "f2"}).eval()
    x = torch.randn(2, 3, 48, 48)
    gm, report = fxrebirth.optimize(extractor, x)
    assert report.rewrites >= 1 and not extractor.training
    for key in ("f1", "f2"):
        _same(gm(x)[key], extractor(x)[key])


def test_copy_keeps_mixed_modes():
    from fxrebirth.graph.copying import copy_module

    model = _Head(_Frozen()).eval()
    model.features.backbone[1].train()
    copied = copy_module(model)
    assert [m.training for m in copied.modules()] == [m.training for m in model.modules()]


class _Reparam(nn.Module):
    """timm's FastViT/MobileOne blocks keep an attribute named ``inference_mode``: not a region."""

    def __init__(self):
        super().__init__()
        self.inference_mode = False
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3).eval()

    def forward(self, x):
        if self.inference_mode:
            return self.conv(x)
        if x.shape[1] != self.conv.in_channels:  # a channel check: static once the conv fixes the channels
            raise ValueError("channels")
        return self.bn(self.conv(x))


def test_attribute_named_like_a_region_is_not_one():
    model = nn.Sequential(_Reparam(), _Reparam()).eval()
    gm, report = fxrebirth.optimize(model, X)
    assert not any("kept opaque" in c for c in report.checks)
    assert report.rewrites >= 2
    assert not any(n.target is torch._assert for n in gm.graph.nodes)  # the channel checks folded
    _same(gm(X), model(X))


@pytest.mark.parametrize("build, shape", [
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4)), (0, 3, 2, 2)),
    (lambda: nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.ReLU()), (0, 3, 9)),
    (_net, (0, 3, 5, 7)),
])
def test_zero_batch_models(build, shape):
    model = build().eval()
    gm, _ = fxrebirth.optimize(model, torch.randn(shape))
    assert gm(torch.randn(shape)).shape == model(torch.randn(shape)).shape
    other = torch.randn((2,) + shape[1:])
    _same(gm(other), model(other))


def test_model_built_inside_inference_mode():
    with torch.inference_mode():
        model = _net()
        gm, report = fxrebirth.optimize(model, X)
        out, expected = gm(X), model(X)
    assert report.rewrites >= 1
    _same(out.clone(), expected.clone())


class _Guarded(nn.Module):
    """An opaque block (a data-dependent branch) that holds a lock, as thread-safe caches do."""

    def __init__(self):
        super().__init__()
        self.conv, self.lock = nn.Conv2d(2, 2, 1), threading.RLock()

    def forward(self, x):
        with self.lock:
            y = self.conv(x)
        return y if y.sum() > -1e9 else -y


def test_lock_inside_an_opaque_block():
    model = nn.Sequential(_net(), _Guarded(), nn.BatchNorm2d(2).eval()).eval()
    gm, report = fxrebirth.optimize(model, X)
    assert any("kept opaque: _Guarded" in c for c in report.checks)
    assert gm.get_submodule("1").lock is model[1].lock
    _same(gm(X), model(X))
