"""Notice when a captured module changes, so no captured graph is ever stale.

A captured graph takes the module's parameters, buffers and tensor constants as
inputs, read from the module at every call, so replacing a weight, `.to()` or a new
buffer needs nothing. What a capture *is* specialised on is the module's Python state:
its submodules (a LoRA layer, a replaced `nn.Linear`), their classes and plain
attributes (an attention processor, PEFT's adapter scales and flags, hooks). Two
checks cover it:

* `registrations()`: a counter bumped by global registration hooks whenever any
  module gets a submodule, parameter or buffer assigned (`m.proj = nn.Linear(...)`,
  PEFT's `add_adapter`). Compared at every call: O(1).
* `fingerprint(module)`: the module tree's classes, parameter and buffer shapes and
  dtypes, plain attributes (by value), hooks and the objects it holds (processors),
  with no identities, so two blocks with equal fingerprints share one graph. Checked
  at the first call of every generation and after any registration.

Example:
    >>> before = fingerprint(block)
    >>> block.attn1.set_processor(AttnProcessor())       # doctest: +SKIP
    >>> fingerprint(block) == before
    False
"""

from __future__ import annotations

import enum
import functools
import types
from typing import Any

import torch
from torch.nn.modules import module as torch_module

__all__ = ["registrations", "fingerprint"]

_COUNTER = [0]


def _bump(*_: Any) -> None:
    _COUNTER[0] += 1


torch_module.register_module_module_registration_hook(_bump)
torch_module.register_module_parameter_registration_hook(_bump)
torch_module.register_module_buffer_registration_hook(_bump)


def registrations() -> int:
    """How many submodule / parameter / buffer assignments the process has made."""
    return _COUNTER[0]


# torch.nn.Module bookkeeping: children, parameters and buffers are fingerprinted on
# their own; "training" is refused elsewhere; our own call interception is ignored.
_MACHINERY = frozenset({
    "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "training",
    "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
    "_compiled_call_impl", "_forward_hooks_always_called", "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
})
_HOOKS = ("_forward_hooks", "_forward_pre_hooks")
_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device,
            torch.memory_format, torch.layout, enum.Enum)


def _value(value: Any, depth: int = 0) -> Any:
    """A hashable, identity-free description of an attribute value."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if isinstance(value, torch.nn.Module):
        return ("module", type(value).__qualname__)  # children are described on their own
    if depth > 3:
        return type(value).__qualname__
    if isinstance(value, (tuple, list)):
        return (type(value).__name__,) + tuple(_value(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return ("dict",) + tuple(sorted(((repr(k), _value(v, depth + 1)) for k, v in value.items()),
                                        key=lambda item: item[0]))
    if isinstance(value, (set, frozenset)):
        return ("set",) + tuple(sorted(repr(v) for v in value))
    if isinstance(value, functools.partial):
        return ("partial", _value(value.func, depth + 1),
                tuple(_value(a, depth + 1) for a in value.args))
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return ("function", getattr(value, "__module__", None), value.__qualname__)
    state = getattr(value, "__dict__", None)
    if state is None:
        return type(value).__qualname__
    return (type(value).__module__, type(value).__qualname__) + tuple(
        (name, _value(v, depth + 1)) for name, v in state.items())


def fingerprint(module: torch.nn.Module) -> tuple:
    """Everything a capture of `module` is specialised on, identities excluded."""
    parts = []  # hooks marked `_tocache_probe` (our own, while probing) are left out
    for path, sub in module.named_modules(remove_duplicate=False):
        state = sub.__dict__
        parts.append((
            path, type(sub).__module__, type(sub).__qualname__,
            tuple((name, None if p is None else (tuple(p.shape), p.dtype, p.device))
                  for name, p in sub._parameters.items()),
            tuple((name, None if b is None else (tuple(b.shape), b.dtype, b.device))
                  for name, b in sub._buffers.items()),
            tuple(tuple(_value(h) for h in state[name].values()
                        if not getattr(h, "_tocache_probe", False)) for name in _HOOKS),
            tuple((name, _value(v)) for name, v in state.items()
                  if name not in _MACHINERY and name not in _HOOKS),
        ))
    return tuple(parts)
