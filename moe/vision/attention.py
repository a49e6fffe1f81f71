"""Attention over another sequence, and Flamingo's gated cross-attention block.

``CrossAttention`` is bidirectional attention of queries ``x`` over ``context`` (the ViT's and
the resampler's self-attention pass ``context=x``). ``GatedCrossAttentionBlock`` is what
Flamingo (Alayrac et al. 2022, eq. 1 and Fig. 4) inserts before a frozen language-model layer:

    y = y + tanh(alpha_attn) * CrossAttn(norm(y), media)
    y = y + tanh(alpha_ffn)  * FFN(norm(y))

with both gates initialised at 0, so at initialisation the block is the identity and the
model's logits are the text-only model's exactly. A text token sees only the media its mask
allows (``media_mask``): one that sees no image gets a cross-attention output of exactly 0
("attends to nothing"), not the average of every latent a fully masked softmax would give.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe.model.init import ZEROS, Init, prefixed, trunc_normal
from moe.model.layers import FeedForward, RMSNorm


class CrossAttention(nn.Module):
    """Queries from ``x`` [B, S, dim], keys and values from ``context`` [B, M, kv_dim];
    grouped K/V heads as the text attention (n_kv_heads=1: multi-query). No positions: the
    resampler's latents carry where things are."""

    def __init__(self, dim: int, kv_dim: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(kv_dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(kv_dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)

    def init_rules(self, std: float, out_std: float) -> dict[str, Init]:
        return {"wq.weight": trunc_normal(std), "wk.weight": trunc_normal(std),
                "wv.weight": trunc_normal(std), "wo.weight": trunc_normal(out_std)}

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask: [B, 1, S, M] bool (True: may attend), or None (every context position)."""
        b, s, _ = x.shape
        m = context.shape[1]
        q = self.wq(x).view(b, s, -1, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = self.wk(context).view(b, m, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, M, D]
        v = self.wv(context).view(b, m, -1, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


def media_mask(media_pos: torch.Tensor, positions: torch.Tensor, n_latents: int,
               attend: str = "last") -> tuple[torch.Tensor, torch.Tensor]:
    """Which image latents each text token may attend to.

    media_pos: [B, N] the position of the first token that sees image n (the image sits just
    before it), -1 for no image (padding); positions: [B, S] or [S] each token's position.
    ``attend="last"``: a token sees the latest image at or before it (Flamingo's default);
    ``"all"``: every such image. Returns ``mask`` [B, 1, S, N * n_latents] for
    ``CrossAttention`` and ``seen`` [B, S, 1] (whether the token sees any image). A row that
    sees nothing is all True in ``mask`` (a softmax over nothing is NaN) and its output is
    zeroed by the caller through ``seen``.
    """
    if positions.dim() == 1:
        positions = positions.expand(media_pos.shape[0], -1)
    mp = media_pos[:, None, :]  # [B, 1, N]
    visible = (mp >= 0) & (mp <= positions[:, :, None])  # [B, S, N]
    if attend == "last":
        latest = torch.where(visible, mp, -1).amax(-1, keepdim=True)  # [B, S, 1]
        visible = visible & (mp == latest)
    seen = visible.any(-1, keepdim=True)  # [B, S, 1]
    visible = visible | ~seen
    return visible.repeat_interleave(n_latents, dim=-1)[:, None], seen


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's GATED XATTN-DENSE block (see the module doc). Names (an API):
    ``attn_norm``, ``attn.{wq,wk,wv,wo}``, ``attn_gate`` [1], ``ffn_norm``, ``ffn.{w1,w2[,w3]}``,
    ``ffn_gate`` [1]."""

    def __init__(self, dim: int, media_dim: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 ffn_hidden: int, activation: str, norm_eps: float = 1e-5):
        super().__init__()
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.attn = CrossAttention(dim, media_dim, n_heads, n_kv_heads, head_dim)
        self.attn_gate = nn.Parameter(torch.empty(1))
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.ffn = FeedForward(dim, ffn_hidden, activation)
        self.ffn_gate = nn.Parameter(torch.empty(1))

    def init_rules(self, std: float, out_std: float) -> dict[str, Init]:
        return {**prefixed("attn_norm", self.attn_norm.init_rules()),
                **prefixed("attn", self.attn.init_rules(std, out_std)),
                **prefixed("ffn_norm", self.ffn_norm.init_rules()),
                **prefixed("ffn", self.ffn.init_rules(std, out_std)),
                "attn_gate": ZEROS, "ffn_gate": ZEROS}

    def gates(self) -> tuple[float, float]:
        """|tanh| of the attention and feed-forward gates: how much the block adds."""
        return (float(self.attn_gate.detach().tanh().abs()),
                float(self.ffn_gate.detach().tanh().abs()))

    def forward(self, x: torch.Tensor, media: torch.Tensor, mask: torch.Tensor,
                seen: torch.Tensor) -> torch.Tensor:
        """x: [B, S, dim]; media: [B, M, media_dim]; mask, seen: from ``media_mask``."""
        a = self.attn(self.attn_norm(x), media, mask)
        a = a.masked_fill(~seen, 0.0)  # text that sees no image attends to nothing
        x = x + torch.tanh(self.attn_gate).to(x.dtype) * a
        return x + torch.tanh(self.ffn_gate).to(x.dtype) * self.ffn(self.ffn_norm(x))


def residual_std(std: float, depth: int) -> float:
    """GPT-2's scaled init of residual output projections: std / sqrt(2 * depth)."""
    return std / math.sqrt(2 * max(depth, 1))
