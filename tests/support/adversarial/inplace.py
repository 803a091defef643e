"""Cases of class ``inplace``: in-place ops whose result is or is not reassigned, mutations between a
conv and the BatchNorm that would fold into it, mutations of the model's inputs, of views, of buffers
and parameters inside forward, ``out=`` arguments."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tests.support.adversarial.builders import ConvBN, TwoConvsOneBN, NO_COST, AddCase, seeded_case


class _Unassigned(nn.Module):
    """conv -> an in-place op whose result is NOT reassigned -> conv2 reads the mutated tensor."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        if self.how == "module":
            self.relu(y)
        elif self.how == "relu_":
            y.relu_()
        elif self.how == "add_":
            y.add_(1)
        elif self.how == "torch.relu_":
            torch.relu_(y)
        elif self.how == "F.relu":
            F.relu(y, inplace=True)
        elif self.how == "clamp_":
            y.clamp_(min=-0.1, max=0.2)
        return self.bn(self.conv2(y))


class _MulBetweenConvBN(ConvBN):
    """``y.mul_(2)`` between a conv and the BN that would fold into it (result unassigned or used)."""

    def __init__(self, used: bool) -> None:
        super().__init__()
        self.used = used

    def forward(self, x):
        y = self.conv(x)
        if self.used:
            z = y.mul_(2)
            return self.bn(z)
        y.mul_(2)
        return self.bn(y)


class _UsedThenFold(nn.Module):
    """An in-place op whose result IS used, then conv -> BN that folds; and a read of the conv output
    taken BEFORE the mutation (bn1(y) then y.relu_()): a merge must not move that read past it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pre = nn.Conv2d(8, 8, 1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        before = self.pre(y)          # reads y before the mutation
        z = y.relu_()                 # result used
        return self.bn2(self.conv2(z)) + before


class _SiblingAcrossMutation(nn.Module):
    """Two 1x1 convs of the same tensor, one before and one after it is mutated in place (the sibling
    merge would compute both at one point)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        first = self.a(y)
        y.add_(1.5)
        second = self.b(y)
        return torch.cat([self.bn(first), second], dim=1)


class _SiblingAcrossUsedMutation(_SiblingAcrossMutation):
    """Like :class:`_SiblingAcrossMutation`, but the in-place result is used (so it is not dead code)
    and the second conv reads the mutated tensor by its old name."""

    def forward(self, x):
        y = self.conv(x)
        first = self.a(y)
        z = y.add_(1.5)
        second = self.b(y)
        return torch.cat([self.bn(first), second, z], dim=1)


class _ReadAfterMutation(ConvBN):
    """``z = y.mul_(2)`` then ``bn(y)``: the BN reads y AFTER the mutation (a fold of bn into conv would
    read it before)."""

    def __init__(self, returns_alias: bool = False) -> None:
        super().__init__()
        self.returns_alias = returns_alias

    def forward(self, x):
        y = self.conv(x)
        if self.returns_alias:  # two outputs that are one tensor: both must show the mutation
            return self.bn(y), y, y.relu_()
        z = y.mul_(2)
        return self.bn(y) + z


class _InputIadd(nn.Module):
    """``x += conv(x)`` on the model's own input (the caller's tensor is modified by the original)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        x += y
        return self.conv2(self.bn(x))


class _ReluInplaceOnInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(self.relu(x)))


class _ViewMutation(ConvBN):
    """In place through a view: ``y[:, :2].mul_(0)`` or ``y.view(b, -1).add_(1)``, then BN on y."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def forward(self, x):
        y = self.conv(x)
        if self.how == "slice":
            y[:, :2].mul_(0)
        elif self.how == "view":
            y.view(y.size(0), -1).add_(1)
        elif self.how == "setitem":
            y[:, 0] = 0
        elif self.how == "setitem_tensor":
            y[:, 1:3] = y[:, 5:7] * 2
        return self.bn(y)


class _BufferCounter(ConvBN):
    """A buffer the forward increments in place; the output depends on it (stateful)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.count.add_(1)
        return self.bn(self.conv(x)) * self.count


class _ClampParameter(ConvBN):
    """An in-place clamp of a parameter inside forward (the first call changes it)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(-1.0, 2.0, 8).reshape(1, 8, 1, 1))

    def forward(self, x):
        with torch.no_grad():
            self.scale.clamp_(0.0, 1.0)
        return self.bn(self.conv(x)) * self.scale


class _OutArgument(TwoConvsOneBN):
    """``torch.add(a, b, out=c)`` then BN on c."""

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        c = torch.zeros_like(a)
        torch.add(a, b, out=c)
        return self.bn(c)


class _BasicBlock(nn.Module):
    """torchvision-style BasicBlock: ``out += identity; out = self.relu(out)`` with inplace ReLUs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.stem(x)
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        out = self.relu(out)
        return out


class _DropoutInplace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.drop = nn.Dropout(0.5, inplace=True)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        self.drop(y)            # eval: identity even in place
        return self.conv2(self.bn(self.drop(y)))


def _state_count(module: nn.Module) -> Any:
    return module.get_buffer("count").clone()


def _state_scale(module: nn.Module) -> Any:
    return module.get_parameter("scale").detach().clone()


def inplace_cases(add: AddCase) -> None:
    """The ``inplace`` cases, in catalog order."""
    add("relu_module_inplace_unassigned", "inplace", seeded_case(1, lambda: _Unassigned("module")),
        description="nn.ReLU(inplace=True) called as self.relu(y), result not reassigned, y used")
    add("relu_method_unassigned", "inplace", seeded_case(2, lambda: _Unassigned("relu_")), description="y.relu_()")
    add("add_method_unassigned", "inplace", seeded_case(3, lambda: _Unassigned("add_")), description="y.add_(1)")
    add("torch_relu_unassigned", "inplace", seeded_case(4, lambda: _Unassigned("torch.relu_")),
        description="torch.relu_(y)")
    add("functional_relu_inplace_unassigned", "inplace", seeded_case(5, lambda: _Unassigned("F.relu")),
        description="F.relu(y, inplace=True)")
    add("clamp_method_unassigned", "inplace", seeded_case(6, lambda: _Unassigned("clamp_")),
        description="y.clamp_(min, max), result not reassigned")
    add("mul_between_conv_bn", "inplace", seeded_case(7, lambda: _MulBetweenConvBN(False)),
        description="y.mul_(2) between conv and BN, result not reassigned")
    add("mul_between_conv_bn_used", "inplace", seeded_case(8, lambda: _MulBetweenConvBN(True)),
        description="z = y.mul_(2); bn(z)")
    add("inplace_used_then_fold", "inplace", seeded_case(9, _UsedThenFold),
        description="a read of y before y.relu_() (result used), then conv->BN that folds")
    add("sibling_convs_across_mutation", "inplace", seeded_case(10, _SiblingAcrossMutation), options=NO_COST,
        description="1x1 convs of y before and after y.add_(1.5) (sibling merge candidates)")
    add("sibling_convs_across_used_mutation", "inplace", seeded_case(22, _SiblingAcrossUsedMutation), options=NO_COST,
        description="a(y); z = y.add_(1.5); b(y); cat([bn(a), b, z]): the sibling merge must not move b's read")
    add("bn_reads_after_mutation", "inplace", seeded_case(23, _ReadAfterMutation),
        description="z = y.mul_(2); bn(y) + z: the BN reads the mutated conv output")
    add("outputs_alias_mutated_tensor", "inplace", seeded_case(24, lambda: _ReadAfterMutation(returns_alias=True)),
        description="return bn(y), y, y.relu_(): the second output aliases the mutated tensor")
    add("input_iadd", "inplace", seeded_case(11, _InputIadd),
        description="x += conv(x) on the model's input; the example must stay untouched")
    add("relu_inplace_on_input", "inplace", seeded_case(12, _ReluInplaceOnInput),
        description="nn.ReLU(inplace=True) applied to the model's input")
    add("view_slice_mul_zero", "inplace", seeded_case(13, lambda: _ViewMutation("slice")),
        description="y[:, :2].mul_(0) then BN(y)")
    add("view_add", "inplace", seeded_case(14, lambda: _ViewMutation("view")),
        description="y.view(b, -1).add_(1) then BN(y)")
    add("setitem_zero", "inplace", seeded_case(15, lambda: _ViewMutation("setitem")), description="y[:, 0] = 0")
    add("setitem_tensor", "inplace", seeded_case(16, lambda: _ViewMutation("setitem_tensor")),
        description="y[:, 1:3] = y[:, 5:7] * 2")
    add("buffer_counter", "inplace", seeded_case(17, _BufferCounter), state=_state_count,
        description="self.count.add_(1) in forward; output scaled by it")
    add("parameter_clamp_in_forward", "inplace", seeded_case(18, _ClampParameter), state=_state_scale,
        description="self.scale.clamp_(0, 1) under no_grad inside forward")
    add("out_argument", "inplace", seeded_case(19, _OutArgument), description="torch.add(a, b, out=c); bn(c)")
    add("basicblock_inplace_relu", "inplace", seeded_case(20, _BasicBlock),
        description="out += identity; out = self.relu(out) (inplace ReLU, torchvision BasicBlock)")
    add("dropout_inplace_eval", "inplace", seeded_case(21, _DropoutInplace), description="nn.Dropout(inplace=True) in eval")
