"""Load a trained run for analysis, and cut held-out token windows per corpus source."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moe.checkpoint import latest_good_checkpoint, load_checkpoint, resolve_checkpoint
from moe.config import Config, from_dict
from moe.model import Transformer, build_model

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LoadedRun:
    cfg: Config  # the checkpoint's own config (what the weights were trained with)
    model: Transformer  # in eval mode
    checkpoint: Path
    step: int


def resolve_cache_dir(cache_dir: str) -> str:
    """A relative ``data.cache_dir`` is relative to where training ran, normally the repository
    root: use that when it does not exist relative to the current folder."""
    p = Path(cache_dir)
    if p.is_absolute() or p.exists() or not (ROOT / p).exists():
        return cache_dir
    return str(ROOT / p)


def load_run(run_dir: str | Path | None = None, checkpoint: str | Path | None = None,
             device: str = "cpu", cache_dir: str | None = None) -> LoadedRun:
    """Config and weights from ``checkpoint`` (default: the run folder's newest checkpoint
    that verifies; broken newer ones are skipped with a warning, see resolve_checkpoint)."""
    if checkpoint is None:
        if run_dir is None:
            raise ValueError("give a run folder or a checkpoint")
        checkpoint = latest_good_checkpoint(run_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"no checkpoint in {Path(run_dir) / 'checkpoints'}: train "
                                    f"the run first or pass --checkpoint")
    else:
        checkpoint = resolve_checkpoint(checkpoint)
    state = load_checkpoint(checkpoint, map_location=device)
    cfg = from_dict(state["config"])
    cfg.data.cache_dir = cache_dir or resolve_cache_dir(cfg.data.cache_dir)
    cfg.validate()
    model = build_model(cfg.model, device)
    model.load_state_dict(state["model"])
    model.eval()
    return LoadedRun(cfg, model, Path(checkpoint), int(state.get("step", 0)))


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
