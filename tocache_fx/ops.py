"""Tensor functions the rewrite inserts into the model graph.

Each is plain PyTorch with static shapes, so `torch.compile` traces it into the same
graph as the model (no graph break, no host sync). Scores follow methods.md §2–3.

Example:
    >>> x = torch.randn(2, 16, 8)
    >>> idx = select_tokens(4, score=torch.rand(2, 16))
    >>> gather_tokens(x, idx).shape
    torch.Size([2, 4, 8])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "gather_tokens", "gather_side_input", "batch_index", "scatter_tokens", "advance_staleness", "select_tokens",
    "attention_influence", "cross_attention_entropy", "value_norm_score", "fresh_staleness",
    "finite_difference", "taylor_forecast", "sharded_attention_score", "attention_with_score",
]


def _token_index(idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Expand `[B, k]` token indices to index dim 1 of a `[B, k, ...]` tensor."""
    shape = (idx.shape[0], idx.shape[1]) + (1,) * (like.dim() - 2)
    return idx.view(shape).expand((idx.shape[0], idx.shape[1]) + tuple(like.shape[2:]))


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """Tokens `idx` ([B, k]) of `x` ([B, N, ...], tokens along `axis`) -> [B, k, ...]."""
    if axis != 1:
        return gather_tokens(x.movedim(axis, 1), idx).movedim(1, axis)
    return x.gather(1, _token_index(idx, x))


def gather_side_input(x: torch.Tensor, idx: torch.Tensor, axis: int, rank: int,
                      offset: int = 0) -> torch.Tensor:
    """Tokens `idx` ([B, k]) of a per-token side input (a rotary table, per-token
    modulation) read by an op of rank `rank` with tokens along `axis`: `x` is left-padded
    to that rank, broadcast over the batch, and gathered -> k tokens along `axis`; a
    table over a joint sequence is read `offset` tokens in (where the branch's start)."""
    x = x.reshape((1,) * (rank - x.dim()) + tuple(x.shape))
    if x.shape[0] == 1:
        x = x.expand(idx.shape[0], *x.shape[1:])
    return gather_tokens(x, idx + offset if offset else idx, axis)


def batch_index(idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Token indices `[k]`, the same for every sample, as `[B, k]` for `like` ([B, N, ...])."""
    return idx.unsqueeze(0).expand(like.shape[0], idx.shape[0])


def scatter_tokens(cache: torch.Tensor, idx: torch.Tensor, values: torch.Tensor,
                   axis: int = 1) -> torch.Tensor:
    """A copy of `cache` ([B, N, ...], tokens along `axis`) with tokens `idx` ([B, k])
    replaced by `values`."""
    if axis != 1:
        return scatter_tokens(cache.movedim(axis, 1), idx, values.movedim(axis, 1)).movedim(1, axis)
    return cache.scatter(1, _token_index(idx, values), values.to(cache.dtype))


def advance_staleness(staleness: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """One more cached step for every token; tokens `idx` were just recomputed (0)."""
    staleness = staleness + 1
    if idx is None:
        return staleness
    return staleness.scatter(1, idx, 0.0)


def finite_difference(new: torch.Tensor, old: torch.Tensor,
                      coefficient: torch.Tensor) -> torch.Tensor:
    """One order higher difference: `(new - old) * coefficient`, the coefficient being
    1 / distance in steps (0 while the lower difference is not known yet)."""
    return (new - old) * coefficient


def taylor_forecast(value: torch.Tensor, differences: list[torch.Tensor],
                    coefficients: torch.Tensor) -> torch.Tensor:
    """The Taylor series `value + Σ_i coefficients[i] * Δ^(i+1) value`, with
    `coefficients[i] = distance^(i+1) / (i+1)!` (0 for differences not known yet)."""
    forecast = value
    for i, difference in enumerate(differences):
        forecast = forecast + coefficients[i] * difference
    return forecast


def _normalise(score: torch.Tensor) -> torch.Tensor:
    return F.normalize(score.float(), p=2.0, dim=-1)


def _shared_halves(score: torch.Tensor) -> torch.Tensor:
    """Average a [B, N] score over the two CFG halves of an even batch."""
    half = score.shape[0] // 2
    mean = (score[:half] + score[half:]) / 2
    return torch.cat([mean, mean])


def _attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None,
                     scale: float | None) -> torch.Tensor:
    """The attention map in float32; a query the mask lets see no key attends to nothing
    (a row of zeros, where softmax gives NaN: SDPA's output for it is zeros too)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is None:
        return logits.softmax(dim=-1)
    logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool \
        else logits + mask.float()
    blind = logits.amax(dim=-1, keepdim=True) == float("-inf")
    return logits.softmax(dim=-1).masked_fill(blind, 0.0)


def attention_influence(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None,
                        scale: float | None = None, chunk: int = 256,
                        span: tuple[int, int] | None = None) -> torch.Tensor:
    """s1: how much attention each key token receives, `[B, H, N, d]` -> `[B, N]`.

    Column sums of the head-averaged attention map over keys `span` (start, length:
    one stream of a joint attention; all keys if None), L2-normalised over them;
    computed over query chunks so memory stays O(N * chunk) per head, not O(N^2).
    """
    total = q.new_zeros(q.shape[0], k.shape[-2], dtype=torch.float32)
    for start in range(0, q.shape[-2], chunk):
        q_chunk = q[..., start:start + chunk, :]
        total = total + _attention_probs(q_chunk, k, _mask_rows(mask, start, chunk),
                                         scale).mean(dim=1).sum(dim=1)
    return _normalise(_cut(total, span))


def _cut(score: torch.Tensor, span: tuple[int, int] | None) -> torch.Tensor:
    return score if span is None else score[:, span[0]:span[0] + span[1]]


def cross_attention_entropy(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None,
                            scale: float | None = None, chunk: int = 256,
                            share_halves: bool = False,
                            span: tuple[int, int] | None = None) -> torch.Tensor:
    """s2: entropy of each query token's cross-attention, `[B, H, N, d]` -> `[B, N]`.

    `normalise(1 + H)` with the map averaged over heads (and over the CFG halves when
    `share_halves`), computed over query chunks.
    """
    return _normalise(1 + _cut(_entropy_rows(q, k, mask, scale, chunk, share_halves), span))


def _entropy_rows(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None,
                  scale: float | None, chunk: int, share_halves: bool) -> torch.Tensor:
    """Entropy of each query's head-averaged attention map: `[B, N_queries]`."""
    rows = []
    for start in range(0, q.shape[-2], chunk):
        probs = _attention_probs(q[..., start:start + chunk, :], k, _mask_rows(mask, start, chunk),
                                 scale)
        rows.append(_entropy_of(probs, share_halves))
    return torch.cat(rows, dim=-1)


def _mask_rows(mask: torch.Tensor | None, start: int, chunk: int) -> torch.Tensor | None:
    """The rows of an attention mask for queries `start:start + chunk` (a mask that
    broadcasts over the queries is taken whole)."""
    return mask[..., start:start + chunk, :] if mask is not None and mask.shape[-2] > 1 else mask


def _entropy_of(probs: torch.Tensor, share_halves: bool) -> torch.Tensor:
    """Entropy of each query row of `[B, H, n, N]` probabilities averaged over heads."""
    probs = probs.mean(dim=1)
    if share_halves and probs.shape[0] % 2 == 0:
        probs = _shared_halves(probs.flatten(1)).view_as(probs)
    return -(probs * torch.log(probs + 1e-7)).sum(dim=-1)


def attention_with_score(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: torch.Tensor | None = None, scale: float | None = None,
                         chunk: int = 256, share_halves: bool = False,
                         span: tuple[int, int] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output `[B, H, N, d]` and its score ("influence" or "entropy"), both
    from one softmax per chunk of queries: attention computed explicitly, as the ToCa
    authors compute it to read its map. The output is `scaled_dot_product_attention`'s
    (no dropout, causal mask or GQA) within float rounding, the score exactly
    `attention_influence` / `cross_attention_entropy`'s.

    Example:
        >>> q = k = v = torch.randn(2, 4, 16, 8)
        >>> out, score = attention_with_score("influence", q, k, v)
        >>> torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-6)
        True
    """
    outputs, influence, rows = [], None, []
    for start in range(0, q.shape[-2], chunk):
        probs = _attention_probs(q[..., start:start + chunk, :], k, _mask_rows(mask, start, chunk),
                                 scale)
        outputs.append(torch.matmul(probs.to(v.dtype), v))
        if kind == "influence":
            received = probs.mean(dim=1).sum(dim=1)
            influence = received if influence is None else influence + received
        else:
            rows.append(_entropy_of(probs, share_halves))
    score = _cut(influence, span) if kind == "influence" else 1 + _cut(torch.cat(rows, dim=-1), span)
    return torch.cat(outputs, dim=-2), _normalise(score)


def value_norm_score(v: torch.Tensor, span: tuple[int, int] | None = None) -> torch.Tensor:
    """DuCa's V-norm selection: tokens with small value norms score high, `[B, H, N, d]`
    -> `[B, N]` (over tokens `span`): L2-normalised `sum_heads (1 - |v|)`, as the authors'
    `kv-norm` score."""
    return _normalise(_cut((1 - v.float().norm(dim=-1)).sum(dim=1), span))


def _all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    functional = torch.ops._c10d_functional
    return functional.wait_tensor(functional.all_reduce(x, "sum", group))


def _gather_sequence(x: torch.Tensor, group: str, world: int) -> torch.Tensor:
    """`[B, H, S, d]` of every rank, concatenated in rank order: `[B, H, world * S, d]`."""
    functional = torch.ops._c10d_functional
    flat = x.permute(2, 0, 1, 3).contiguous()
    gathered = functional.wait_tensor(functional.all_gather_into_tensor(flat, world, group))
    return gathered.permute(1, 2, 0, 3)


def _normalise_across(score: torch.Tensor, group: str) -> torch.Tensor:
    """`_normalise` over the tokens of every rank's `score` (`[B, n]` each)."""
    score = score.float()
    norm = _all_reduce(score.square().sum(dim=-1, keepdim=True), group).sqrt()
    return score / norm.clamp_min(1e-12)


def sharded_attention_score(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            token_axes: tuple[int, int, int], scale: float | None = None,
                            chunk: int = 256, span: tuple[int, int] = (0, 0),
                            share_halves: bool = False, group: str = "", rank: int = 0,
                            world: int = 1) -> torch.Tensor:
    """A score of `attention_influence` / `cross_attention_entropy` / `value_norm_score`
    ("influence" / "entropy" / "vnorm") under context parallelism, from this rank's
    local q, k, v (every head, its own tokens; `token_axes` 1 or 2) over its tokens
    `span`: the one-process score of those tokens (see passes/shards.py).

    Keys are gathered from every rank (rank order is token order; for entropy, whose
    keys are another stream, not where every rank holds the same keys: a replicated
    stream), influence's column sums all-reduced over the ranks' queries, and the L2
    normalisation taken over every rank's span. Example (one process, world 1, over the default group):
        >>> sharded_attention_score("vnorm", q, k, v, (2, 2, 2), span=(0, 16), group="0")  # doctest: +SKIP
    """
    q, k, v = (x if axis == 2 else x.transpose(1, 2) for x, axis in zip((q, k, v), token_axes))
    start, length = span
    if kind == "vnorm":
        return _normalise_across((1 - v.float().norm(dim=-1)).sum(dim=1)[:, start:start + length],
                                 group)
    keys = _gather_sequence(k, group, world)
    if kind == "entropy":  # keys of another stream, which a CP plan may replicate (Wan's text)
        replicated = (keys.unflatten(2, (world, -1)) == k.unsqueeze(2)).all()
        rows = torch.where(replicated, _entropy_rows(q, k, None, scale, chunk, share_halves),
                           _entropy_rows(q, keys, None, scale, chunk, share_halves))
        return _normalise_across(1 + rows[:, start:start + length], group)
    total = q.new_zeros(q.shape[0], keys.shape[-2], dtype=torch.float32)
    for i in range(0, q.shape[-2], chunk):
        total = total + _attention_probs(q[..., i:i + chunk, :], keys, None, scale).mean(dim=1).sum(dim=1)
    total = _all_reduce(total, group).view(q.shape[0], world, -1)[:, :, start:start + length]
    return F.normalize(total.flatten(1), p=2.0, dim=-1).view_as(total)[:, rank]


def _similarity_score(x: torch.Tensor, noise: torch.Tensor, base_fraction: float) -> torch.Tensor:
    """Minus the largest cosine similarity of each token to a random base set."""
    num_base = max(1, round(base_fraction * x.shape[1]))
    base = gather_tokens(x, noise.topk(num_base, dim=1, sorted=False).indices)
    similarity = torch.matmul(F.normalize(x.float(), dim=-1),
                              F.normalize(base.float(), dim=-1).transpose(1, 2))
    return -similarity.amax(dim=-1)


def _grid_bonus(score: torch.Tensor, grid: tuple[int, int], cell: int, bonus: float) -> torch.Tensor:
    """s4: in every cell x cell patch of the token grid, lift the top token by bonus * max."""
    batch = score.shape[0]
    rows, cols = grid
    cells = score.view(batch, rows // cell, cell, cols // cell, cell).permute(0, 1, 3, 2, 4)
    cells = cells.reshape(batch, -1, cell * cell)
    best, where = cells.max(dim=-1)
    lifted = cells.scatter_add(-1, where.unsqueeze(-1), (bonus * best).unsqueeze(-1))
    lifted = lifted.view(batch, rows // cell, cols // cell, cell, cell).permute(0, 1, 3, 2, 4)
    return lifted.reshape(batch, rows * cols)


def select_tokens(k: int, *, score: torch.Tensor | None = None, score_weight: float = 1.0,
                  staleness: torch.Tensor | None = None, staleness_weight: float = 0.0,
                  interval: int = 1, noise: torch.Tensor | None = None,
                  similarity_to: torch.Tensor | None = None, similarity_base: float = 0.01,
                  grid: tuple[int, int] | None = None, grid_size: int = 1,
                  grid_bonus: float = 0.0, share_halves: bool = False,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """Indices `[B, k]` of the tokens to recompute: top-k of the combined score.

    S = score_weight * score + staleness_weight * staleness / interval (+ noise, or the
    similarity score), then the grid bonus; with `share_halves` an even batch is taken
    as [uncond; cond] and both halves get the selection of their averaged score. With
    `valid` (a 0-d count <= k), only the top `valid` tokens are chosen: the rest of the
    k slots repeat the top token (a dynamic-size graph serving k = 1 runs k = 2).
    """
    parts = []
    if score is not None:
        parts.append(score_weight * score)
    if staleness is not None and staleness_weight:
        parts.append(staleness_weight * staleness / interval)
    if similarity_to is not None:
        parts.append(_similarity_score(similarity_to, noise, similarity_base))
    elif noise is not None:
        parts.append(noise)
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    if grid is not None and grid_bonus:
        total = _grid_bonus(total, grid, grid_size, grid_bonus)
    if share_halves and total.shape[0] % 2 == 0:
        half = total.shape[0] // 2
        idx = _top(((total[:half] + total[half:]) / 2), k, valid)
        return torch.cat([idx, idx])
    return _top(total, k, valid)


def _top(score: torch.Tensor, k: int, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return score.topk(k, dim=1, sorted=False).indices
    idx = score.topk(k, dim=1, sorted=True).indices
    positions = torch.arange(k, device=idx.device)
    return torch.where(positions < valid, idx, idx[:, :1])


def fresh_staleness(x: torch.Tensor) -> torch.Tensor:
    """All tokens just recomputed: a zero `[B, N]` staleness counter for `x` ([B, N, ...])."""
    return x.new_zeros(x.shape[:2], dtype=torch.float32)
