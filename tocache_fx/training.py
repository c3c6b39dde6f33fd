"""Train TokenCache's Cache Predictor on the model's own trajectories (no data set).

`generate(model, seed)` runs one generation with the model (a pipeline call, a
sampler); the trainer records every call of the model, its output and each block's
image-token output. Then, for a recorded step `s`, every block's output blends its
fresh value with its value at step `s - 1` per token, `w ⊙ f_l(z_s) + (1 - w) ⊙
f_l(z_{s-1})`, with `w = g(l, s)` from the predictor, and the loss is the mean squared
error between the blended model's output and the recorded one (relative to the
output's variance) plus a budget term `budget_weight * (mean(w) - (1 - prune_ratio))^2`:
without it `w` collapses to 1 (never cache). The model stays frozen; blocks are found
as the pass finds them (`tocache_fx.blocks`), so there is no per-model code.

Example:
    >>> predictor = train_token_cache(dit, lambda m, seed: sample_digits(m, labels, seed=seed),
    ...                               num_steps=50)                         # doctest: +SKIP
    >>> predictor.save_pretrained("dit-token-cache")
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .blocks import find_blocks
from .predictor import CachePredictor, progress

__all__ = ["train_token_cache", "Trajectory"]


@dataclass
class Trajectory:
    """One recorded generation: per call, its inputs, output and blocks' image outputs."""

    calls: list[tuple[tuple, dict]] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    blocks: list[list[torch.Tensor]] = field(default_factory=list)  # [call][block]


def _image_tokens(args: tuple, kwargs: dict) -> int | None:
    """The block's image tokens: its `hidden_states` (else first 3-d) input's length."""
    value = kwargs.get("hidden_states", args[0] if args else None)
    if not (isinstance(value, torch.Tensor) and value.dim() == 3):
        value = next((v for v in pytree.tree_leaves((args, kwargs))
                      if isinstance(v, torch.Tensor) and v.dim() == 3), None)
    return value.shape[1] if value is not None else None


def _first_tensor(output: Any) -> torch.Tensor:
    return next(leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor))


def _image_outputs(output: Any, tokens: int) -> list[int]:
    """Positions, among the output's tensor leaves, of the image-token streams."""
    leaves = pytree.tree_leaves(output)
    return [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)
            and leaf.dim() == 3 and leaf.shape[1] == tokens]


@contextlib.contextmanager
def _recording(model: torch.nn.Module, blocks: list[torch.nn.Module],
               trajectory: Trajectory, state: dict) -> Iterator[None]:
    def on_call(module, args, kwargs):
        trajectory.calls.append(pytree.tree_map(
            lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, (args, kwargs)))
        trajectory.blocks.append([None] * len(blocks))

    def on_output(module, args, kwargs, output):
        trajectory.outputs.append(_first_tensor(output).detach().clone())

    def on_block(index):
        def hook(module, args, kwargs, output):
            if state.get("tokens") is None:
                state["tokens"] = _image_tokens(args, kwargs)
            leaves = pytree.tree_leaves(output)
            picked = _image_outputs(output, state["tokens"])
            trajectory.blocks[-1][index] = [leaves[i].detach().clone() for i in picked]
        return hook

    handles = [model.register_forward_pre_hook(on_call, with_kwargs=True),
               model.register_forward_hook(on_output, with_kwargs=True)]
    handles += [block.register_forward_hook(on_block(i), with_kwargs=True)
                for i, block in enumerate(blocks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _blending(blocks: list[torch.nn.Module], weights: torch.Tensor,
              previous: list[list[torch.Tensor]], tokens: int) -> Iterator[None]:
    """Each block's image outputs become `w * fresh + (1 - w) * previous step's`."""
    def on_block(index):
        def hook(module, args, kwargs, output):
            leaves, spec = pytree.tree_flatten(output)
            w = weights[index][None, :, None]
            for slot, i in enumerate(_image_outputs(output, tokens)):
                leaves[i] = w * leaves[i] + (1 - w) * previous[index][slot].to(leaves[i].dtype)
            return pytree.tree_unflatten(leaves, spec)
        return hook

    handles = [block.register_forward_hook(on_block(i), with_kwargs=True)
               for i, block in enumerate(blocks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def train_token_cache(model: torch.nn.Module, generate: Callable[[torch.nn.Module, int], Any],
                      num_steps: int, *, generations: int = 4, epochs: int = 30,
                      prune_ratio: float = 0.5, budget_weight: float = 10.0, lr: float = 3e-3,
                      hidden: int = 64, seed: int = 0, progress_bar: bool = True
                      ) -> CachePredictor:
    """A Cache Predictor for `model`, trained on `generations` of its own trajectories.

    Args:
        model: the diffusers transformer (eval mode; stays frozen and unchanged).
        generate: `generate(model, seed)` runs one `num_steps`-step generation with the
            model; it supplies the conditioning (labels, prompt embeddings).
        num_steps: calls of the model per generation.
        prune_ratio: the pruning ratio the budget term aims at (mean w = 1 - ratio).
        budget_weight, lr, epochs, hidden: the optimisation.
        seed: seeds the predictor, the order of the training steps and the
            generations (`seed`, `seed + 1`, ...): training is reproducible.

    The training record (loss per epoch, final mean weight, seconds) is in
    `predictor.info["training"]`.
    """
    from tqdm.auto import tqdm

    if model.training:
        raise ValueError("train_token_cache needs the model in eval mode (model.eval())")
    blocks = [module for _, module in find_blocks(model)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no repeated blocks to prune")
    start = time.perf_counter()
    trajectories, state = [], {}
    for g in range(generations):
        trajectory = Trajectory()
        with _recording(model, blocks, trajectory, state), torch.no_grad():
            generate(model, seed + g)
        if len(trajectory.calls) != num_steps:
            raise ValueError(f"generate() called the model {len(trajectory.calls)} times, not "
                             f"num_steps={num_steps} (one call per step: batch CFG, or cache "
                             "each context separately)")
        trajectories.append(trajectory)
    called = [i for i, out in enumerate(trajectories[0].blocks[0]) if out is not None]
    blocks = [blocks[i] for i in called]
    for trajectory in trajectories:
        trajectory.blocks = [[step[i] for i in called] for step in trajectory.blocks]
    tokens = state["tokens"]

    torch.manual_seed(seed)
    predictor = CachePredictor(len(blocks), tokens, hidden, target=1 - prune_ratio, info={
        "model": type(model).__name__, "blocks": len(blocks), "tokens": tokens,
        "num_steps": num_steps, "prune_ratio": prune_ratio})
    optimiser = torch.optim.AdamW(predictor.parameters(), lr=lr, weight_decay=0.0)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for param in frozen:
        param.requires_grad_(False)
    pairs = [(g, s) for g in range(generations) for s in range(1, num_steps)]
    order = torch.Generator().manual_seed(seed)
    losses, budgets = [], []
    bar = tqdm(total=epochs * len(pairs), desc="token cache", disable=not progress_bar)
    try:
        for _ in range(epochs):
            total = 0.0
            for i in torch.randperm(len(pairs), generator=order).tolist():
                g, s = pairs[i]
                trajectory = trajectories[g]
                weights = predictor(torch.arange(len(blocks)),
                                    progress(s, num_steps).expand(len(blocks)))
                args, kwargs = trajectory.calls[s]
                target = trajectory.outputs[s]
                with _blending(blocks, weights, trajectory.blocks[s - 1], tokens):
                    out = _first_tensor(model(*args, **kwargs))
                error = (out.float() - target.float()).pow(2).mean() / target.float().var()
                budget = (weights.mean() - (1 - prune_ratio)) ** 2
                loss = error + budget_weight * budget
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += loss.item()
                bar.update()
            losses.append(total / len(pairs))
            budgets.append(float(predictor.importance(num_steps).mean()))
            bar.set_postfix(loss=f"{losses[-1]:.4g}", mean_w=f"{budgets[-1]:.3f}")
    finally:
        bar.close()
        for param in frozen:
            param.requires_grad_(True)
    predictor.info["training"] = {"loss": losses, "mean_weight": budgets[-1],
                                  "generations": generations, "epochs": epochs, "lr": lr,
                                  "budget_weight": budget_weight, "seed": seed,
                                  "seconds": round(time.perf_counter() - start, 1)}
    return predictor.eval()
