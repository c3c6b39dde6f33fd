"""Submodules that graph capture cannot trace run as opaque custom ops.

Some blocks hold data-dependent Python control flow: HiDream's mixture-of-experts MLP
counts the tokens routed to each expert on the host (`bincount().cpu().numpy()`) and
loops over experts. `torch.export` cannot trace that, so `opaque_capture` retries the
capture with every instance of the failing module's class replaced by one call of the
custom op `tocache::opaque_module`, which runs the module eagerly. The rest of the model
stays one graph for inductor (the op is an extern call, not a graph break).

An opaque module must map one `[..., tokens, channels]` tensor to a tensor of the same
shape. It is token-wise, and so PARTIAL-able (a partial step routes only the selected
tokens through the router and experts), when running it on a subset of the tokens of
the captured call gives those tokens' outputs; `opaque_capture` checks this on the real
inputs. Its FLOPs are measured per token at capture and reported by `explain`.

Example:
    >>> with opaque_modules(block, [MOEFeedForwardSwiGLU], (), kwargs) as found:  # doctest: +SKIP
    ...     exported = torch.export.export(block, (), kwargs, strict=False)
    >>> [m.class_name for m in found.values()]
    ['MOEFeedForwardSwiGLU', 'MOEFeedForwardSwiGLU']
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import types
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import register_flop_formula

from .errors import UnsupportedModelError
from .meta import flop_counter

__all__ = ["OpaqueModule", "opaque_modules", "failing_module", "OPAQUE_OP", "REGISTRY", "CURRENT_UNIT"]


@dataclass(repr=False)
class OpaqueModule:
    """A submodule (by path in the captured unit) that runs eagerly inside the graph."""

    key: str  # "<captured class>/<path>": the op's first argument
    class_name: str
    path: str
    token_wise: bool
    flops_per_token: float


REGISTRY: weakref.WeakValueDictionary[str, OpaqueModule] = weakref.WeakValueDictionary()
"""Every opaque module description by key, read by the FLOP formula and the analyses;
entries live as long as the captured graph that holds them (`CapturedGraph.opaque`)."""

CURRENT_UNIT: contextvars.ContextVar[torch.nn.Module] = contextvars.ContextVar("tocache_unit")
"""The module instance a step graph is running for: opaque paths resolve against it, so
blocks of one class share one graph."""


@torch.library.custom_op("tocache::opaque_module", mutates_args=())
def _opaque_module(key: str, x: torch.Tensor) -> torch.Tensor:
    path = key.split("/", 1)[1]
    with torch.no_grad():
        return CURRENT_UNIT.get().get_submodule(path)(x)


@_opaque_module.register_fake
def _opaque_module_fake(key: str, x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


OPAQUE_OP = torch.ops.tocache.opaque_module.default


@register_flop_formula(torch.ops.tocache.opaque_module)
def _opaque_flops(key: str, x_shape: Sequence[int], *args: Any, **kwargs: Any) -> int:
    return int(REGISTRY[key].flops_per_token * math.prod(x_shape[:-1]))


def failing_module(error: BaseException, model: torch.nn.Module) -> torch.nn.Module | None:
    """The innermost submodule of `model` whose method raised `error`."""
    submodules = {id(m) for m in model.modules() if m is not model}
    found, tb = None, error.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module) and id(owner) in submodules:
            found = owner
        tb = tb.tb_next
    return found


def _record_calls(model: torch.nn.Module, modules: list[torch.nn.Module], args: tuple,
                  kwargs: dict[str, Any]) -> dict[int, tuple[tuple, Any]]:
    """Run `model` once eagerly and keep each module's first (args, output)."""
    calls: dict[int, tuple[tuple, Any]] = {}

    def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        calls.setdefault(id(module), (args, output))

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _describe(module: torch.nn.Module, key: str, path: str,
              call: tuple[tuple, Any] | None) -> OpaqueModule:
    name = type(module).__name__
    if call is None:
        raise UnsupportedModelError(f"{path} ({name}) cannot be captured and was not called "
                                    "in an eager run, so it cannot be made opaque")
    args, output = call
    if len(args) != 1 or not isinstance(args[0], torch.Tensor) or args[0].dim() < 2 or \
            not isinstance(output, torch.Tensor) or output.shape != args[0].shape:
        raise UnsupportedModelError(
            f"{path} ({name}) cannot be captured (data-dependent control flow) and cannot "
            "run as an opaque op: only modules mapping one tensor to a tensor of the same "
            "shape can")
    x = args[0]
    tokens = x.shape[-2]
    subset = torch.arange(tokens - 1, -1, -2, device=x.device)  # every other token, reversed
    with torch.no_grad(), flop_counter() as counter:
        on_subset = module(x.index_select(-2, subset))
    token_wise = tokens > 1 and torch.allclose(on_subset, output.index_select(-2, subset),
                                               rtol=1e-4, atol=1e-5)
    flops = counter.get_total_flops() / math.prod(on_subset.shape[:-1])
    return OpaqueModule(key, name, path, bool(token_wise), flops)


@contextlib.contextmanager
def opaque_modules(unit: torch.nn.Module, classes: Sequence[type], args: tuple,
                   kwargs: dict[str, Any]) -> Iterator[dict[str, OpaqueModule]]:
    """Within the context, instances of `classes` in `unit` call `tocache::opaque_module`."""
    paths = {id(m): path for path, m in unit.named_modules()}
    modules = [m for m in unit.modules() if isinstance(m, tuple(classes))]
    modules = [m for m in modules if not any(  # the outermost instance of nested ones
        other is not m and any(sub is m for sub in other.modules()) for other in modules)]
    calls = _record_calls(unit, modules, args, kwargs) if modules else {}
    found = {}
    for module in modules:
        path = paths[id(module)]
        key = f"{type(unit).__name__}/{path}"
        found[path] = REGISTRY[key] = _describe(module, key, path, calls.get(id(module)))
        module.forward = types.MethodType(
            lambda self, x, key=key: torch.ops.tocache.opaque_module(key, x), module)
    token = CURRENT_UNIT.set(unit)
    try:
        yield found
    finally:
        CURRENT_UNIT.reset(token)
        for module in modules:
            del module.__dict__["forward"]
