"""Retraining a depth-merged trained model: the BatchNorms that trained with batch statistics end with the
running statistics of the trained weights (recomputed on training images, forward only and counted), not a
momentum average over the last steps' weights (issue 39: a user's ResNet-18 ended below its start)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxrebirth
from fxrebirth.paper.data import Shapes
from fxrebirth.retraining.batchnorm import batch_statistics_nodes, recompute_statistics


def _cbr(i, o, s=1):
    return [nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]


class Small(nn.Module):
    """Six conv-BN-ReLU layers and a linear head: a user's small CNN."""

    def __init__(self, classes=10):
        super().__init__()
        self.body = nn.Sequential(*_cbr(3, 8), *_cbr(8, 16, 2), *_cbr(16, 16), *_cbr(16, 16), *_cbr(16, 32, 2),
                                  *_cbr(32, 32))
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def _trained(data, epochs=2, seed=0):
    """A teacher trained with plain torch (SGD, batch statistics), as a user trains one."""
    torch.manual_seed(seed)
    model = Small()
    x, y = data.tensors()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _plan_after_first_layer(model, data):
    """A depth plan of one segment that leaves ``body.0``/``body.1`` (the first conv and BatchNorm) alone."""
    x = data.tensors()[0]
    plan = fxrebirth.plan(model, torch.randn(1, 3, 16, 16), strategies=["depth"], calibration=x[:32], prune="none",
                          latency_table={})  # roofline costs: no timing
    usable = [c for c in plan.candidates if not any(r.startswith(("body.0", "body.1")) for r in c.region.replaces)]
    best = min(usable, key=lambda c: c.importance)
    for c in plan.candidates:
        c.selected = c is best
    return plan


def test_recompute_statistics_gives_the_average_of_the_batch_statistics_and_restores_the_graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    gm = fxrebirth.capture(model.eval(), torch.randn(2, 3, 8, 8))
    for node in gm.graph.nodes:
        if node.target is F.batch_norm:
            node.kwargs = {**node.kwargs, "training": True}
    gm.recompile()
    nodes = batch_statistics_nodes(gm)
    assert len(nodes) == 2
    extra = nn.BatchNorm2d(3).train()  # a module BatchNorm hooked on (as the training ones) is recomputed too
    gm.register_forward_pre_hook(lambda module, args: [extra(args[0])] and None)
    xs = [torch.randn(6, 3, 8, 8) * 2 + 1 for _ in range(3)]
    seen = recompute_statistics(gm, [extra], xs)
    assert seen == 18
    conv = model[0]
    want = torch.stack([conv(x).mean((0, 2, 3)) for x in xs]).mean(0)
    first = dict(gm.named_buffers())[nodes[0].kwargs["running_mean"].target]
    torch.testing.assert_close(first, want.detach(), rtol=1e-5, atol=1e-5)
    assert all(n.kwargs["momentum"] == 0.1 for n in nodes)  # the graph as it was
    assert extra.momentum == 0.1
    torch.testing.assert_close(extra.running_mean, torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0))


def test_no_batch_statistics_nothing_recomputed():
    gm = fxrebirth.capture(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), torch.randn(2, 3, 8, 8))
    assert recompute_statistics(gm, [], [torch.randn(2, 3, 8, 8)]) == 0


def test_a_depth_rebirth_ends_with_the_statistics_of_its_trained_weights():
    """After a short, hot retraining (Adam at 2e-3 on every weight, a few steps) the first BatchNorm's running mean is the
    mean of its input (the trained first convolution on the training images), not a momentum average of
    the means of the weights it passed through; the forward-only images are counted."""
    data = Shapes("train", 256, 16)
    model = _trained(data)
    plan = _plan_after_first_layer(model, data)
    reborn, report = fxrebirth.rebirth(model, plan, data, epochs=1.0, batch_size=64, finetune_lr=2e-3,
                                       eval_images=0)
    bn = next(n for n in reborn.graph.nodes if n.target is F.batch_norm)
    conv = bn.kwargs["input"]
    assert conv.target is F.conv2d or conv.target is torch.conv2d, conv.format_node()
    buffers, params = dict(reborn.named_buffers()), dict(reborn.named_parameters())
    weight = params.get(conv.kwargs["weight"].target, buffers.get(conv.kwargs["weight"].target))
    x = data.tensors()[0]
    with torch.no_grad():
        want = F.conv2d(x, weight, None, conv.kwargs["stride"], conv.kwargs["padding"]).mean((0, 2, 3))
    got = buffers[bn.kwargs["running_mean"].target]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    end = report.steps[-1]
    assert end.trained_images == 256 and end.calibration_images >= 256  # observed + recomputed, forward only


def test_a_depth_student_fine_tunes_its_trained_weights_at_finetune_lr(monkeypatch):
    """The trained network's own weights train at ``finetune_lr`` (default 2e-4, not ``lr``'s 2e-3) in a plan
    of depth merges, and the value given where one is."""
    data = Shapes("train", 64, 16)
    model = _trained(data, epochs=1)
    plan = _plan_after_first_layer(model, data)
    peaks = []

    class Recording(torch.optim.Adam):
        def __init__(self, groups, *args, **kwargs):
            super().__init__(groups, *args, **kwargs)
            peaks.extend(g["lr"] for g in self.param_groups)

    monkeypatch.setattr(torch.optim, "Adam", Recording)
    fxrebirth.rebirth(model, plan, data, epochs=0.5, batch_size=32, eval_images=0)
    assert peaks == [pytest.approx(2e-4)]
    peaks.clear()
    fxrebirth.rebirth(model, plan, data, epochs=0.5, batch_size=32, eval_images=0, finetune_lr=1e-3)
    assert peaks == [pytest.approx(1e-3)]


def test_finetune_lr_must_be_positive():
    from fxrebirth.errors import FxRebirthError
    from fxrebirth.retraining.config import RebirthConfig

    with pytest.raises(FxRebirthError, match="finetune_lr"):
        RebirthConfig(finetune_lr=0)
