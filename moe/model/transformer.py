"""Decoder-only MoE transformer (plain PyTorch; parallelism is applied from outside).

Module names are an API used by checkpoints, tensor-parallel plans, pipeline splitting and
export; keep them stable:

    tok_embeddings                         nn.Embedding [vocab, dim]
    layers.{i}.attention_norm              RMSNorm
    layers.{i}.attention.{wq,wk,wv,wo}     nn.Linear (no bias; wq/wk/wv biased with
                                           model.qkv_bias)
    layers.{i}.attention.{q_norm,k_norm}   RMSNorm, with model.qk_norm = head | projection
    layers.{i}.ffn_norm                    RMSNorm
    layers.{i}.feed_forward                MoE: router.gate, experts.{w1,w2,w3}, optional
                                           shared_experts.{w1,w2,w3}, shared_expert_gate
                                           or dense FeedForward: w1, w2, w3 (model.moe_every,
                                           model.dense_layers)
    norm                                   RMSNorm
    output                                 nn.Linear [vocab, dim] (tied: tok_embeddings.weight)

``layers`` is a ModuleDict keyed by the global layer index, so a pipeline stage can delete
the layers it does not own (and set tok_embeddings / norm / output to None) and keep the
same names. Build on the meta device, ``to_empty(device=...)``, then ``init_weights(seed)``
(``build_model`` does all three; moe/model/init.py says how weights are drawn).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moe.config import ModelConfig
from moe.model.attention import Attention
from moe.model.init import ONES, Init, init_parameters, materialize, normal, prefixed
from moe.model.layers import FeedForward, RMSNorm
from moe.model.moe import CONFIGURED_CAPACITY, MoE
from moe.model.rope import forward_tables, rope_tables


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, n_moe_layers: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_size,
                                   cfg.qk_norm, cfg.qkv_bias, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.is_moe_layer(layer_id):
            self.feed_forward = MoE(cfg, n_moe_layers)
        else:
            self.feed_forward = FeedForward(cfg.d_model, cfg.ffn_hidden, cfg.activation)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache=None,
                mask: torch.Tensor | None = None, capacity_factor=CONFIGURED_CAPACITY,
                decode_path: bool = False) -> torch.Tensor:
        """The optional arguments are for inference (see ``Transformer.forward``)."""
        if kv_cache is None:
            h = x + self.attention(self.attention_norm(x), cos, sin)
        else:
            h = x + self.attention(self.attention_norm(x), cos, sin, kv_cache, mask)
        if isinstance(self.feed_forward, MoE) and (decode_path
                                                   or capacity_factor is not CONFIGURED_CAPACITY):
            return h + self.feed_forward(self.ffn_norm(h), capacity_factor=capacity_factor,
                                         decode_path=decode_path)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
        # _weight skips nn.Embedding's own init (init_weights draws every value), which on the
        # meta device would import torch._dynamo (~2.5 s a process).
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model,
                                           _weight=torch.empty(cfg.vocab_size, cfg.d_model))
        self.layers = nn.ModuleDict({str(i): Block(cfg, i, max(n_moe, 1))
                                     for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg)  # model.rope_scaling applied (moe/model/rope.py)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_rules(self) -> dict[str, Init]:
        """The distribution of every parameter, by full name (see moe/model/init.py)."""
        cfg = self.cfg
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        rules = {"tok_embeddings.weight": normal(std), "output.weight": normal(std),
                 "norm.weight": ONES}
        for key, layer in self.layers.items():
            p = f"layers.{key}"
            rules.update(prefixed(f"{p}.attention_norm", layer.attention_norm.init_rules()))
            rules.update(prefixed(f"{p}.attention", layer.attention.init_rules(std, out_std)))
            rules.update(prefixed(f"{p}.ffn_norm", layer.ffn_norm.init_rules()))
            rules.update(prefixed(f"{p}.feed_forward",
                                  layer.feed_forward.init_rules(std, out_std)))
        return rules

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, slices_of=None) -> None:
        """Initialise every parameter and buffer; works after ``to_empty`` from meta.

        Each parameter is drawn from a generator seeded by ``(seed, its name)``, so every
        device and parallel layout starts from the same weights (``seed=None``: one drawn from
        torch's global RNG). ``slices_of``: how a sharded parameter was cut (moe/model/init.py).
        A tied head keeps the embedding's values (``to_empty`` breaks the tie; re-tied here).
        """
        cfg = self.cfg
        device = self.rope_cos.device
        if cfg.tie_embeddings and self.output is not None and self.tok_embeddings is not None:
            self.output.weight = self.tok_embeddings.weight
        self.rope_cos, self.rope_sin = rope_tables(cfg, device=device)
        init_parameters(self, self.init_rules(), seed, slices_of)

    def forward(self, tokens: torch.Tensor, kv_cache=None, *, capacity_factor=CONFIGURED_CAPACITY,
                decode_path: bool = False) -> torch.Tensor:
        """tokens: [B, S] ids (or [B, S, dim] hidden states on a later pipeline stage).
        Returns logits [B, S, vocab] (or hidden states on a stage without ``output``).

        The keyword arguments serve inference (moe/inference/); their defaults are the plain
        forward. ``kv_cache``: a view of a KV cache (``moe.inference.cache.CacheView``) with
        ``input_pos`` [B, S] (each token's position in its sequence), ``attn_mask``
        [B, 1, S, L] (None: every cached key visible) and ``layer(key)`` (the object each
        attention layer calls ``update`` on). ``capacity_factor``: the MoE layers' capacity
        factor for this call (None: dropless) instead of the config's; ``decode_path``: let
        MoE layers take their few-token path (see ``MoE.forward``).
        """
        h, cos, sin, extra = self.prepare(tokens, kv_cache, capacity_factor, decode_path)
        for key, layer in self.layers.items():
            h = self.run_layer(key, layer, h, cos, sin, kv_cache, extra)
        return self.finish(h)

    # The forward's three parts, shared with models that add to the layer loop (the vision
    # model's cross-attention, moe/vision/model.py).
    def prepare(self, tokens: torch.Tensor, kv_cache=None, capacity_factor=CONFIGURED_CAPACITY,
                decode_path: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                    dict]:
        """The embedded input, the rotary tables for its positions and the keyword
        arguments every block gets."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        s = h.shape[1]
        if s > self.rope_cos.shape[0]:
            raise ValueError(f"sequence of {s} tokens exceeds model.max_seq_len="
                             f"{self.rope_cos.shape[0]}")
        if kv_cache is None:
            # The first s rows (dynamic NTK: tables for this length; moe/model/rope.py).
            cos, sin = forward_tables(self.cfg, self.rope_cos, self.rope_sin, s)
            extra = {}
        else:
            pos = kv_cache.input_pos  # [B, S]; the cache checked pos < max_seq_len
            cos, sin = self.rope_cos, self.rope_sin
            if self.cfg.rope_scaling is not None and self.cfg.rope_scaling.type == "dynamic":
                # Hugging Face's rule: the new tokens rotate with the tables of the sequence
                # so far (its longest row); cached keys keep the rotation they were written
                # with. Below original_max_seq_len that is plain RoPE, as an uncached forward.
                cos, sin = forward_tables(self.cfg, cos, sin, int(pos.max()) + 1)
            # [B, S, 1, D]: shaped once for every layer.
            cos, sin = cos[pos].unsqueeze(2), sin[pos].unsqueeze(2)
            extra = {"mask": kv_cache.attn_mask}
        if decode_path or capacity_factor is not CONFIGURED_CAPACITY:
            extra.update(capacity_factor=capacity_factor, decode_path=decode_path)
        return h, cos, sin, extra

    @staticmethod
    def run_layer(key: str, layer: Block, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  kv_cache, extra: dict) -> torch.Tensor:
        if kv_cache is None:
            return layer(h, cos, sin, **extra)
        return layer(h, cos, sin, kv_cache=kv_cache.layer(key), **extra)

    def finish(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and head (a pipeline stage without them returns ``h``)."""
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def set_loss_scale(self, scale: float) -> None:
        """Share of the global batch in the coming micro-batch: scales injected router-loss
        gradients."""
        for m in self.moe_layers():
            m.loss_scale = scale


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu",
                seed: int | None = None) -> Transformer:
    """Build on the meta device, then (unless ``device`` is meta) materialise on ``device``
    and initialise from ``seed`` (None: a seed drawn from torch's global RNG).

    The same seed gives the same weights on every device, and the same weights as any parallel
    layout, which materialises each rank's shard of the meta model (moe/model/init.py).
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    if torch.device(device).type == "meta":
        return model
    return materialize(model, device, seed)
