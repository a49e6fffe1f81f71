"""Decoder-only MoE transformer (plain PyTorch; parallelism is applied from outside).

Module names are an API used by checkpoints, tensor-parallel plans, pipeline splitting and
export; keep them stable:

    tok_embeddings                         nn.Embedding [vocab, dim]
    layers.{i}.attention_norm              RMSNorm
    layers.{i}.attention.{wq,wk,wv,wo}     nn.Linear (no bias)
    layers.{i}.ffn_norm                    RMSNorm
    layers.{i}.feed_forward                MoE: router.gate, experts.{w1,w2,w3}
                                           or dense FeedForward: w1, w2, w3
    norm                                   RMSNorm
    output                                 nn.Linear [vocab, dim] (tied: tok_embeddings.weight)

``layers`` is a ModuleDict keyed by the global layer index, so a pipeline stage can delete
the layers it does not own (and set tok_embeddings / norm / output to None) and keep the
same names. Build on the meta device, ``to_empty(device=...)``, then ``init_weights()``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moe.config import ModelConfig
from moe.model.attention import Attention
from moe.model.layers import FeedForward, RMSNorm, rotary_tables
from moe.model.moe import MoE


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, n_moe_layers: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_size)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.is_moe_layer(layer_id):
            self.feed_forward = MoE(cfg, n_moe_layers)
        else:
            self.feed_forward = FeedForward(cfg.d_model, cfg.ffn_hidden, cfg.activation)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i, max(n_moe, 1))
                                     for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rotary_tables(cfg.head_size, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer; works after ``to_empty`` from meta.

        Normal(0, init_std) everywhere, residual output projections (attention.wo, w2) scaled by
        1/sqrt(2 * n_layers) (GPT-2), norms to one.
        """
        cfg = self.cfg
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        device = self.rope_cos.device
        if cfg.tie_embeddings and self.output is not None and self.tok_embeddings is not None:
            self.output.weight = self.tok_embeddings.weight  # to_empty() breaks the tie
        self.rope_cos, self.rope_sin = rotary_tables(cfg.head_size, cfg.max_seq_len,
                                                     cfg.rope_theta, device=device)
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight, std=std)
        for layer in self.layers.values():
            layer.attention_norm.reset_parameters()
            layer.ffn_norm.reset_parameters()
            layer.attention.init_weights(std, out_std)
            layer.feed_forward.init_weights(std, out_std)
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None and not self.cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, std=std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, S] ids (or [B, S, dim] hidden states on a later pipeline stage).
        Returns logits [B, S, vocab] (or hidden states on a stage without ``output``)."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        s = h.shape[1]
        if s > self.rope_cos.shape[0]:
            raise ValueError(f"sequence of {s} tokens exceeds model.max_seq_len="
                             f"{self.rope_cos.shape[0]}")
        cos, sin = self.rope_cos[:s], self.rope_sin[:s]
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def set_loss_scale(self, scale: float) -> None:
        """Share of the global batch in the coming micro-batch: scales injected router-loss grads."""
        for m in self.moe_layers():
            m.loss_scale = scale


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> Transformer:
    """Build, materialise on ``device`` and initialise (uses the global torch RNG).

    Accelerators: built on the meta device first, so no full-size default init runs there.
    CPU: built directly, because torch's init functions on meta tensors import torch._dynamo
    (~2 s per process, paid by every spawned test rank) and CPU default init is cheap.
    """
    if torch.device(device).type == "cpu":
        model = Transformer(cfg)
        model.init_weights()
        return model
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.init_weights()  # re-ties tied embeddings, which to_empty() unties
    return model
