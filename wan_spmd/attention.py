"""The one attention call of the Wan experts, where a kernel backend plugs in.

Every attention in the experts' blocks (self-attention after Ulysses' all-to-all or on TP's local
heads, and cross-attention to the text) goes through an `AttentionFn` that `parallelize` hands the
blocks, so another kernel (FlashAttention-3, fp8) is one argument, not a patch of the processors.
The layout is diffusers' (batch, seq, heads, head_dim) for inputs and output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(query (B, S_q, h, d), key (B, S_kv, h, d), value (B, S_kv, h, d)) -> (B, S_q, h, d); no mask,
no dropout, not causal, scale 1/sqrt(d)."""


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """torch's scaled_dot_product_attention, called exactly as diffusers' default ("native")
    attention backend calls it for Wan, so the result is the same bits."""
    query, key, value = (x.permute(0, 2, 1, 3) for x in (query, key, value))  # (B, h, S, d)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
    return out.permute(0, 2, 1, 3)  # (B, S, h, d)
