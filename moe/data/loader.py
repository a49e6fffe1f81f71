"""Packed fixed-length training windows over token streams, with exact per-source epochs.

Window ``i`` of a stream covers tokens ``[i*L, i*L + L + 1)`` (L = seq_len): consecutive windows
share one token so their (input, target) pairs tile the stream with no gap. Windows ignore
document boundaries; the <|endoftext|> separators tell the model where documents end.

One *pass* holds every window of source ``s`` exactly ``round(epochs[s] * n_windows_s)`` times
(whole epochs repeat all windows; the fractional rest is the first part of a seeded permutation
of that source's windows), shuffled with ``numpy.random.default_rng([seed, pass_index])``. So a
pass is fully determined by (seed, pass index), and the loader's state is just those plus a
position, which makes resuming exact.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch


def n_windows(tokens: np.ndarray, seq_len: int) -> int:
    return max(0, (len(tokens) - 1) // seq_len)


def _window_batch(tokens: list[np.ndarray], src: np.ndarray, win: np.ndarray,
                  seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tokens[s][w * seq_len: w * seq_len + seq_len + 1] for s, w in zip(src, win)]
    batch = np.stack(rows).astype(np.int64)
    # Separate contiguous tensors: callers may .view() them or move them to a device.
    return torch.from_numpy(batch[:, :-1].copy()), torch.from_numpy(batch[:, 1:].copy())


class PackedLoader:
    """Shuffled windows from several token sources, each repeated its number of epochs."""

    def __init__(self, sources: Mapping[str, np.ndarray], epochs: Mapping[str, float],
                 seq_len: int, seed: int):
        if set(sources) != set(epochs):
            raise ValueError(f"epochs keys {sorted(epochs)} must match sources {sorted(sources)}")
        if seq_len <= 0:
            raise ValueError(f"seq_len={seq_len} must be > 0")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0 (it seeds numpy's default_rng)")
        self.names = sorted(sources)  # fixed order: dict order must not change the shuffle
        self.seq_len, self.seed = seq_len, seed
        self._tokens = [sources[s] for s in self.names]
        self.windows = {s: n_windows(sources[s], seq_len) for s in self.names}
        self.counts = {}  # window uses of each source per pass
        for s in self.names:
            e = float(epochs[s])
            if e < 0:
                raise ValueError(f"epochs[{s!r}]={e} must be >= 0")
            if e > 0 and self.windows[s] == 0:
                raise ValueError(f"source {s!r} has {len(sources[s])} tokens, too short for one "
                                 f"window of seq_len+1={seq_len + 1}: add data or lower seq_len")
            # Round half up (Python's round() would send 0.5 to 0).
            self.counts[s] = math.floor(e * self.windows[s] + 0.5)
        self.pass_len = sum(self.counts.values())
        if self.pass_len == 0:
            raise ValueError("a pass holds no windows (all epochs too small): raise the epochs")
        self.pass_index, self.position = 0, 0
        self._order = self._pass_order(0)

    def _pass_order(self, pass_index: int) -> tuple[np.ndarray, np.ndarray]:
        """(source index, window index) for every sample of one pass, in order."""
        rng = np.random.default_rng([self.seed, pass_index])
        src, win = [], []
        for i, s in enumerate(self.names):
            n, count = self.windows[s], self.counts[s]
            if count == 0:
                continue
            full, rest = divmod(count, n)
            parts = [np.arange(n)] * full
            if rest:
                parts.append(rng.permutation(n)[:rest])
            w = np.concatenate(parts)
            src.append(np.full(len(w), i)), win.append(w)
        perm = rng.permutation(self.pass_len)
        return np.concatenate(src)[perm], np.concatenate(win)[perm]

    def next_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Next ``n`` windows as int64 (x, y), each [n, seq_len]; y is x shifted by one token."""
        if n <= 0:
            raise ValueError(f"batch size n={n} must be > 0")
        src, win = [], []
        while n > 0:
            if self.position == self.pass_len:  # a batch may straddle two passes
                self.pass_index += 1
                self.position = 0
                self._order = self._pass_order(self.pass_index)
            take = min(n, self.pass_len - self.position)
            sl = slice(self.position, self.position + take)
            src.append(self._order[0][sl]), win.append(self._order[1][sl])
            self.position += take
            n -= take
        return _window_batch(self._tokens, np.concatenate(src), np.concatenate(win), self.seq_len)

    def state_dict(self) -> dict:
        # windows/counts are not needed to resume; they let load_state_dict catch changed data.
        return {"seed": self.seed, "pass_index": self.pass_index, "position": self.position,
                "seq_len": self.seq_len, "counts": dict(self.counts)}

    def load_state_dict(self, state: Mapping) -> None:
        for key in ("seed", "seq_len", "counts"):
            mine = getattr(self, key)
            if key in state and state[key] != mine:
                raise ValueError(f"loader state has {key}={state[key]} but this loader has "
                                 f"{mine}: resume with the same data, seq_len and seed")
        position = int(state["position"])
        if not 0 <= position <= self.pass_len:
            raise ValueError(f"loader state position={position} is outside a pass of "
                             f"{self.pass_len} windows")
        self.pass_index, self.position = int(state["pass_index"]), position
        self._order = self._pass_order(self.pass_index)


def val_windows(n_tokens: int, seq_len: int, n: int) -> np.ndarray:
    """``n`` window indices spread evenly over a stream of ``n_tokens``: the middle window of
    each of ``n`` equal stretches, so eval samples the whole val split (every source and,
    given enough windows, every document), not just its start."""
    have = max(0, (n_tokens - 1) // seq_len)
    if have < n:
        raise ValueError(f"validation data has {have} windows of seq_len={seq_len}, need {n}")
    return (2 * np.arange(n) + 1) * have // (2 * n)


def val_batches(tokens: np.ndarray, seq_len: int, batch_size: int,
                n_windows_total: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The validation set: ``n_windows_total`` windows spread evenly over ``tokens``
    (``val_windows``), in stream order, cut into batches of at most ``batch_size`` (the last
    may be smaller). The windows depend on the data and ``n_windows_total`` only, never on
    ``batch_size``: a token-weighted mean over the batches is the same number for any split."""
    have = n_windows(tokens, seq_len)
    if batch_size <= 0 or n_windows_total <= 0:
        raise ValueError(f"batch_size={batch_size} and n_windows={n_windows_total} must be > 0")
    if have < n_windows_total:
        raise ValueError(f"validation data has {have} windows of seq_len={seq_len}, need "
                         f"data.val_windows={n_windows_total}: lower data.val_windows or raise "
                         "data.val_fraction")
    win = val_windows(len(tokens), seq_len, n_windows_total)
    src = np.zeros(n_windows_total, dtype=np.int64)
    return [_window_batch([tokens], src[i:i + batch_size], win[i:i + batch_size], seq_len)
            for i in range(0, n_windows_total, batch_size)]
