"""Shape metadata of rewritten graphs, recomputed with fake tensors.

Example:
    >>> refresh_meta(graph_module)            # doctest: +SKIP
    >>> graph_module.graph.find_nodes(op="placeholder")[0].meta["val"].shape
    torch.Size([2, 4, 8, 8])
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import GraphModule
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

__all__ = ["fake_inputs", "refresh_meta"]


def fake_inputs(gm: GraphModule, mode: FakeTensorMode) -> list[torch.Tensor]:
    """Fake tensors matching the graph's placeholders (slots described on "meta" take
    the device of the model inputs)."""
    vals = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    device = next(v.device for v in vals if v.device.type != "meta")
    with mode:
        return [torch.empty_strided(v.shape, v.stride(), dtype=v.dtype,
                                    device=device if v.device.type == "meta" else v.device)
                for v in vals]


def refresh_meta(gm: GraphModule) -> None:
    """Recompute `meta["val"]` (and check every shape) with fake tensors."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake_inputs(gm, mode))
