"""Capture one module call (a transformer block, or a whole model) as a flat ATen graph.

`torch.export(strict=False)` traces the call (diffusers models defeat
`torch.fx.symbolic_trace`). The graph is normalised for rewriting:

* parameters, buffers and tensor constants are graph *inputs* (placeholders named by
  `state_targets`), fed from the module at every call: blocks of one class share one
  graph, and a replaced weight, a `.to()` or a new buffer is never stale;
* runtime guard and metadata assertion nodes and eval-mode dropouts are removed;
* the call's tensor leaves follow as flat inputs; Python scalars the graph was
  specialised on are folded (one capture per call signature).

Example:
    >>> captured = capture(block, (hidden_states,), {"timestep": t})  # doctest: +SKIP
    >>> captured.run(block, captured.flatten((hidden_states,), {"timestep": t}))[0].shape
    torch.Size([2, 16, 32])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.export.graph_signature import InputKind
from torch.fx import GraphModule, Node
from torch.fx.graph import CodeGen
from torch.fx.node import map_arg
from torch.utils import _pytree as pytree

from .errors import UnsupportedModelError
from .meta import DATA_DEPENDENT, refresh_meta
from .opaque import CURRENT_UNIT, OpaqueModule, failing_module, opaque_modules

__all__ = ["CapturedGraph", "StateAccessor", "capture", "call_leaves", "call_signature",
           "has_signature", "block_of"]

_DROPPED_TARGETS = {torch.ops.aten._assert_tensor_metadata.default}
_SCALAR_READS = {torch.ops.aten.item.default, torch.ops.aten._local_scalar_dense.default}


def call_signature(call: Any, spec: pytree.TreeSpec | None = None) -> tuple:
    """A hashable key of everything a captured graph is specialised on: the call's
    structure, the shape/dtype/device of each tensor leaf and every other leaf's value
    (`call` may be given flattened: its leaves and `spec`)."""
    leaves, spec = (call, spec) if spec is not None else pytree.tree_flatten(call)
    return (str(spec), tuple(map(_leaf_signature, leaves)))


def _leaf_signature(leaf: Any) -> tuple:
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device)
    return ("const", repr(leaf))


_PLAIN_LEAVES = (torch.Tensor, type(None), bool, int, float, str)


def call_leaves(args: tuple, kwargs: dict[str, Any]) -> tuple[list[Any], Any]:
    """The leaves of the call `(args, kwargs)` in pytree order and its structure: for a
    call whose arguments are all tensors, None or plain scalars (a block call, mostly) a
    tuple `(number of args, keyword names)`, which is cheaper to build and compare than
    the `TreeSpec` that `pytree.tree_flatten` returns for any other call. One level of
    tuples of such leaves (FLUX's rotary `(cos, sin)`) is flattened the same way, its
    lengths added to the structure."""
    values = (*args, *kwargs.values())
    if all(type(value) in _PLAIN_LEAVES for value in values):
        return list(values), (len(args), tuple(kwargs))
    if all(type(value) in _PLAIN_LEAVES or type(value) is tuple and
           all(type(item) in _PLAIN_LEAVES for item in value) for value in values):
        leaves: list[Any] = []
        lengths = []
        for value in values:
            if type(value) is tuple:
                leaves.extend(value)
                lengths.append(len(value))
            else:
                leaves.append(value)
                lengths.append(None)
        return leaves, (len(args), tuple(kwargs), tuple(lengths))
    return pytree.tree_flatten((args, kwargs))


def has_signature(leaves: list[Any], structure: Any, signature: tuple,
                  known: list[Any], call: tuple[tuple, dict[str, Any]]) -> bool:
    """`call_signature(call) == signature` for a call flattened by `call_leaves` into
    `leaves` and `structure`, the structure compared against `known`, the structures
    already found to match (a cheaper test than the spec's text)."""
    if not any(structure == seen for seen in known):
        spec = structure if isinstance(structure, pytree.TreeSpec) else pytree.tree_structure(call)
        if call_signature(leaves, spec) != signature:
            return False
        known.append(structure)
        return True
    return all(_leaf_signature(leaf) == expected for leaf, expected in zip(leaves, signature[1]))


@dataclass(frozen=True)
class StateAccessor:
    """Where a state input lives: `owner.<dict>[name]`, or a fixed export constant."""

    owner: torch.nn.Module | None
    store: str  # "_parameters" | "_buffers" | "attr" | "fixed"
    name: str
    fixed: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        if self.store == "fixed":
            return self.fixed
        if self.store == "attr":
            return getattr(self.owner, self.name)
        return self.owner.__dict__[self.store][self.name]


@dataclass
class CapturedGraph:
    """One captured call: `graph_module(*state, *tensor_leaves) -> flat outputs`."""

    graph_module: GraphModule
    state_targets: list[str]  # module-relative FQN of each state input, in placeholder order
    tensor_leaves: list[int]  # positions of the graph's inputs among the call's leaves
    output_spec: pytree.TreeSpec
    opaque: dict[str, OpaqueModule]  # submodules run eagerly, by module-relative path
    constants: dict[str, torch.Tensor]  # export constants that are not module attributes

    @property
    def num_state(self) -> int:
        return len(self.state_targets)

    def accessors(self, module: torch.nn.Module) -> list[StateAccessor]:
        """How to read each state input from `module` (an instance this graph serves)."""
        found = []
        for target in self.state_targets:
            if target in self.constants:
                found.append(StateAccessor(None, "fixed", target, self.constants[target]))
                continue
            path, _, name = target.rpartition(".")
            owner = module.get_submodule(path) if path else module
            store = ("_parameters" if name in owner._parameters else
                     "_buffers" if name in owner._buffers else "attr")
            found.append(StateAccessor(owner, store, name))
        return found

    def flatten(self, call: Any) -> list[torch.Tensor]:
        leaves = pytree.tree_leaves(call)
        return [leaves[i] for i in self.tensor_leaves]

    def unflatten(self, outputs: list[torch.Tensor]) -> Any:
        if self.output_spec.is_leaf():  # a block returning one tensor: no pytree call
            return outputs[0]
        return pytree.tree_unflatten(list(outputs), self.output_spec)


def _fold_scalars(gm: GraphModule, inputs: list[torch.Tensor], user_inputs: set[Node]) -> None:
    """Replace every scalar (shape arithmetic, `.item()` of a tensor that does not
    depend on the call's inputs, runtime assertions) by its value for these inputs.

    The graph is specialised on the input shapes anyway (one capture per call
    signature). diffusers builds some sizes as tensors (HiDream's `img_sizes`), which
    `torch.export` traces as unbacked integers; folded, the graph has static shapes.
    Reading the value of an input-dependent tensor is data-dependent control flow and
    is refused."""
    tainted: set[Node] = set()
    for node in gm.graph.nodes:
        if node in user_inputs or any(a in tainted for a in node.all_input_nodes):
            tainted.add(node)
        if node.target in _SCALAR_READS and node in tainted:
            raise UnsupportedModelError(
                f"{node.name} reads the value of a tensor computed from the inputs "
                f"{block_of(node)}: data-dependent control flow outside a module that "
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
    try:
        refresh_meta(gm)
    except DATA_DEPENDENT as error:
        node = getattr(error, "failed_node", None)
        where = f"{node.name} ({node.target}) {block_of(node)}" if node else "an op"
        raise UnsupportedModelError(
            f"{where} has an output shape that depends on tensor values "
            f"({type(error).__name__}): data-dependent shapes cannot be compiled with static "
            "shapes") from error


def block_of(node: Node) -> str:
    """Where `node` comes from in the module tree, for error messages."""
    paths = [value[0] for value in (node.meta.get("nn_module_stack") or {}).values() if value[0]]
    return f"in {paths[-1]}" if paths else "at the top level"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _export(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], where: str,
            max_opaque_classes: int = 4) -> tuple[torch.export.ExportedProgram,
                                                   dict[str, OpaqueModule]]:
    """Export; a submodule that cannot be traced becomes an opaque op and we retry."""
    classes: list[type] = []
    while True:
        with opaque_modules(module, classes, args, kwargs) as opaque, torch.no_grad():
            try:
                return torch.export.export(module, args, kwargs, strict=False), opaque
            except UnsupportedModelError:
                raise
            except Exception as error:  # noqa: BLE001 - any tracing failure
                failing = failing_module(error, module)
                if failing is None or type(failing) in classes or \
                        len(classes) == max_opaque_classes:
                    raise UnsupportedModelError(
                        f"{where} cannot be captured as one graph: {_first_line(error)}"
                    ) from error
                classes.append(type(failing))


def capture(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any],
            where: str | None = None) -> CapturedGraph:
    """Export `module(*args, **kwargs)` and normalise the graph for rewriting."""
    where = where or type(module).__name__
    exported, opaque = _export(module, args, kwargs, where)
    signature = exported.graph_signature
    if signature.buffers_to_mutate or signature.user_inputs_to_mutate:
        raise UnsupportedModelError(f"{where} mutates a buffer or an input in its forward "
                                    "(a stateful module): it cannot be cached step by step")
    gm = exported.graph_module
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
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    specs = signature.input_specs
    if len(placeholders) != len(specs):
        raise RuntimeError(f"export produced {len(placeholders)} inputs for {len(specs)} specs")
    state_targets, state_values, user_nodes = [], [], []
    for node, spec in zip(placeholders, specs):
        if spec.kind is InputKind.USER_INPUT:
            user_nodes.append(node)
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            state_targets.append(spec.target)
            state_values.append(exported.state_dict.get(spec.target,
                                                        exported.constants.get(spec.target)))
        else:
            raise UnsupportedModelError(f"{where}: unsupported graph input {spec.kind.name}")
    leaves = pytree.tree_leaves((args, kwargs))
    if len(user_nodes) != len(leaves):
        raise RuntimeError(f"export produced {len(user_nodes)} inputs for {len(leaves)} leaves")
    tensor_leaves, tensor_values = [], []
    for i, (node, leaf) in enumerate(zip(user_nodes, leaves)):
        if isinstance(leaf, torch.Tensor):
            tensor_leaves.append(i)
            tensor_values.append(leaf)
        elif node.users:
            raise RuntimeError(f"captured graph reads non-tensor input {node.name}={leaf!r}")
        else:
            graph.erase_node(node)
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (tuple(output.args[0]),)
    graph._codegen = CodeGen()
    gm.meta["tocache_num_state"] = len(state_targets)
    graph.lint()
    gm.recompile()
    tensor_nodes = {node for node, leaf in zip(user_nodes, leaves) if isinstance(leaf, torch.Tensor)}
    token = CURRENT_UNIT.set(module)  # opaque ops run the module's own submodules
    try:
        _fold_scalars(gm, state_values + tensor_values, tensor_nodes)
    finally:
        CURRENT_UNIT.reset(token)
    graph.lint()
    gm.recompile()
    _refresh_static_meta(gm)
    constants = {target: value for target, value in zip(state_targets, state_values)
                 if not _is_attribute(module, target)}
    return CapturedGraph(gm, state_targets, tensor_leaves, exported.call_spec.out_spec, opaque,
                         constants)


def _is_attribute(module: torch.nn.Module, target: str) -> bool:
    path, _, name = target.rpartition(".")
    try:
        owner = module.get_submodule(path) if path else module
    except AttributeError:
        return False
    return isinstance(getattr(owner, name, None), torch.Tensor)
