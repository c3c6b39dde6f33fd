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


class GraphState:
    """Collects the cache slots a step graph reads and writes."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.reads: dict[str, Node] = {}
        self.writes: dict[str, Node] = {}
        self.examples: dict[str, torch.Tensor] = {}
        self.optional: set[str] = set()

    def read(self, name: str, example: torch.Tensor, optional: bool = False) -> Node:
        """The placeholder holding slot `name` (created on first use); an `optional`
        slot the cache does not hold yet is fed as zeros."""
        if optional:
            self.optional.add(name)
        if name not in self.reads:
            last = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
            with self.graph.inserting_after(last):
                node = self.graph.placeholder(name.replace(".", "_"))
            node.meta["val"] = example
            node.meta["tocache_slot"] = name
            self.reads[name] = node
            self.examples[name] = example
        return self.reads[name]

    def write(self, name: str, node: Node) -> None:
        node.meta["tocache_slot"] = name
        self.writes[name] = node

    def finish(self) -> None:
        """Append the written slots to the graph's outputs."""
        output = next(n for n in self.graph.nodes if n.op == "output")
        outputs = tuple(output.args[0]) + tuple(self.writes.values())
        output.args = (outputs,)
