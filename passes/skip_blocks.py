"""Rewrite pass: DuCa's AGGRESSIVE step and the slot it reads.

Requires: a copy of the captured graph and the branches (in graph order).
Ensures: on an AGGRESSIVE plan every use of the last residual add (the output of the
last block) reads slot `stream` instead, so dead-code elimination removes all blocks
while the embedders and the final layer still run with the current timestep; on
other plans, when the layout caches the stream, the last add is written to `stream`.

Example:
    >>> skip_blocks(gm, branches, (2, 0, 0), layout, state)   # doctest: +SKIP
    True
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.fx import GraphModule

from tocache_fx.layout import CacheLayout
from tocache_fx.schedule import StepKind

from .find_branches import Branch
from .state import GraphState, slot_example

__all__ = ["skip_blocks"]


def skip_blocks(gm: GraphModule, branches: Sequence[Branch], plan: tuple[int, ...],
                layout: CacheLayout, state: GraphState) -> bool:
    """Reuse or store the last block's output (see module doc)."""
    if not layout.stream:
        return False
    last = branches[-1].add
    node = next(n for n in gm.graph.nodes if n.name == last.name)
    if plan[0] == StepKind.AGGRESSIVE:
        node.replace_all_uses_with(state.read("stream", slot_example(last)))
    else:
        state.write("stream", node)
    return True
