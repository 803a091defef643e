"""Cleanup rules: dropout, identity, no-op flatten/reshape."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fxrebirth
from fxrebirth.testing import assert_equivalent, count_kind


class _Head(nn.Module):
    def __init__(self, p: float = 0.5):
        super().__init__()
        self.drop = nn.Dropout(p)
        self.id = nn.Identity()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.flatten(x, 1)  # (N, 8) already: a no-op for every batch size
        x = x.view(x.size(0), -1)  # also a no-op
        x = F.dropout(self.id(self.drop(x)), 0.2, self.training)
        return self.fc(x.reshape(-1, 8))


def test_eval_mode_cleanup_removes_everything_removable():
    model = _Head().eval()
    x = torch.randn(2, 8)
    gm, report = fxrebirth.optimize(model, x)
    assert report.stats("remove_dropout").rewrites == 2
    assert report.stats("remove_identity").rewrites == 1
    assert report.stats("remove_noop_reshape").rewrites == 3
    # only the linear, and the guard of x.reshape(-1, 8): its literal 8 holds where dim 1 is 8
    from fxrebirth.guards import is_guard

    assert [n.op for n in gm.graph.nodes if not is_guard(n)].count("call_function") == 1
    assert len(report.guards) == 1 and "size(dim 1) == 8" in report.guards[0]
    assert_equivalent(model, gm, x)
    for batch in (1, 5):  # the removed reshapes were no-ops for every batch size
        assert_equivalent(model, gm, torch.randn(batch, 8))


def test_training_mode_dropout_is_kept():
    model = _Head().train()
    gm, report = fxrebirth.optimize(model, torch.randn(2, 8))
    assert report.stats("remove_dropout").rewrites == 0
    assert all("training mode" in r.reason for r in report.stats("remove_dropout").refusals)
    assert count_kind(gm, "dropout") == 2


def test_reshape_that_changes_the_shape_is_kept():
    class M(nn.Module):
        def forward(self, x):
            return x.reshape(x.size(0), 4, 2) + x.flatten(0).sum() + x.reshape(2, 8).sum()

    model, x = M(), torch.randn(2, 8)
    gm, report = fxrebirth.optimize(model, x)
    assert report.stats("remove_noop_reshape").rewrites == 0
    assert_equivalent(model, gm, x)


def test_literal_batch_size_is_not_treated_as_noop():
    class M(nn.Module):
        def forward(self, x):
            return x.view(1, 8) * 2

    gm, report = fxrebirth.optimize(M(), torch.randn(1, 8))
    assert report.stats("remove_noop_reshape").rewrites == 0
