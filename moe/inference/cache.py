"""The static KV cache: preallocated per-layer key/value buffers for a fixed number of slots.

One slot holds one sequence. Per attention layer (keyed like ``model.layers``):

    k[key], v[key]: [n_slots, n_kv_heads, max_len, head_dim]

With multi-query attention (n_kv_heads = 1) a token costs ``2 * n_layers * head_dim`` numbers,
n_heads times fewer than multi-head attention (Shazeer 2019): ``bytes_per_token`` measures it
from the allocated tensors. ``lengths[slot]`` is how many tokens the slot holds; positions are
per slot, so sequences of different lengths share a batch, and a slot is reset or rolled back
by setting its length (``truncate``): entries past the length are never read (the attention
mask hides them) and the next tokens overwrite them. That is all speculative decoding needs to
reject drafted tokens, and all a continuous-batching scheduler needs to reuse a slot.

As in gpt-fast (pytorch-labs/gpt-fast) the buffers are allocated once, written in place with an
index_put at the tokens' positions, and the mask does the causal work; unlike gpt-fast every
row of a batch has its own positions. ``view(slots, n_new)`` is what one forward of the model
gets (``Transformer.forward(tokens, kv_cache=view)``); ``advance`` moves the lengths after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


class KVCache:
    def __init__(self, model: nn.Module, n_slots: int, max_len: int | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        """Buffers for every attention layer of ``model`` (a ``Transformer``, or a stage of
        one: only the layers it holds). Head counts are read from the (possibly tensor-
        parallel sharded) ``wk`` weights; ``max_len`` defaults to ``model.cfg.max_seq_len``."""
        cfg = model.cfg
        max_len = cfg.max_seq_len if max_len is None else max_len
        if n_slots < 1:
            raise ValueError(f"a KV cache needs at least one slot, not n_slots={n_slots}")
        if not 1 <= max_len <= cfg.max_seq_len:
            raise ValueError(f"KV cache max_len={max_len} must be in [1, model.max_seq_len="
                             f"{cfg.max_seq_len}] (rotary positions end there)")
        param = next(model.parameters())
        dtype = dtype or param.dtype
        device = torch.device(device) if device is not None else param.device
        self.n_slots, self.max_len, self.head_dim = n_slots, max_len, cfg.head_size
        self.k: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        for key, layer in model.layers.items():
            n_kv = layer.attention.wk.weight.shape[0] // cfg.head_size
            shape = (n_slots, n_kv, max_len, cfg.head_size)
            self.k[key] = torch.zeros(shape, dtype=dtype, device=device)
            self.v[key] = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * n_slots
        self.device = device
        self._arange = torch.arange(max_len, device=device)

    # --- size ------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes held by the allocated key and value buffers."""
        return sum(t.nbytes for t in (*self.k.values(), *self.v.values()))

    def bytes_per_token(self) -> float:
        """Cache bytes one token of one sequence occupies (measured: allocated bytes / slots
        / max_len): 2 * layers * n_kv_heads * head_dim * element size."""
        return self.nbytes / (self.n_slots * self.max_len)

    # --- slots -----------------------------------------------------------------------------

    def reset(self, slot: int) -> None:
        """Forget the slot's sequence (its buffers are overwritten by the next one)."""
        self.truncate(slot, 0)

    def truncate(self, slot: int, length: int) -> None:
        """Roll the slot back to its first ``length`` tokens (rejected draft tokens)."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot roll slot {slot} back to {length} tokens: it holds "
                             f"{self.lengths[slot]}")
        self.lengths[slot] = length

    def advance(self, slots: Sequence[int], n_tokens: Sequence[int]) -> None:
        """After a forward: slot ``slots[b]`` now holds ``n_tokens[b]`` more tokens."""
        for slot, n in zip(slots, n_tokens):
            self.lengths[slot] += n

    def view(self, slots: Sequence[int], n_new: int) -> CacheView:
        """What one forward of ``n_new`` tokens per row needs: row b appends to slot
        ``slots[b]`` at positions ``lengths[slot] ..``. Rows of a ragged batch may pad past
        their real tokens (positions stay inside the buffer; a padded entry lies past the
        length ``advance`` records, so it is never read)."""
        slots = list(slots)
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots {slots} repeat a slot")
        starts = [self.lengths[s] for s in slots]
        if max(starts) + n_new > self.max_len:
            worst = slots[starts.index(max(starts))]
            raise ValueError(f"slot {worst} holds {self.lengths[worst]} tokens: {n_new} more "
                             f"exceed the cache's max_len={self.max_len}")
        dev = self.device
        kv_len = max(starts) + n_new  # keys past every row's last position are never needed
        if len(set(starts)) == 1:
            input_pos = self._arange[starts[0]:kv_len].expand(len(slots), n_new)
        else:
            input_pos = torch.tensor(starts, device=dev)[:, None] + self._arange[:n_new]  # [B, S]
        if n_new == 1 and len(set(starts)) == 1:
            attn_mask = None  # one new token per row, all rows alike: every key is visible
        else:
            # [B, 1, S, L]: a token at position p sees cache positions j <= p of its own slot.
            attn_mask = self._arange[None, None, None, :kv_len] <= input_pos[:, None, :, None]
        if slots == list(range(slots[0], slots[0] + len(slots))):
            rows = slice(slots[0], slots[0] + len(slots))  # contiguous: views, no gather
        else:
            rows = torch.tensor(slots, device=dev)
        return CacheView(self, rows, starts, input_pos, attn_mask, kv_len)


@dataclass
class CacheView:
    """One forward's window on a ``KVCache`` (the ``kv_cache`` of ``Transformer.forward``)."""

    cache: KVCache
    rows: slice | torch.Tensor  # the slots of the batch rows
    starts: list[int]  # each row's first new position (host ints)
    input_pos: torch.Tensor  # [B, S] positions of the new tokens
    attn_mask: torch.Tensor | None  # [B, 1, S, kv_len] (None: every key visible)
    kv_len: int

    def layer(self, key: str) -> _LayerView:
        return _LayerView(self, self.cache.k[key], self.cache.v[key])


class _LayerView:
    def __init__(self, view: CacheView, k: torch.Tensor, v: torch.Tensor):
        self.view, self.k, self.v = view, k, v

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, Hkv, S, D] at the rows' positions; return [B, Hkv, kv_len, D]."""
        view = self.view
        pos, rows, n = view.input_pos, view.rows, view.kv_len
        out = []
        for buf, new in ((self.k, k), (self.v, v)):
            new = new.to(buf.dtype)
            if isinstance(rows, slice):
                part = buf[rows]  # a view of the batch's slots
                if pos.shape == (1, 1):  # one decode step of one sequence: a plain copy
                    p = view.starts[0]
                    part[:, :, p:p + 1] = new
                else:
                    b = torch.arange(pos.shape[0], device=pos.device)[:, None]
                    part[b, :, pos] = new.transpose(1, 2)  # indexed as [B, S, Hkv, D]
                out.append(part[:, :, :n].to(k.dtype))
            else:
                buf[rows[:, None], :, pos] = new.transpose(1, 2)
                out.append(buf[rows, :, :n].to(k.dtype))
        return out[0], out[1]
