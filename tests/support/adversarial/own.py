"""Cases of class ``own``: what fxrebirth's own rules must get right: tied weights, a module used
twice or shared, non-persistent buffers, padding modes, transposed, 1-D and 3-D convs, a BatchNorm in
train mode or without running statistics, conv chains, channel broadcasts, Python scalar attributes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tests.support.adversarial.builders import (NO_COST, AddCase, ConvBN, TwoConvsOneBN, case_generator, conv_bn,
                                                    images, seeded_case)
from tests.support.adversarial.records import Size


class _Tied(nn.Module):
    """Two convs sharing ONE weight Parameter, each followed by its own BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2.weight = self.c1.weight
        self.bn1 = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.cat([self.bn1(self.c1(x)), self.bn2(self.c2(x.flip(-1)))], 1)


class _TiedLinear(nn.Module):
    """A Linear and a conv-free head that reuse the same weight (embedding-style tying) with BN1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = conv_bn()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc2.weight = self.fc1.weight
        self.bn1 = nn.BatchNorm1d(8)

    def forward(self, x):
        y = torch.flatten(self.pool(self.conv(x)), 1)
        return self.fc2(torch.relu(self.bn1(self.fc1(y))))


class _UsedTwice(nn.Module):
    """One conv module used twice, a BN after only one of the uses."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        s = self.stem(x)
        return self.bn(self.conv(s)) + self.conv(torch.relu(s))


class _SharedBN(TwoConvsOneBN):
    """One BN module after two different convs."""

    def forward(self, x):
        return self.bn(self.a(x)) * self.bn(self.b(x))


class _NonPersistent(ConvBN):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 8).reshape(1, 8, 1, 1), persistent=False)
        self.register_buffer("shift", torch.linspace(-1.0, 1.0, 8).reshape(1, 8, 1, 1), persistent=False)
        self.conv2 = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.conv2(self.bn(self.conv(x)) * self.scale + self.shift)


class _LinearBN3d(nn.Module):
    """Linear over the LAST dim of (N, C, L), then BatchNorm1d over dim 1 (C): not Linear's features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x):
        return self.bn(self.fc(x))


def _seq_inputs(batch: int, size: Size) -> tuple:
    return (torch.randn(batch, 16, 16, generator=case_generator(13, batch, size)),)


class _BNTrainState(ConvBN):
    """A BN left in TRAIN mode (statistics updated per call) between two eval convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2 = conv_bn(8, 8)

    def forward(self, x):
        return self.conv2(self.bn(self.conv(x)))


def _bn_train_build() -> nn.Module:
    model = seeded_case(60, _BNTrainState)()
    model.bn.train()
    return model


class _ConvTBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 8, 3, stride=2, padding=1, output_padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.bn(self.up(x))))


class _FoldFollowingPadded(nn.Module):
    """BN before a padded conv (bn_into_following must refuse: padding sees 0, not the shift)."""

    def __init__(self, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, padding_mode=padding_mode)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, padding_mode=padding_mode)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn2(self.conv2(self.conv(self.bn(x))))


class _ConvChainStrided(nn.Module):
    """Two convs in a chain, the first strided (chain merge is exact only under conditions)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.b(self.a(x)))


class _ConvLinearFlatten(nn.Module):
    """conv -> flatten -> linear (merge of a flattened conv into the linear): only the example size
    is valid for the original."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.bn(self.conv(x)), 1))


class _ExpandIdentity(nn.Module):
    """x + conv(x) where x has ONE channel and the conv has 8 (a broadcast in the channel dim)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)) + x


class _ScalarAttr(ConvBN):
    """A plain Python float attribute and a tensor constant created in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = 0.3

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y * self.alpha + torch.ones(1, 8, 1, 1) * 0.1


class _DilatedSum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, dilation=2, padding=2)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.a(x)) + self.b(x) + self.c(x)


def _state_bn(module: nn.Module) -> Any:
    return [module.get_buffer("bn.running_mean").clone(), module.get_buffer("bn.running_var").clone(),
            module.get_buffer("bn.num_batches_tracked").clone()]


def own_cases(add: AddCase) -> None:
    """The ``own`` cases, in catalog order."""
    add("tied_conv_weights", "own", seeded_case(600, _Tied), description="two convs sharing one Parameter, own BN each")
    add("tied_linear_weights", "own", seeded_case(601, _TiedLinear), description="two Linears sharing one weight, BN1d after one")
    add("module_used_twice_bn_once", "own", seeded_case(602, _UsedTwice), description="one conv called twice, BN after one use")
    add("bn_shared_by_two_convs", "own", seeded_case(603, _SharedBN), description="one BN module after two convs")
    add("nonpersistent_buffers", "own", seeded_case(604, _NonPersistent), description="scale/shift buffers, persistent=False")
    add("conv_padding_reflect", "own", seeded_case(605, lambda: _FoldFollowingPadded("reflect")),
        description="BN -> conv(padding_mode='reflect') -> conv -> BN")
    add("conv_padding_circular", "own", seeded_case(606, lambda: _FoldFollowingPadded("circular")),
        description="BN -> conv(padding_mode='circular') -> conv -> BN")
    add("bn_before_zero_padded_conv", "own", seeded_case(607, lambda: _FoldFollowingPadded("zeros")),
        description="BN -> zero-padded conv (fold into following must refuse)")
    add("conv_transpose_bn", "own", seeded_case(608, _ConvTBN), description="ConvTranspose2d(s2, output_padding=1) + BN")
    add("conv1d_bn", "own", seeded_case(609, lambda: nn.Sequential(
        nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.Conv1d(8, 8, 1), nn.BatchNorm1d(8))),
        images(3, 609, dims=1), sizes=(18, 19, 23))
    add("conv3d_bn", "own", seeded_case(610, lambda: nn.Sequential(
        nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 4, 1), nn.BatchNorm3d(4))),
        images(3, 610, dims=3), sizes=(6, 7, 9), example=(2, 6))
    add("linear_bn1d_on_3d_input", "own", seeded_case(611, _LinearBN3d), _seq_inputs, sizes=(16,), example=(2, 16),
        description="Linear over the last dim of (N, C, L), then BatchNorm1d over C (not Linear's features)")
    add("bn_train_mode_state", "own", _bn_train_build, state=_state_bn,
        description="a BN in train mode: its running statistics must update as in the original")
    add("bn_no_running_stats", "own", seeded_case(612, lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, track_running_stats=False), nn.Conv2d(8, 8, 1))),
        description="eval-mode BN without running stats (batch statistics at inference)")
    add("conv_chain_strided", "own", seeded_case(613, _ConvChainStrided), options=NO_COST, sizes=(18, 19, 23, 24),
        description="strided conv -> padded conv chain")
    add("conv_flatten_linear", "own", seeded_case(614, _ConvLinearFlatten), example=(2, 6), sizes=(6,),
        options=NO_COST, description="conv -> BN -> flatten -> Linear (only the example size is valid)")
    add("channel_broadcast_residual", "own", seeded_case(615, _ExpandIdentity), images(1, 615), options=NO_COST,
        description="bn(conv(x)) + x with x of 1 channel (channel broadcast)")
    add("python_scalar_attribute", "own", seeded_case(616, _ScalarAttr), description="y * self.alpha + torch.ones(...) * 0.1")
    add("grouped_then_pointwise", "own", seeded_case(617, lambda: nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1),
        nn.BatchNorm2d(8))), options=NO_COST, description="grouped conv -> BN -> 1x1 conv -> BN chain")
    add("dilated_sum_branches", "own", seeded_case(618, lambda: _DilatedSum()), options=NO_COST,
        description="conv(k3, d2, p2) + conv(k3, p1) + conv(k1): centres on different dilation grids")
