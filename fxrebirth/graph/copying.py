"""Copying the user's model: capture and every later stage work on a copy, never on the model itself."""

from __future__ import annotations

import copy
import threading
from typing import Any

import torch
from torch import nn

from fxrebirth.errors import CaptureError, first_line

__all__ = ["copy_module"]


_SHARED_TYPES = (type(threading.Lock()), type(threading.RLock()), threading.Condition, threading.Event,
                 threading.Semaphore, threading.Barrier)
"""Attributes the copy shares with the model instead of copying: synchronisation objects hold no model
state, exist to be shared, and cannot be deep-copied."""


def copy_module(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``, in the same training/eval mode module by module. Tensors that are not graph
    leaves, which ``copy.deepcopy`` refuses (the old-style ``weight_norm`` keeps its computed ``weight`` as
    one, recomputed by a pre-hook at every call), are copied detached; locks and other synchronisation
    objects are shared. Any other attribute that cannot be copied (an open file) is a
    :class:`CaptureError` naming it."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
            elif isinstance(value, _SHARED_TYPES):
                memo[id(value)] = value
    try:
        copied = copy.deepcopy(model, memo)
    except Exception as exc:  # noqa: BLE001 - pickling errors from user attributes
        raise CaptureError(_uncopyable(model, memo, exc)) from None
    _same_modes(model, copied)
    return copied


def _uncopyable(model: nn.Module, memo: dict[int, Any], exc: Exception) -> str:
    """The message for a model that cannot be deep-copied, naming the first attribute that cannot be."""
    culprit = "an attribute"
    for path, module in model.named_modules():
        for name, value in vars(module).items():
            if name in ("_parameters", "_buffers", "_modules") or isinstance(value, (torch.Tensor, nn.Module)):
                continue
            try:
                copy.deepcopy(value, dict(memo))
            except Exception:  # noqa: BLE001
                culprit = f"attribute '{path + '.' if path else ''}{name}' ({type(value).__name__})"
                break
        else:
            continue
        break
    return (f"cannot copy the model: {culprit} cannot be deep-copied ({type(exc).__name__}: {first_line(exc)}). "
            "fxrebirth works on a copy and never changes your model: set that attribute to None (or move it out "
            "of the model) before optimizing, or give its class a __deepcopy__.")


def _same_modes(model: nn.Module, copied: nn.Module) -> None:
    """Put every module of ``copied`` in its original's training/eval mode. ``copy.deepcopy`` of a
    ``torch.fx.GraphModule`` rebuilds it through ``__init__``, and torchvision's ``DualGraphModule``
    (``create_feature_extractor``) starts in training mode there; its ``train()`` also swaps its graph,
    so the mode is set through ``train()`` (outermost first), not by the flag alone."""
    copies = dict(copied.named_modules(remove_duplicate=False))
    for name, module in model.named_modules(remove_duplicate=False):
        twin = copies.get(name)
        if twin is not None and twin.training != module.training:
            twin.train(module.training)
