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

Options for imported families (moe/hf/import_hf.py), both off by default: ``qkv_bias`` (biases
on wq, wk, wv; Qwen2) and ``qk_norm``: an RMSNorm on queries and keys before the rotary
embedding, ``"head"`` over each head's ``head_dim`` with one weight shared by the heads (Qwen3;
works unchanged on a tensor-parallel shard of whole heads), or ``"projection"`` over the whole
q / k projection (OLMoE; it needs every head, so tensor parallelism refuses it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe.model.init import ONES, ZEROS, Init, trunc_normal
from moe.model.layers import RMSNorm, apply_rotary

QK_NORMS = ("none", "head", "projection")


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 qk_norm: str = "none", qkv_bias: bool = False, norm_eps: float = 1e-5):
        super().__init__()
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm {qk_norm!r}: use one of {', '.join(QK_NORMS)}")
        self.head_dim = head_dim
        self.qk_norm = qk_norm
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.q_norm = self.k_norm = None
        if qk_norm != "none":
            per_head = qk_norm == "head"
            self.q_norm = RMSNorm(head_dim if per_head else n_heads * head_dim, norm_eps)
            self.k_norm = RMSNorm(head_dim if per_head else n_kv_heads * head_dim, norm_eps)

    def init_rules(self, std: float, out_std: float) -> dict[str, Init]:
        rules = {"wq.weight": trunc_normal(std), "wk.weight": trunc_normal(std),
                 "wv.weight": trunc_normal(std), "wo.weight": trunc_normal(out_std)}
        if self.wq.bias is not None:
            rules.update({f"{w}.bias": ZEROS for w in ("wq", "wk", "wv")})
        if self.q_norm is not None:
            rules.update({"q_norm.weight": ONES, "k_norm.weight": ONES})
        return rules

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache=None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, S, dim]; cos, sin: [S, D], or [B, S, (1,) D] per-sequence positions (cached)."""
        b, s, _ = x.shape
        q, k = self.wq(x), self.wk(x)  # [B, S, Hq * D], [B, S, Hkv * D]
        if self.qk_norm == "projection":  # OLMoE: over the whole projection, before the view
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, s, -1, self.head_dim)  # [B, S, Hq, D]
        k = k.view(b, s, -1, self.head_dim)  # [B, S, Hkv, D]
        v = self.wv(x).view(b, s, -1, self.head_dim)
        if self.qk_norm == "head":  # Qwen3: over each head's D
            q, k = self.q_norm(q), self.k_norm(k)
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
