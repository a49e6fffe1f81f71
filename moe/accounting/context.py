"""Memory of one long sequence: KV cache (inference) and saved activations (training).

``scripts/count_params.py`` prints these for ``--context-lengths`` (default 8192 and 32768,
GPT-4's reported pre-training and fine-tuned contexts). Whole model, one sequence, no
parallelism: tensor parallelism divides the head- and hidden-sized terms by tp (and, with
sequence parallelism, the rest); a pipeline stage holds its own layers' activations for each
micro-batch in flight.

KV cache per sequence: ``seq_len * 2 * n_layers * n_kv_heads * head_dim * bytes`` (the same
as moe/accounting/params.py's per-token figure times seq_len).

Activations: what autograd saves for backward in one forward of this code (no activation
checkpointing), counted per token and layer (``E`` = elements at ``bytes_per_element``, fp32
= always 4 bytes; tests/test_long_context.py checks the sum against the tensors autograd
actually saves on a small model, within a few percent):

    each RMSNorm (2 a layer)        input, normalised input           2 d          E
    matmul inputs                   attention-norm output (wq, wk, wv), ffn-norm output
                                    (router / dense FFN), attention output (wo)
                                                                      2 d + H hd   E
    SDPA (fused kernel)             q, k, v                           H hd + 2 Hkv hd  E
                                    logsumexp                         H            fp32
    MoE, per routed copy (top_k)    expert input, output, weighted output  3 d     E
                                    SwiGLU: gate, silu(gate), up, product  4 h     E
                                    (GELU: gate, gelu(gate)           2 h)
    router                          logits, probabilities             2 n_experts  fp32
                                    expert indices (3 per copy)       3 top_k      int64
    dense / shared-expert FFN       SwiGLU 4 ffn_hidden (GELU 2)                   E
    after the last layer            final norm (2 d) + its output (d)              E
                                    log-probabilities of the loss     vocab        fp32

Dropless routing is assumed (capacity limits shrink or pad the expert terms). Not counted:
the attention score matrix, because SDPA's fused (flash) kernels never store it: the
``attention_scores_bytes`` line is what an unfused (math) attention would add, ``n_heads *
seq_len^2`` softmax probabilities a layer, quadratic in the context. With full activation
checkpointing (``train.activation_checkpointing=full``) only each block's input is kept
(``d`` a token and layer) plus one block's activations while it is recomputed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moe.config import ModelConfig


@dataclass(frozen=True)
class ContextMemory:
    seq_len: int
    bytes_per_element: int
    kv_cache_bytes: int  # one sequence of seq_len tokens
    kv_cache_bytes_mha: int  # the same with n_kv_heads = n_heads
    activation_bytes: int  # saved for backward, one sequence, no activation checkpointing
    activation_bytes_full_ac: int  # train.activation_checkpointing=full
    attention_scores_bytes: int  # what unfused attention would add (n_heads * seq_len^2 / layer)
    logits_bytes: int  # the loss's fp32 log-probabilities, part of activation_bytes

    def to_dict(self) -> dict:
        return asdict(self)


def activation_bytes_per_token(cfg: ModelConfig, bytes_per_element: int = 2) -> tuple[int, int]:
    """``(all layers' saved activations, the loss's log-probabilities)`` in bytes per token:
    the table in the module docstring."""
    d, hd, bpe = cfg.d_model, cfg.head_size, bytes_per_element
    h, hkv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    per_hidden = 4 if cfg.activation == "swiglu" else 2
    total = 0
    for i in range(cfg.n_layers):
        elems = 4 * d + 2 * d + h + (h + 2 * hkv)
        fp32, int64 = cfg.n_heads, 0
        if cfg.is_moe_layer(i):
            k = cfg.top_k
            elems += k * (3 * d + per_hidden * cfg.expert_hidden)
            fp32 += 2 * cfg.n_experts
            int64 += 3 * k
            n_shared = getattr(cfg, "n_shared_experts", 0)
            if n_shared:
                shared = getattr(cfg, "shared_expert_hidden", None) or cfg.expert_hidden
                elems += per_hidden * n_shared * shared
        else:
            elems += per_hidden * cfg.ffn_hidden
        total += elems * bpe + fp32 * 4 + int64 * 8
    logits = cfg.vocab_size * 4
    return total + 3 * d * bpe + logits, logits


def context_memory(cfg: ModelConfig, seq_len: int, bytes_per_element: int = 2) -> ContextMemory:
    """KV cache and activation memory of one ``seq_len``-token sequence (module docstring)."""
    kv = 2 * cfg.n_layers * cfg.head_size * bytes_per_element * seq_len
    act, logits = activation_bytes_per_token(cfg, bytes_per_element)
    recompute = act - logits - 3 * cfg.d_model * bytes_per_element
    return ContextMemory(
        seq_len=seq_len, bytes_per_element=bytes_per_element,
        kv_cache_bytes=kv * cfg.n_kv_heads, kv_cache_bytes_mha=kv * cfg.n_heads,
        activation_bytes=act * seq_len,
        # Block inputs of every layer, plus one layer's activations during its recompute
        # (and the head's, which is not checkpointed).
        activation_bytes_full_ac=(cfg.n_layers * cfg.d_model * bytes_per_element
                                  + recompute // cfg.n_layers + 3 * cfg.d_model
                                  * bytes_per_element + logits) * seq_len,
        attention_scores_bytes=cfg.n_layers * cfg.n_heads * seq_len * seq_len * bytes_per_element,
        logits_bytes=logits * seq_len)
