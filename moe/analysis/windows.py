"""Held-out token windows per corpus source, for analysing a trained model.

The model and its config come from ``moe.checkpoint.load_model`` (a run folder, step folder or
consolidated file)."""

from __future__ import annotations

import copy

import numpy as np
import torch

from moe.config import Config, ConfigError, apply_overrides

DATA_PREFIX = "--data."


def with_data(cfg: Config, tokenizer, overrides: list[str]) -> Config:
    """``cfg`` (a loaded run's) with ``--data.key=value`` ``overrides``: the text an analysis
    reads (an imported run's data section is a placeholder: point it at local files). The
    model keeps its tokenizer whatever the data: ``data.tokenizer`` becomes the run's
    (``tokenizer``, a tokenizer.json path) when the overrides change the data and the run
    trained its own. ConfigError (one line) for any other key or a new tokenizer."""
    others = [o for o in overrides if not o.startswith(DATA_PREFIX)]
    if others:
        raise ConfigError(f"unknown argument(s) {' '.join(others)}: an analysis overrides only "
                          "--data.key=value (the text it reads)")
    if any(o.startswith(DATA_PREFIX + "tokenizer=") for o in overrides):
        raise ConfigError("--data.tokenizer: an analysis tokenises with the run's own "
                          "tokenizer (the model's vocabulary)")
    if not overrides:
        return cfg
    cfg = copy.deepcopy(cfg)
    if cfg.data.tokenizer is None:
        if tokenizer is None:
            raise ConfigError("--data.*: the run has no tokenizer.json to read other data "
                              "with")
        cfg.data.tokenizer = str(tokenizer)
    return apply_overrides(cfg, overrides).validate()


def _windows(stream: np.ndarray, length: int, n: int) -> torch.Tensor:
    """Up to ``n`` non-overlapping windows of ``length`` tokens, spread evenly over the stream."""
    total = (len(stream) - 1) // length
    if total <= 0:
        return torch.zeros(0, length, dtype=torch.long)
    idx = np.unique(np.linspace(0, total - 1, num=min(n, total)).round().astype(np.int64))
    rows = [np.asarray(stream[i * length: i * length + length]) for i in idx]
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def source_windows(cfg: Config, data, length: int, n: int,
                   min_windows: int = 8) -> dict[str, tuple[torch.Tensor, str]]:
    """Held-out windows per source: {source: (windows [m, length + 1], split)}.

    The val split of the token cache mixes the sources, so each source's val documents (the
    same stable-hash split the pipeline uses, see moe/data/split.py) are tokenized here with the
    cached tokenizer, each followed by <|endoftext|> as in the cache. A source with fewer than
    ``min_windows`` val windows falls back to windows of its train stream (split="train").
    """
    from moe.data import open_corpus, split_names

    docs = open_corpus(cfg.data).load()
    out = {}
    for source, items in docs.items():
        flags = split_names([name for name, _ in items], cfg.data.val_fraction, source)
        texts = [text for (_, text), is_val in zip(items, flags) if is_val]
        ids: list[int] = []
        for enc in data.tokenizer.encode_batch(texts):
            ids.extend(enc)
            ids.append(data.tokenizer.eot_id)
        w = _windows(np.asarray(ids, dtype=np.int64), length + 1, n)
        split = "val"
        if len(w) < min_windows and source in data.train:
            w, split = _windows(data.train[source], length + 1, n), "train"
        out[source] = (w, split)
    return out


def val_windows(data, length: int, n: int) -> torch.Tensor:
    """Up to ``n`` windows of ``length`` tokens from the (mixed) val stream."""
    return _windows(data.val, length, n)
