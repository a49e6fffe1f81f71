"""Every shipped config starts on the data it names: its token cache builds, and what the trainer
reads before step 1 fits (the eval windows, one global batch of training windows).

The caches live where training puts them (data/cache, git-ignored), so a run of this file also
warms them for the first real run: each distinct data setting is built once (a few seconds to
about a minute each on 2 cores, see data/README.md), then opened in well under a second.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from moe.config import load_config
from moe.data import EOT_ID, PackedLoader, open_corpus, prepare_data, val_batches
from moe.data.prepare import split_documents

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
CACHE = ROOT / "data" / "cache"


def load(path: Path):
    return load_config(path, [f"--data.cache_dir={CACHE}"])


def test_every_config_is_checked():
    assert {p.stem for p in CONFIGS} >= {"tiny", "ablate", "bench", "gpu_100m", "gpt4",
                                          "a100x8_tp8", "a100x8_tp2pp2dp2"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_data_fits(path):
    cfg = load(path)
    if cfg.data.source != "builtin":  # hub downloads and local files are not on every machine
        pytest.skip(f"{path.name}: data.source={cfg.data.source} is not the builtin corpus")
    tc, seq_len = cfg.train, cfg.data.seq_len
    data = prepare_data(cfg)
    assert data.tokenizer.vocab_size <= cfg.model.vocab_size
    # What moe/train/loop.py does before step 1: the eval batches, then the training loader.
    val = val_batches(data.val, seq_len, tc.micro_batch_size, cfg.data.val_windows)
    assert sum(len(x) for x, _ in val) == cfg.data.val_windows
    assert val[0][0].shape == (min(tc.micro_batch_size, cfg.data.val_windows), seq_len)
    loader = PackedLoader(data.train, data.epochs, seq_len, tc.seed)
    # The largest global batch the run asks for holds distinct windows (no repeat in a step).
    assert loader.pass_len >= tc.batch_size
    x, y = loader.next_batch(tc.batch_size)
    assert x.shape == y.shape == (tc.batch_size, seq_len)
    assert int(x.max()) < cfg.model.vocab_size


def test_tiny_eval_covers_every_val_source_and_document():
    cfg = load(ROOT / "configs" / "tiny.yaml")
    tc, seq_len = cfg.train, cfg.data.seq_len
    data = prepare_data(cfg)
    _, _, val_docs, _ = split_documents(open_corpus(cfg.data).load(), cfg.data.val_fraction)
    # val.bin holds these documents in this order, each followed by <|endoftext|>.
    ends = np.flatnonzero(np.asarray(data.val) == EOT_ID) + 1
    assert len(ends) == len(val_docs) and ends[-1] == len(data.val)
    starts = np.concatenate([[0], ends[:-1]])
    # The trainer's own function on a stream of positions: x[:, 0] is each window's start.
    positions = np.arange(len(data.val), dtype=np.int64)
    batches = val_batches(positions, seq_len, tc.micro_batch_size, cfg.data.val_windows)
    win = torch.cat([x[:, 0] for x, _ in batches]).numpy()
    spacing = (len(data.val) - 1) // seq_len * seq_len / len(win)  # tokens between windows
    covered = [bool(np.any((win < hi) & (win + seq_len + 1 > lo))) for lo, hi in zip(starts, ends)]
    # Every source, and every document longer than the spacing (a few-line file may fall
    # between two windows: it weighs as little in the loss as its tokens do).
    assert {n.split("/")[0] for (n, _), c in zip(val_docs, covered) if c} == set(data.train)
    missed = [(n, int(hi - lo)) for (n, _), c, lo, hi in zip(val_docs, covered, starts, ends)
              if not c]
    assert all(length < spacing for _, length in missed), (missed, spacing)
    assert len(missed) <= len(val_docs) // 5, missed
