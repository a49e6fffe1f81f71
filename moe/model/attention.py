"""Causal self-attention with grouped key/value heads.

n_kv_heads = 1 is multi-query attention (Shazeer 2019): one K/V head shared by all query heads,
so the KV cache is n_heads times smaller; n_kv_heads = n_heads is ordinary multi-head attention.
Shapes are read from the tensors (``view(b, s, -1, head_dim)``) so a tensor-parallel shard that
holds fewer heads runs the same code.

Incremental decoding (moe/inference/cache.py) passes ``kv_cache``: an object whose
``update(k, v)`` stores this call's keys and values ``[B, Hkv, S, D]`` at the tokens' positions
and returns every cached key and value of those sequences ``[B, Hkv, L, D]``, and ``mask``
``[B, 1, S, L]`` (True: may attend), which hides the future and stale cache entries. Without
``kv_cache`` the forward is the plain causal one, unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe.model.init import Init, trunc_normal
from moe.model.layers import apply_rotary


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)

    def init_rules(self, std: float, out_std: float) -> dict[str, Init]:
        return {"wq.weight": trunc_normal(std), "wk.weight": trunc_normal(std),
                "wv.weight": trunc_normal(std), "wo.weight": trunc_normal(out_std)}

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache=None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, S, dim]; cos, sin: [S, D], or [B, S, (1,) D] per-sequence positions (cached)."""
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, -1, self.head_dim)  # [B, S, Hq, D]
        k = self.wk(x).view(b, s, -1, self.head_dim)  # [B, S, Hkv, D]
        v = self.wv(x).view(b, s, -1, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
        if kv_cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                 enable_gqa=q.shape[1] != k.shape[1])
        else:
            k, v = kv_cache.update(k, v)  # [B, Hkv, L, D]: the cached context and these tokens
            hq, hkv = q.shape[1], k.shape[1]
            if s == 1 and hq != hkv:
                # One token per sequence: fold each KV head's query heads into query rows
                # (head h uses KV head h // (hq / hkv), as enable_gqa): one small attention
                # per KV head, not the grouped kernel (half the time at batch 1). The mask
                # [B, 1, 1, L] broadcasts over the rows. Reference: the branch below.
                out = F.scaled_dot_product_attention(q.reshape(b, hkv, hq // hkv, -1), k, v,
                                                     attn_mask=mask).reshape(b, hq, 1, -1)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                     enable_gqa=hq != hkv)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))
