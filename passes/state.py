"""Cache state as graph inputs and outputs.

A step graph is functional: the cache slots it reads become placeholders after the
model's own inputs, the slots it writes are appended to its outputs. The runtime
passes `reads` in order and stores the trailing outputs under `writes`.

Example:
    >>> state = GraphState(gm.graph)                       # doctest: +SKIP
    >>> cache = state.read("cache.3", like=branch_output)   # a new placeholder
    >>> state.write("cache.3", new_value)
    >>> state.finish()                                      # outputs += (new_value,)
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node

__all__ = ["GraphState", "slot_example"]


def slot_example(like: Node, dtype: torch.dtype | None = None,
                 shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A meta tensor describing a slot shaped after node `like` (or `shape`)."""
    val = like.meta["val"]
    return torch.empty(shape if shape is not None else tuple(val.shape),
                       dtype=dtype or val.dtype, device="meta")


VALUE_SLOTS = ("cache.", "attn.", "diff", "stream", "kv.", "block.")
"""Slots holding branch values (kept in `cache_dtype` when one is set); the others are
counters, scores and sizes, kept as they are."""


class GraphState:
    """Collects the cache slots a step graph reads and writes. Slots are contiguous; with
    `cache_dtype`, value slots are stored in that dtype (a cast on write, back on read)."""

    def __init__(self, graph: Graph, cache_dtype: torch.dtype | None = None) -> None:
        self.graph = graph
        self.cache_dtype = cache_dtype
        self.reads: dict[str, Node] = {}  # the placeholders
        self.values: dict[str, Node] = {}  # what the graph reads them as
        self.writes: dict[str, Node] = {}
        self.examples: dict[str, torch.Tensor] = {}
        self.optional: set[str] = set()

    def _stored(self, name: str, dtype: torch.dtype) -> torch.dtype:
        if self.cache_dtype is not None and name.startswith(VALUE_SLOTS) and dtype.is_floating_point:
            return self.cache_dtype
        return dtype

    def read(self, name: str, example: torch.Tensor, optional: bool = False) -> Node:
        """The value of slot `name` (a placeholder, created on first use); an `optional`
        slot the cache does not hold yet is fed as zeros."""
        if optional:
            self.optional.add(name)
        if name not in self.reads:
            stored = example.to(self._stored(name, example.dtype)).contiguous()
            last = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
            with self.graph.inserting_after(last):
                node = self.graph.placeholder(name.replace(".", "_"))
            node.meta["val"] = stored
            node.meta["tocache_slot"] = name
            self.reads[name] = self.values[name] = node
            self.examples[name] = stored
            if stored.dtype != example.dtype:
                with self.graph.inserting_after(node):
                    cast = self.graph.call_function(torch.ops.aten._to_copy.default, (node,),
                                                    {"dtype": example.dtype})
                cast.meta["val"] = example
                self.values[name] = cast
        return self.values[name]

    def write(self, name: str, node: Node) -> None:
        """Store `node` in slot `name`: contiguous (a branch output can be a view of a
        joint sequence, and every graph reading the slot is compiled for one layout), in
        the slot's dtype."""
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and not val.is_contiguous():
            with self.graph.inserting_after(node):
                node = self.graph.call_function(torch.ops.aten.clone.default, (node,),
                                                {"memory_format": torch.contiguous_format})
            node.meta["val"] = val = val.contiguous()
        if isinstance(val, torch.Tensor) and self._stored(name, val.dtype) != val.dtype:
            with self.graph.inserting_after(node):
                node = self.graph.call_function(torch.ops.aten._to_copy.default, (node,),
                                                {"dtype": self.cache_dtype})
            node.meta["val"] = val.to(self.cache_dtype)
        node.meta["tocache_slot"] = name
        self.writes[name] = node

    def finish(self) -> None:
        """Append the written slots to the graph's outputs."""
        output = next(n for n in self.graph.nodes if n.op == "output")
        outputs = tuple(output.args[0]) + tuple(self.writes.values())
        output.args = (outputs,)
