"""How :func:`~tests.support.adversarial.run_case` sees that ``optimize`` modified what it must not
touch: snapshots of the user's model (parameters, buffers, state_dict, submodules, hooks, training
flags, plain tensor attributes), of the example inputs and of global torch state, and their diffs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def clone_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(clone_value(v) for v in value)
    if isinstance(value, list):
        return [clone_value(v) for v in value]
    if isinstance(value, dict):
        return {k: clone_value(v) for k, v in value.items()}
    return value


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except Exception:  # noqa: BLE001 - inference tensors have no version counter
        return None


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(torch.equal(a, b) or torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True))
    return bool(torch.equal(a, b))


def _hook_ids(m: nn.Module) -> tuple:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_state_dict_hooks", "_load_state_dict_pre_hooks")
    return tuple(tuple((k, id(v)) for k, v in getattr(m, n, {}).items()) for n in names)


def snapshot_model(model: nn.Module) -> dict[str, Any]:
    snap: dict[str, Any] = {}

    def tensor(key: str, t: torch.Tensor, identity: bool = True) -> None:
        snap[key] = (id(t) if identity else None, t.detach().clone(), _version(t))

    for name, p in model.named_parameters(remove_duplicate=False):
        tensor("parameter " + name, p)
    for name, b in model.named_buffers(remove_duplicate=False):
        if b is not None:
            tensor("buffer " + name, b)
    for name, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, torch.Tensor):
            tensor("state_dict " + name, t)
    for name, m in model.named_modules(remove_duplicate=False):
        snap["module " + (name or "<root>")] = (type(m), id(m), m.training, _hook_ids(m))
        for attr, value in vars(m).items():  # plain tensor attributes (old-style spectral/weight norm)
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                tensor(f"attribute {name or '<root>'}.{attr}", value, identity=False)
    return snap


def global_state() -> dict[str, Any]:
    module = torch.nn.modules.module
    return {
        "grad enabled": torch.is_grad_enabled(),
        "inference mode": torch.is_inference_mode_enabled(),
        "default dtype": torch.get_default_dtype(),
        "global forward hooks": tuple(getattr(module, "_global_forward_hooks", {}).keys()),
        "global forward pre-hooks": tuple(getattr(module, "_global_forward_pre_hooks", {}).keys()),
    }


def diff_model(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    problems = []
    for key in sorted(set(before) | set(after)):
        if key not in after:
            problems.append(f"{key} removed")
        elif key not in before:
            problems.append(f"{key} added")
        else:
            b, a = before[key], after[key]
            if key.startswith("module "):
                if b != a:
                    what = ["type", "identity", "training flag", "hooks"]
                    problems.append(f"{key}: {', '.join(w for w, x, y in zip(what, b, a) if x != y)} changed")
            else:
                if b[0] is not None and b[0] != a[0]:
                    problems.append(f"{key}: replaced by another tensor")
                elif not _same_tensor(b[1], a[1]):
                    problems.append(f"{key}: values changed")
                elif b[2] is not None and a[2] is not None and b[2] != a[2]:
                    problems.append(f"{key}: modified in place (version {b[2]} -> {a[2]})")
    return problems


def flat_tensors(value: Any, prefix: str = "input") -> list[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        return [(prefix, value)]
    if isinstance(value, (list, tuple)):
        return [item for i, v in enumerate(value) for item in flat_tensors(v, f"{prefix}[{i}]")]
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in flat_tensors(v, f"{prefix}[{k!r}]")]
    return []


def snapshot_inputs(inputs: tuple) -> list[tuple[str, torch.Tensor, torch.Tensor, int | None, tuple]]:
    return [(n, t, t.detach().clone(), _version(t), t.stride()) for n, t in flat_tensors(inputs)]


def diff_inputs(snap: list) -> list[str]:
    problems = []
    for name, t, clone, version, stride in snap:
        if not _same_tensor(t.detach(), clone) or t.stride() != stride:
            problems.append(f"example {name} modified")
        elif version is not None and _version(t) is not None and _version(t) != version:
            problems.append(f"example {name} modified in place (version {version} -> {_version(t)})")
    return problems
