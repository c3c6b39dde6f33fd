"""Capture a diffusers transformer's forward as one flat ATen graph.

`torch.export(strict=False)` traces the whole forward (no graph break; diffusers
models defeat `torch.fx.symbolic_trace`). The result is normalised for rewriting:
parameters stay shared with the model (`get_attr`), runtime guard and metadata
assertion nodes and eval-mode dropouts are removed, and the graph takes the call's tensor leaves as flat
positional inputs and returns the flat outputs.

Example:
    >>> captured = capture(model, {"hidden_states": x, "timestep": t, "class_labels": y})  # doctest: +SKIP
    >>> captured.run(captured.flatten(kwargs))[0].shape
    torch.Size([2, 8, 32, 32])
"""

from __future__ import annotations

import inspect
import operator
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.fx.node import map_arg
from torch.fx.graph import CodeGen
from torch.utils import _pytree as pytree

from .errors import UnsupportedModelError
from .meta import refresh_meta
from .opaque import OpaqueModule, failing_module, opaque_modules

__all__ = ["CapturedGraph", "capture", "call_signature"]

_DROPPED_TARGETS = {torch.ops.aten._assert_tensor_metadata.default}


def call_signature(kwargs: dict[str, Any], model: torch.nn.Module) -> tuple:
    """A hashable key of everything the captured graph is specialised on."""
    leaves, spec = pytree.tree_flatten(kwargs)
    described = tuple(
        ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device) if isinstance(leaf, torch.Tensor)
        else ("const", repr(leaf)) for leaf in leaves)
    param = next(model.parameters(), None)
    weights = (param.dtype, param.device) if param is not None else None
    return (str(spec), described, weights)


@dataclass
class CapturedGraph:
    """A flat graph of one model call signature (see module doc)."""

    graph_module: GraphModule
    tensor_leaves: list[int]  # positions of the graph's inputs among the call's leaves
    output_spec: pytree.TreeSpec
    opaque: dict[int, OpaqueModule]  # submodules run eagerly as `tocache::opaque_module`

    def flatten(self, kwargs: dict[str, Any]) -> list[torch.Tensor]:
        leaves = pytree.tree_leaves(kwargs)
        return [leaves[i] for i in self.tensor_leaves]

    def unflatten(self, outputs: list[torch.Tensor]) -> Any:
        return pytree.tree_unflatten(list(outputs), self.output_spec)


def _accepts_return_dict(model: torch.nn.Module) -> bool:
    return "return_dict" in inspect.signature(model.forward).parameters


_SCALAR_READS = {torch.ops.aten.item.default, torch.ops.aten._local_scalar_dense.default}


def _fold_scalars(gm: GraphModule, inputs: list[torch.Tensor]) -> None:
    """Replace every scalar (shape arithmetic, `.item()` of a tensor that does not
    depend on the inputs, runtime assertions) by its value for these inputs.

    The graph is specialised on the input shapes anyway (one capture per call
    signature). diffusers builds some sizes as tensors (HiDream's `img_sizes`), which
    `torch.export` traces as unbacked integers; folded, the graph has static shapes.
    Reading the value of an input-dependent tensor is data-dependent control flow and
    is refused."""
    tainted: set[Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in tainted for a in node.all_input_nodes):
            tainted.add(node)
        if node.target in _SCALAR_READS and node in tainted:
            raise UnsupportedModelError(
                f"{node.name} reads the value of a tensor computed from the inputs "
                f"{_block_of(node)}: data-dependent control flow outside a module that "
                "could run as an opaque op")
    scalars: dict[Node, Any] = {}

    class _Recorder(torch.fx.Interpreter):
        def run_node(self, node: Node) -> Any:
            result = super().run_node(node)
            if node.op == "call_function" and not isinstance(result, torch.Tensor) and \
                    isinstance(node.meta.get("val"), (int, float, bool, torch.SymInt,
                                                      torch.SymFloat, torch.SymBool)):
                scalars[node] = result
            return result

    with torch.no_grad():
        _Recorder(gm).run(*inputs)
    for node, value in scalars.items():
        for user in list(node.users):
            user.args, user.kwargs = map_arg((user.args, user.kwargs),
                                             lambda n: value if n is node else n)
    for node in gm.graph.nodes:
        node.meta.pop("unbacked_bindings", None)
    for node in reversed(list(gm.graph.nodes)):
        if node in scalars and not node.users or (
                node.target is torch.ops.aten._assert_scalar.default and not node.all_input_nodes):
            gm.graph.erase_node(node)


def _refresh_static_meta(gm: GraphModule) -> None:
    """Recompute shapes; an op whose output shape depends on tensor values (after the
    scalars are folded) cannot be compiled with static shapes."""
    by_name = {node.name: node for node in gm.graph.nodes}
    try:
        refresh_meta(gm)
    except (DynamicOutputShapeException, DataDependentOutputException,
            GuardOnDataDependentSymNode) as error:
        found = re.search(r"While executing %(\w+)", str(error))
        node = by_name.get(found.group(1)) if found else None
        where = f"{node.name} ({node.target}) {_block_of(node)}" if node else "an op"
        raise UnsupportedModelError(
            f"{where} has an output shape that depends on tensor values "
            f"({type(error).__name__}): data-dependent shapes cannot be compiled with static "
            "shapes") from error


def _block_of(node: Node) -> str:
    paths = [value[0] for value in (node.meta.get("nn_module_stack") or {}).values() if value[0]]
    return f"in {paths[-1]}" if paths else "at the top level"


def _export(model: torch.nn.Module, call: dict[str, Any],
            max_opaque_classes: int = 4) -> tuple[torch.export.ExportedProgram,
                                                   dict[int, OpaqueModule]]:
    """Export; a submodule that cannot be traced becomes an opaque op and we retry."""
    classes: list[type] = []
    while True:
        with opaque_modules(model, classes, call) as opaque, torch.no_grad():
            try:
                return torch.export.export(model, (), call, strict=False), opaque
            except Exception as error:  # noqa: BLE001 - any tracing failure
                module = failing_module(error, model)
                name = type(model).__name__
                if module is None or type(module) in classes or \
                        len(classes) == max_opaque_classes:
                    raise UnsupportedModelError(
                        f"{name} cannot be captured as one graph: {type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}") from error
                classes.append(type(module))


def capture(model: torch.nn.Module, kwargs: dict[str, Any]) -> CapturedGraph:
    """Export `model(**kwargs)` and normalise the graph for rewriting."""
    call = dict(kwargs)
    if _accepts_return_dict(model):
        call["return_dict"] = True
    exported, opaque = _export(model, call)
    gm = exported.module()
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" or node.target in _DROPPED_TARGETS:
            graph.erase_node(node)
        elif node.target is torch.ops.aten.dropout.default and not (node.args[2] and node.args[1]):
            # eval-mode dropout is the identity; left in, its "seeded" tag keeps dead
            # branches alive through dead-code elimination
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    leaves = pytree.tree_leaves(call)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(leaves):
        raise RuntimeError(f"export produced {len(placeholders)} inputs for {len(leaves)} leaves")
    tensor_leaves = []
    for i, (node, leaf) in enumerate(zip(placeholders, leaves)):
        if isinstance(leaf, torch.Tensor):
            tensor_leaves.append(i)
        elif node.users:
            raise RuntimeError(f"captured graph reads non-tensor input {node.name}={leaf!r}")
        else:
            graph.erase_node(node)
    graph._codegen = CodeGen()
    graph.lint()
    gm.recompile()
    _fold_scalars(gm, [leaves[i] for i in tensor_leaves])
    graph.lint()
    gm.recompile()
    _refresh_static_meta(gm)
    return CapturedGraph(gm, tensor_leaves, exported.call_spec.out_spec, opaque)
