"""Find a transformer's repeated blocks from the module tree alone.

A block is a module of an outermost `nn.ModuleList` holding two or more modules of one
class (DiT's `transformer_blocks`, FLUX's double and single stacks, Wan's `blocks`),
or an instance of a class the model lists in diffusers' `_repeated_blocks`; blocks
nested in other blocks are dropped, and a listed class holding other candidates (a token
refiner around its layers) is glue. A block may hold repeated parts of its own (HiDream's
MoE experts). No per-model lists: a model whose forward calls no such block is captured
whole. `calls_served_by` routes a block's calls to another function for a while, its
hooks still run around it.

Example:
    >>> [path for path, _ in find_blocks(flux)]   # doctest: +SKIP
    ['transformer_blocks.0', 'transformer_blocks.1', 'single_transformer_blocks.0', ...]
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["find_blocks", "calls_served_by"]


@contextlib.contextmanager
def calls_served_by(served: list[tuple[torch.nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    """While inside, calling each module runs its function instead of the module's own
    call: `nn.Module.__call__` takes `_compiled_call_impl` (the slot `module.compile()`
    fills) when set, hooks included. What was there before, a user's `.compile()`
    among it, is put back on exit."""
    previous = [module.__dict__.get("_compiled_call_impl") for module, _ in served]
    for module, call in served:
        module.__dict__["_compiled_call_impl"] = call
    try:
        yield
    finally:
        for (module, _), call in zip(served, previous):
            module.__dict__["_compiled_call_impl"] = call


def find_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """`(path, module)` of every repeated block of `model`, in module-tree order."""
    declared = set(getattr(model, "_repeated_blocks", None) or ())
    candidates: dict[int, tuple[str, torch.nn.Module]] = {}
    for path, module in model.named_modules():
        if module is model:
            continue
        if isinstance(module, torch.nn.ModuleList) and len(module) >= 2 and \
                len({type(child) for child in module}) == 1 and \
                not type(module[0]).__module__.startswith("torch."):
            for name, child in module.named_children():
                candidates.setdefault(id(child), (f"{path}.{name}", child))
        elif type(module).__name__ in declared:
            candidates.setdefault(id(module), (path, module))
    inside: set[int] = set()
    for _, block in candidates.values():
        inside.update(id(sub) for sub in block.modules() if sub is not block)
    order = {id(module): i for i, module in enumerate(model.modules())}
    found = [c for key, c in candidates.items() if key not in inside]
    # a declared class that holds other candidates (a token refiner around its layers) is
    # glue; a list's block holding repeated parts of its own (an MoE's experts) is a block
    holders = {id(b) for _, b in found if type(b).__name__ in declared and
               any(id(sub) in candidates and sub is not b for sub in b.modules())}
    return sorted((c for c in found if id(c[1]) not in holders), key=lambda c: order[id(c[1])])
