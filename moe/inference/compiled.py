"""The decode step under ``torch.compile``: one token per row, static shapes, one graph.

    engine = Engine(model, 1, compile=True)   # decode steps run the compiled step

As gpt-fast's ``decode_one_token`` (pytorch-labs/gpt-fast, compiled with
``mode="reduce-overhead", fullgraph=True``), every shape is fixed: the step attends over the
whole preallocated cache (``max_len`` keys, the mask hiding the positions past each row's
length, so a masked key adds exactly zero weight), the positions and slots come in as tensors,
and the new keys and values are written with an index_put at those positions. Nothing in the
step depends on a host value, so a step at any position runs the same graph: one compile per
batch size. The MoE layers take their gathered few-token path (``MoE._forward_few_gathered``),
which reads no expert id back to the host; the eager path's ``.tolist()`` is a graph break per
layer (``torch._dynamo.explain`` counts 10 breaks, 11 graphs, in configs/tiny.yaml's decode
step; 0 and 1 here).

Same tokens and logits as the eager step to float rounding (tests/test_inference_compile.py,
1e-5). What it costs and gains on a CPU: docs/benchmarks.md ("Compiled decode"). Opt-in:
compiling takes tens of seconds per batch size on a CPU. Dropless routing, fp32 or bf16
weights (not int8: ``Int8Experts`` has no gathered path), a plain ``Transformer``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moe.inference.cache import CacheView, KVCache
from moe.model.experts import GroupedExperts
from moe.model.moe import MoE


class CompiledDecode:
    def __init__(self, model: nn.Module, cache: KVCache, mode: str | None = None,
                 backend: str = "inductor"):
        """``model``'s decode step over ``cache``, compiled on first call (per batch size).
        ``mode``: torch.compile's (default: "reduce-overhead" on CUDA, where it captures a CUDA
        graph, else inductor's default). ``backend``: torch.compile's ("aot_eager" traces the
        same single graph without generating code: seconds instead of minutes, for tests)."""
        bad = [type(m.experts).__name__ for m in model.modules()
               if isinstance(m, MoE) and m.experts is not None
               and type(m.experts) is not GroupedExperts]
        if bad:
            raise ValueError(f"compiled decode runs plain GroupedExperts, not {bad[0]} "
                             "(int8 serving weights decode eagerly)")
        if mode is None and cache.device.type == "cuda" and backend == "inductor":
            mode = "reduce-overhead"
        self.model, self.cache = model, cache
        self.step = torch.compile(self._step, fullgraph=True, dynamic=False, mode=mode,
                                  backend=backend)

    def __call__(self, slots: Sequence[int], tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, 1] appended to ``slots`` (one each) -> logits [B, 1, V]."""
        cache = self.cache
        lengths = [cache.lengths[s] for s in slots]
        if len(set(slots)) != len(slots) or max(lengths) >= cache.max_len:
            cache.view(slots, 1)  # its one-line error: a repeated slot, or a full one
        dev = cache.device
        pos = torch.tensor(lengths, device=dev)[:, None]  # [B, 1]
        logits = self.step(tokens, torch.tensor(list(slots), device=dev), pos)
        cache.advance(slots, [1] * len(slots))
        return logits

    def _step(self, tokens: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The traced function: rows [B] (slots), pos [B, 1] (each row's new position)."""
        cache = self.cache
        keys = torch.arange(cache.max_len, device=pos.device)
        mask = keys[None, None, None, :] <= pos[:, None, :, None]  # [B, 1, 1, max_len]
        view = CacheView(cache, rows, [], pos, mask, cache.max_len)
        return self.model(tokens, kv_cache=view, capacity_factor=None, decode_path=True)
