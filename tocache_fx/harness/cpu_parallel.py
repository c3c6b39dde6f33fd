"""diffusers' context parallelism on a machine without accelerators (CPU, gloo).

Two workarounds diffusers 0.42 needs there, for the tests and `examples/benchmark_cp.py`:

* `_resolve_parallel_config` computes `rank % torch.accelerator.device_count()`, which is
  0 without accelerators: `device_count` is made to return 1.
* Ring attention needs the log-sum-exp of each partial attention; the `native` backend
  raises "Native attention does not support return_lse=True" and the LSE-capable backends
  have no CPU kernels, so `return_lse=True` is served by
  `aten._scaled_dot_product_flash_attention_for_cpu` (forward only; a boolean mask becomes
  the additive one that kernel takes).

Example:
    >>> from tocache_fx.harness.cpu_parallel import patch_for_cpu
    >>> patch_for_cpu()   # before model.enable_parallelism(...)
"""

from __future__ import annotations

import torch

__all__ = ["patch_for_cpu"]


def patch_for_cpu() -> None:
    """Apply both workarounds of the module docstring (idempotent)."""
    from diffusers.models import attention_dispatch as dispatch

    torch.accelerator.device_count = lambda: 1
    original = dispatch._native_attention_forward_op
    if getattr(original, "_tocache_lse", False):
        return

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                   scale=None, enable_gqa=False, return_lse=False, _save_ctx=True,
                   _parallel_config=None):
        if not return_lse:
            return original(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale,
                            enable_gqa, return_lse, _save_ctx=_save_ctx,
                            _parallel_config=_parallel_config)
        q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))  # [B, H, S, D]
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # the kernel adds masks
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(~attn_mask,
                                                                              float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
        return out.permute(0, 2, 1, 3), lse.permute(0, 2, 1)  # [B, S, H, D], [B, S, H]

    forward_op._tocache_lse = True
    dispatch._native_attention_forward_op = forward_op
