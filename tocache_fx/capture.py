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
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule
from torch.fx.graph import CodeGen
from torch.utils import _pytree as pytree

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

    def flatten(self, kwargs: dict[str, Any]) -> list[torch.Tensor]:
        leaves = pytree.tree_leaves(kwargs)
        return [leaves[i] for i in self.tensor_leaves]

    def unflatten(self, outputs: list[torch.Tensor]) -> Any:
        return pytree.tree_unflatten(list(outputs), self.output_spec)


def _accepts_return_dict(model: torch.nn.Module) -> bool:
    return "return_dict" in inspect.signature(model.forward).parameters


def capture(model: torch.nn.Module, kwargs: dict[str, Any]) -> CapturedGraph:
    """Export `model(**kwargs)` and normalise the graph for rewriting."""
    call = dict(kwargs)
    if _accepts_return_dict(model):
        call["return_dict"] = True
    with torch.no_grad():
        exported = torch.export.export(model, (), call, strict=False)
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
    return CapturedGraph(gm, tensor_leaves, exported.call_spec.out_spec)
