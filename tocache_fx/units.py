"""Capture units: what one call signature of a model turns into before any step runs.

Block capture (the default where the model has repeated blocks, `tocache_fx.blocks`):
one eager probe call records every block call's arguments, blocks with the same class,
fingerprint (`tocache_fx.watch`) and call signature share one captured `Unit`, and the
model's own forward keeps running the glue (embedders, rotary tables, masks, final
layer) eagerly. Whole-model capture: the model is one unit.

Each call site (a block, or the model) is a `Site`: the unit it runs, where its
parameters live, and the global indices of its branches. Branches are found per unit
(`passes/find_branches.py`) and re-indexed globally in call order.

Example:
    >>> prepared = prepare(flux, (), kwargs, capture="blocks")   # doctest: +SKIP
    >>> [site.path for site in prepared.sites][:2], len(prepared.units)
    (['transformer_blocks.0', 'transformer_blocks.1'], 2)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import Node
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import _get_current_dispatch_mode, _pop_mode_temporarily

from tocache_fx.passes.find_branches import Branch, find_branches
from tocache_fx.passes.token_axis import main_stream, token_span

from .blocks import calls_served_by, find_blocks
from .capture import CapturedGraph, StateAccessor, call_signature, capture
from .errors import UnsupportedModelError
from .meta import fake_inputs, flop_counter, graph_flops
from .watch import fingerprint

__all__ = ["Unit", "Site", "Prepared", "prepare", "CaptureMode"]

CaptureMode = Literal["auto", "blocks", "model"]


@dataclass(eq=False)
class Unit:
    """One captured graph and its branches, shared by every site with its fingerprint
    and call signature. `passthrough[j]` is the graph input that output j carries past
    all of the unit's branches (None: some output has no such input)."""

    captured: CapturedGraph
    branches: list[Branch]  # unit-local indices
    fingerprint: tuple
    signature: tuple
    passthrough: list[int] | None
    step_graphs: dict[tuple, Any] = field(default_factory=dict)
    compiled: dict[tuple, Any] = field(default_factory=dict)
    structures: list[Any] = field(default_factory=list)  # call structures seen matching

    @property
    def tokens(self) -> list[int]:
        """Each branch's token count."""
        return [branch.num_tokens for branch in self.branches]


@dataclass(eq=False)
class Site:
    """A call site: `module` (a block, or the whole model) running `unit`."""

    index: int  # call order in the forward
    path: str
    module: torch.nn.Module
    unit: Unit
    first_branch: int  # global index of unit.branches[0]
    accessors: list[StateAccessor]

    @property
    def branch_range(self) -> range:
        return range(self.first_branch, self.first_branch + len(self.unit.branches))

    def state(self) -> list[torch.Tensor]:
        return [accessor.get() for accessor in self.accessors]

    def refresh(self) -> None:
        """Re-resolve where the parameters live (after a submodule was replaced)."""
        self.accessors = self.unit.captured.accessors(self.module)


@dataclass(eq=False)
class Prepared:
    """Everything derived from one call signature of the model."""

    mode: Literal["blocks", "model"]
    signature: tuple
    sites: list[Site]
    branches: list[Branch]  # global: every site's branches, re-indexed, in call order
    grid: tuple[int, int] | None
    device: torch.device
    units: list[Unit]  # the sites' (blocks without branches run as glue, not kept)
    glue_flops: int = 0  # block capture: FLOPs of the eager forward outside the blocks

    @property
    def batch(self) -> int:
        return self.branches[0].skip.meta["val"].shape[0]


def _token_grid(kwargs: dict[str, Any], config: Any, num_tokens: int) -> tuple[int, int] | None:
    """(rows, cols) of the image token grid, from a 4-d latent input and the patch size."""
    patch = getattr(config, "patch_size", None) if config is not None else None
    latent = kwargs.get("hidden_states")
    if not isinstance(patch, int) or not isinstance(latent, torch.Tensor) or latent.dim() != 4:
        return None
    rows, cols = latent.shape[-2] // patch, latent.shape[-1] // patch
    return (rows, cols) if rows * cols == num_tokens else None


def _passthrough(captured: CapturedGraph, branches: list[Branch]) -> list[int] | None:
    """For each output, the graph input it equals with every branch skipped: walk back
    through residual adds (to their skip) and casts of the same shape."""
    gm = captured.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = {node: i for i, node in enumerate(placeholders[captured.num_state:])}
    skips = {branch.add: branch.skip for branch in branches}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    found = []
    for node in output.args[0]:
        shape = node.meta["val"].shape if isinstance(node, Node) else None
        while isinstance(node, Node) and node not in inputs:
            if node in skips:
                node = skips[node]
            elif node.target in _SAME_SHAPE and isinstance(node.args[0], Node) and \
                    node.args[0].meta["val"].shape == shape:
                node = node.args[0]
            else:
                return None
        if node not in inputs or node.meta["val"].shape != shape:
            return None
        found.append(inputs[node])
    return found


aten = torch.ops.aten
_SAME_SHAPE = {aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.contiguous.default,
               aten.alias.default, aten.clamp.default, aten.view.default}


def _find(captured: CapturedGraph, name: str) -> list[Branch]:
    try:
        branches = find_branches(captured.graph_module, name)
    except UnsupportedModelError:
        return []
    _mark_image_spans(captured, branches)
    return branches


def _mark_image_spans(captured: CapturedGraph, branches: list[Branch]) -> None:
    """Where each branch's stream holds the block's image tokens: the tokens of its
    `hidden_states` input (else its first [batch, tokens, channels] input), followed
    through the graph (a single-stream block's joint sequence holds them at an offset)."""
    nodes = list(captured.graph_module.graph.nodes)
    main = main_stream(captured.graph_module)
    if main is None:
        return
    for branch in branches:
        found = token_span(nodes, main, branch.skip)
        if found is not None and found[0] == 1:
            branch.image_span = found[1:]


@dataclass
class _Call:
    path: str
    module: torch.nn.Module
    key: tuple
    args: tuple | None  # kept for the first call of each key only
    kwargs: dict | None


def _probe(model: torch.nn.Module, blocks: list[tuple[str, torch.nn.Module]], args: tuple,
           kwargs: dict[str, Any]) -> tuple[list[_Call], int]:
    """Run the model once and record every block call (keys, and arguments per new key),
    and count the FLOPs of the glue around them.
    A key's fingerprint is taken after the run: hooks that fill state lazily at their first
    call (diffusers' context-parallel split hooks cache argument indices) are seen filled,
    as every later call sees them. Arguments are kept once per (class, fingerprint before
    the call, signature), so the probe holds no more block inputs than it needs."""
    recorded: list[tuple[str, torch.nn.Module, tuple, tuple]] = []
    examples: dict[tuple, tuple[tuple, dict]] = {}
    before: dict[int, tuple] = {}

    def recorder(path: str):
        def hook(module: torch.nn.Module, call_args: tuple, call_kwargs: dict) -> None:
            if id(module) not in before:
                before[id(module)] = fingerprint(module)
            signature = call_signature((call_args, call_kwargs))
            example = (type(module), before[id(module)], signature)
            examples.setdefault(example, (call_args, call_kwargs))
            recorded.append((path, module, signature, example))
        hook._tocache_probe = True
        return hook

    handles = [module.register_forward_pre_hook(recorder(path), with_kwargs=True)
               for path, module in blocks]
    try:
        flops = _run_counting_flops(model, args, kwargs, restart=recorded.clear,
                                    uncounted=[module for _, module in blocks])
    finally:
        for handle in handles:
            handle.remove()
    after = {id(module): fingerprint(module) for _, module in blocks}
    calls: list[_Call] = []
    seen: set[tuple] = set()
    for path, module, signature, example in recorded:
        key = (type(module), after[id(module)], signature)
        call_args, call_kwargs = examples[example] if key not in seen else (None, None)
        seen.add(key)
        calls.append(_Call(path, module, key, call_args, call_kwargs))
    return calls, flops


def _run_counting_flops(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any],
                        restart: Callable[[], None], uncounted: list[torch.nn.Module]) -> int:
    """Run the model once and count the FLOPs of its glue: the `uncounted` modules (the
    blocks, whose FLOPs are counted per step graph) run with the counter's mode popped,
    which saves about half of what counting adds (its module tracker still runs). An op
    the counter cannot run (eager flex attention, a higher-order op with no dispatch-mode
    rule) makes the count fail: the model then runs again uncounted (`restart` called
    first) and 0 is returned. Eager flex attention is kept off its `torch.compile` path while counted: a
    compile failing under the counter's mode would stay cached by Dynamo and break every
    later eager call."""
    from torch.nn.attention import flex_attention

    counter = flop_counter()
    inside_blocks = [0]  # FLOPs counted in a block that another mode kept from popping ours

    def outside_counter(module: torch.nn.Module) -> Callable[..., Any]:
        def call(*call_args: Any, **call_kwargs: Any) -> Any:
            if _get_current_dispatch_mode() is counter.mode:
                with _pop_mode_temporarily():
                    return module._call_impl(*call_args, **call_kwargs)
            before = counter.get_total_flops()
            try:
                return module._call_impl(*call_args, **call_kwargs)
            finally:
                inside_blocks[0] += counter.get_total_flops() - before
        return call

    with torch.no_grad():
        eager_flex = flex_attention._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG
        flex_attention._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = True
        try:
            with calls_served_by([(module, outside_counter(module)) for module in uncounted]), \
                    counter:
                model(*args, **kwargs)
            return counter.get_total_flops() - inside_blocks[0]
        except Exception:  # noqa: BLE001 - a failure of the counter, or of the model itself
            pass
        finally:
            flex_attention._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = eager_flex
        restart()
        model(*args, **kwargs)  # raises the model's own error, if that is what it was
        return 0


def _unit_flops(unit: Unit) -> int:
    """FLOPs of one call of the unit's graph, on fake tensors."""
    gm = unit.captured.graph_module
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    return graph_flops(gm, fake_inputs(gm, mode), mode)


def _sites(units: list[tuple[str, torch.nn.Module, Unit]], reindex_blocks: bool
           ) -> tuple[list[Site], list[Branch]]:
    """Call sites in call order, and their branches indexed globally (with block capture
    the block is the site; a whole-model unit keeps the blocks `find_branches` named)."""
    sites, branches = [], []
    for index, (path, module, unit) in enumerate(units):
        site = Site(index, path, module, unit, len(branches), unit.captured.accessors(module))
        for branch in unit.branches:
            moved = {"index": len(branches)}
            if reindex_blocks:
                moved.update(block=index, block_path=path)
            branches.append(dataclasses.replace(branch, **moved))
        sites.append(site)
    return sites, branches


def prepare(model: torch.nn.Module, probe: tuple[tuple, dict[str, Any]], call: dict[str, Any],
            capture_mode: CaptureMode = "auto") -> Prepared:
    """Capture a call of `model` as units and find their branches: blocks are recorded
    from `model(*probe[0], **probe[1])`, the whole model is captured as `model(**call)`."""
    args, kwargs = probe
    name = type(model).__name__
    tensors = [leaf for leaf in pytree.tree_leaves(call) if isinstance(leaf, torch.Tensor)]
    param = next(model.parameters(), None)
    device = param.device if param is not None else tensors[0].device
    blocks = find_blocks(model) if capture_mode != "model" else []
    if capture_mode == "blocks" and not blocks:
        raise UnsupportedModelError(f"{name} has no repeated blocks (a ModuleList of two or more "
                                    "modules of one class): use capture='model'")
    placed: list[tuple[str, torch.nn.Module, Unit]] = []
    units: dict[tuple, Unit] = {}
    glue_flops = 0
    if blocks:
        calls, glue_flops = _probe(model, blocks, args, kwargs)
        for record in calls:
            if record.key not in units:
                captured = capture(record.module, record.args, record.kwargs,
                                   where=f"{name}.{record.path} ({type(record.module).__name__})")
                found = _find(captured, f"{name}.{record.path}")
                units[record.key] = Unit(captured, found, record.key[1], record.key[2],
                                         _passthrough(captured, found))
            if units[record.key].branches:
                placed.append((record.path, record.module, units[record.key]))
            else:  # runs eagerly, as glue
                glue_flops += _unit_flops(units[record.key])
        if len({id(module) for _, module, _ in placed}) != len(placed):
            raise UnsupportedModelError(f"{name} calls one block more than once per forward; "
                                        "use capture='model'")
    if not placed:
        if capture_mode == "blocks":
            raise UnsupportedModelError(f"{name}: no residual branch found in its blocks "
                                        f"{[path for path, _ in blocks][:4]}")
        captured = capture(model, (), call, where=name)
        found = find_branches(captured.graph_module, name)
        unit = Unit(captured, found, fingerprint(model), call_signature(((), call)), None)
        placed, units = [("", model, unit)], {"model": unit}
        mode = "model"
    else:
        mode = "blocks"
    sites, branches = _sites(placed, reindex_blocks=mode == "blocks")
    skip = branches[0].skip.meta["val"]
    grid = _token_grid(call, getattr(model, "config", None), skip.shape[1])
    used = list({id(unit): unit for _, _, unit in placed}.values())  # not the glue's
    return Prepared(mode, call_signature(call), sites, branches, grid, device, used,
                    glue_flops if mode == "blocks" else 0)
