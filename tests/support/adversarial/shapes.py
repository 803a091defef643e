"""Cases of class ``shapes``: rewrites that are exact at the example's size only (pooling in ceil mode,
summed convs that broadcast at other sizes, literal views and reshapes, adaptive pooling, explicit
padding, batch-0 and batch-1 examples)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.support.adversarial.builders import ConvBN, NO_COST, AddCase, seeded_case, conv_bn


class _ConvPool(ConvBN):
    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = pool
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.pool(self.bn(self.conv(x))))


class _SumBroadcast(nn.Module):
    """conv_a(x) + conv_b(x) with the same stride, equal output sizes at the example, but conv_b's
    output is 1x1 (and broadcasts) at other sizes."""

    def __init__(self, k_a: int, k_b: int, stride: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, k_a, stride=stride)
        self.b = nn.Conv2d(3, 8, k_b, stride=stride)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.a(x)) + self.b(x)


class _SumSamePadding(nn.Module):
    """Summed convs with padding='same' and even kernels (asymmetric implicit padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 4, padding="same")
        self.b = nn.Conv2d(3, 8, 2, padding="same")
        self.c = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.a(x) + self.b(x) + self.c(x)


class _LiteralView(nn.Module):
    """A view whose literal sizes equal the input's shape at the example only."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        if self.how == "view_size0":
            y = y.view(y.size(0), 8, 18, -1)
        elif self.how == "reshape_minus1":
            y = y.reshape(-1, 8, 18, 18)
        elif self.how == "flatten_unflatten":
            y = y.flatten(2).reshape(y.size(0), 8, 18, 18)
        return y * 2.0


class _Head(ConvBN):
    """conv -> BN -> adaptive pool -> view(x.size(0), -1) / flatten -> linear -> BN1d."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        out = 2 if how in ("flatten", "adaptive3") else 1
        if how == "adaptive3":
            out = 3
        self.pool = nn.AdaptiveAvgPool2d(out)
        self.fc = nn.Linear(8 * out * out, 6)
        self.bn1d = nn.BatchNorm1d(6)

    def forward(self, x):
        y = self.pool(self.bn(self.conv(x)))
        if self.how == "view":
            y = y.view(y.size(0), -1)
        else:
            y = torch.flatten(y, 1)
        return self.bn1d(self.fc(y))


class _AdaptiveThenConv(nn.Module):
    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = pool
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv2(self.pool(self.conv(x))))


class _Pad(nn.Module):
    def __init__(self, pad: tuple, mode: str = "constant", value: float | None = None, dilation: int = 1) -> None:
        super().__init__()
        self.pad, self.mode, self.value = pad, mode, value
        self.conv = nn.Conv2d(3, 8, 3, dilation=dilation)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        if self.mode == "constant":
            x = F.pad(x, self.pad, value=0.0 if self.value is None else self.value)
        else:
            x = F.pad(x, self.pad, mode=self.mode)
        return self.bn(self.conv(x))


class _BatchShape(ConvBN):
    """Reads x.shape[0] as a Python number (x.size(0) arithmetic) for a reshape."""

    def forward(self, x):
        y = self.bn(self.conv(x))
        n = x.shape[0]
        return y.reshape(n, 2, 4, y.shape[2], y.shape[3]).sum(1)


def shape_cases(add: AddCase) -> None:
    """The ``shapes`` cases, in catalog order."""
    add("avgpool_ceil_mode", "shapes", seeded_case(200, lambda: _ConvPool(nn.AvgPool2d(2, ceil_mode=True))),
        description="conv + AvgPool2d(2, ceil_mode=True) optimised at 18, checked at 19, 23")
    add("avgpool_ceil_mode_nocost", "shapes", seeded_case(201, lambda: _ConvPool(nn.AvgPool2d(2, ceil_mode=True))),
        options=NO_COST, description="the same with cost_model=None")
    add("avgpool_ceil_pad", "shapes",
        seeded_case(202, lambda: _ConvPool(nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True))), options=NO_COST,
        sizes=(18, 19, 20, 23), description="AvgPool2d(3, 2, padding=1, ceil_mode=True) after conv")
    add("avgpool_exclude_pad", "shapes",
        seeded_case(203, lambda: _ConvPool(nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False))),
        options=NO_COST, description="AvgPool2d(count_include_pad=False) after conv")
    add("avgpool_divisor_override", "shapes",
        seeded_case(204, lambda: _ConvPool(nn.AvgPool2d(2, divisor_override=3))), options=NO_COST,
        description="AvgPool2d(2, divisor_override=3) after conv")
    add("sum_broadcast_1x1_at_other_sizes", "shapes", seeded_case(205, lambda: _SumBroadcast(1, 9, 9)), options=NO_COST,
        sizes=(18, 12, 16, 19), description="conv(k1,s9) + conv(k9,s9): equal 2x2 at 18, 2x2 + 1x1 broadcast at 12, 16")
    add("sum_broadcast_small", "shapes", seeded_case(206, lambda: _SumBroadcast(1, 3, 3)), options=NO_COST,
        example=(2, 3), sizes=(3, 4, 5, 6), description="conv(k1,s3) + conv(k3,s3): 1x1 each at 3, broadcast at 4, 5")
    add("sum_same_padding_even_kernels", "shapes", seeded_case(207, _SumSamePadding), options=NO_COST,
        description="conv(k4, 'same') + conv(k2, 'same') + conv(k3, p1): asymmetric implicit padding")
    add("view_literal_noop_at_example", "shapes", seeded_case(208, lambda: _LiteralView("view_size0")),
        sizes=(18, (36, 9), (9, 36), (12, 27)), description="y.view(y.size(0), 8, 18, -1): a no-op at 18x18 only")
    add("reshape_literal_batch_minus1", "shapes", seeded_case(209, lambda: _LiteralView("reshape_minus1")),
        example=(1, 18), sizes=(18, (36, 9), (27, 12)), description="y.reshape(-1, 8, 18, 18), batch-1 example")
    add("flatten_reshape_literal", "shapes", seeded_case(210, lambda: _LiteralView("flatten_unflatten")),
        sizes=(18, (36, 9), (6, 54)), description="y.flatten(2).reshape(n, 8, 18, 18)")
    add("view_size0_minus1_head", "shapes", seeded_case(211, lambda: _Head("view")),
        description="adaptive pool(1) -> x.view(x.size(0), -1) -> Linear -> BN1d")
    add("flatten_head", "shapes", seeded_case(212, lambda: _Head("flatten")),
        description="adaptive pool(2) -> flatten -> Linear -> BN1d")
    add("adaptive_avg_pool_3", "shapes", seeded_case(213, lambda: _Head("adaptive3")), sizes=(18, 19, 23, 8),
        description="AdaptiveAvgPool2d(3) (window depends on the size) -> flatten -> Linear")
    add("adaptive_pool_then_1x1", "shapes", seeded_case(214, lambda: _AdaptiveThenConv(nn.AdaptiveAvgPool2d((2, 3)))),
        sizes=(18, 19, 23, 7), description="AdaptiveAvgPool2d((2, 3)) between a conv and a 1x1 conv + BN")
    add("adaptive_max_pool", "shapes", seeded_case(215, lambda: _AdaptiveThenConv(nn.AdaptiveMaxPool2d(3))),
        description="AdaptiveMaxPool2d(3) between convs")
    add("global_pool_before_1x1", "shapes", seeded_case(216, lambda: _AdaptiveThenConv(nn.AdaptiveAvgPool2d(1))),
        description="global pooling commuted before a 1x1 conv")
    add("example_batch_1", "shapes", seeded_case(217, lambda: nn.Sequential(conv_bn(), nn.ReLU(), conv_bn(8, 8))),
        example=(1, 18), description="batch-1 example, checked at batch 2")
    add("example_batch_0", "shapes", seeded_case(218, lambda: nn.Sequential(conv_bn(), nn.ReLU(), conv_bn(8, 8))),
        example=(0, 18), description="batch-0 example, checked at batch 2")
    add("batch_from_shape_reshape", "shapes", seeded_case(219, _BatchShape), example=(1, 18),
        description="reshape(x.shape[0], 2, 4, h, w).sum(1) with a batch-1 example")
    add("pad_asymmetric", "shapes", seeded_case(220, lambda: _Pad((0, 1, 0, 1))),
        description="F.pad(x, (0, 1, 0, 1)) then conv (asymmetric zero pad)")
    add("pad_reflect_functional", "shapes", seeded_case(221, lambda: _Pad((1, 1, 1, 1), mode="reflect")),
        description="F.pad(x, 1, mode='reflect') then conv")
    add("pad_nonzero_value", "shapes", seeded_case(222, lambda: _Pad((1, 1, 1, 1), value=1.0)),
        description="F.pad(x, 1, value=1.0) then conv")
    add("pad_negative", "shapes", seeded_case(223, lambda: _Pad((-1, -1, -1, -1))),
        description="F.pad with negative amounts (a crop) then conv")
    add("pad_dilated", "shapes", seeded_case(224, lambda: _Pad((2, 2, 2, 2), dilation=2)),
        description="F.pad(x, 2) then a dilated conv")
