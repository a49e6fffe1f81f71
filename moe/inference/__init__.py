"""Inference: a static KV cache, sampling controls and the engine that drives the model.

    cache.py     KVCache (per-layer [slots, n_kv_heads, max_len, head_dim] buffers), CacheView
    sampling.py  SamplingParams, filter_logits / probs / sample (the one filter used everywhere)
    engine.py    Engine: prefill, decode, forward (S tokens per slot), truncate, stream, generate
    scheduler.py Scheduler, Request: continuous batching over the engine's slots
    speculative.py SpeculativeDecoder (a proposer guesses, the target verifies), DraftModel,
                 verify, stats
    ngram.py     NgramProposer, propose_ngram: prompt lookup (proposals copied from the context)
    spec_batch.py Speculation (a request's speculative decoding), propose_batch: speculation
                 inside the scheduler's continuous batching
    generate.py  generate(model, prompt, ...): the one-call API (imported on its own)
    server.py    the OpenAI-compatible HTTP server (FastAPI; imported on its own, not here)
    sharded.py   load_sharded: a checkpoint in a tp x pp x ep layout under torchrun, by the
                 training plan; StagedModel (imported on its own)
    distributed.py Driver, DistributedEngine, follow: rank 0 drives, the others follow
                 (imported on its own)

The decode benchmarks live in moe/bench/. The model stays plain PyTorch: the cache is passed
to ``Transformer.forward(tokens, kv_cache=...)`` and the model never imports this.
"""

from moe.inference.cache import CacheView, KVCache
from moe.inference.engine import Engine
from moe.inference.ngram import NgramProposer
from moe.inference.sampling import SamplingParams, filter_logits, probs, sample, sample_from
from moe.inference.scheduler import Request, Scheduler, static_batches
from moe.inference.speculative import SpeculativeDecoder, SpeculativeStats

__all__ = ["CacheView", "KVCache", "Engine", "SamplingParams", "filter_logits", "probs", "sample",
           "sample_from", "Request", "Scheduler", "static_batches", "SpeculativeDecoder",
           "SpeculativeStats", "NgramProposer"]
