"""Small building blocks shared by every layer: RMSNorm, rotary embeddings, the dense FFN.

Conventions follow Hugging Face's Mixtral so that weights export with identical logits:
RMSNorm computes in fp32 and scales after casting back; rotary uses the rotate-half layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe.model.init import ONES, Init, trunc_normal


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), the mean taken in fp32 (Mixtral's MixtralRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def init_rules(self) -> dict[str, Init]:
        return {"weight": ONES}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_tables(head_dim: int, max_seq_len: int, theta: float,
                  device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [max_seq_len, head_dim] in fp32, rotate-half layout (RoFormer, HF
    Llama)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
                               / head_dim)
    t = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, S, H, D]; cos, sin: [S, D] (one table for every sequence), or [B, S, D] or
    [B, S, 1, D] (each sequence at its own positions, as a KV-cached decode step is)."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    if cos.dim() == 3:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin


def activate(gate: torch.Tensor, up: torch.Tensor | None) -> torch.Tensor:
    """SwiGLU silu(gate) * up (Shazeer 2020) when `up` is given, else GELU(gate)."""
    if up is None:
        return F.gelu(gate)
    return F.silu(gate) * up


class FeedForward(nn.Module):
    """Dense feed-forward for non-MoE layers: w2(act(w1 x) [* w3 x]); Llama/Mixtral names."""

    def __init__(self, dim: int, hidden: int, activation: str = "swiglu"):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False) if activation == "swiglu" else None

    def init_rules(self, std: float, out_std: float) -> dict[str, Init]:
        rules = {"w1.weight": trunc_normal(std), "w2.weight": trunc_normal(out_std)}
        if self.w3 is not None:
            rules["w3.weight"] = trunc_normal(std)
        return rules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(activate(self.w1(x), self.w3(x) if self.w3 is not None else None))
