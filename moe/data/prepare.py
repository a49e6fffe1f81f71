"""``prepare_data(cfg)``: corpus -> split -> tokenizer -> token caches, built once and reused.

The cache folder is ``<data.cache_dir>/<source>-<fingerprint>/`` holding tokenizer.json,
``train_<source>.bin`` per source, val.bin and meta.json (written last). The fingerprint hashes
what the data is (see ``Corpus.identity``) plus every setting that changes the files, so a new
Python, other files or another vocab size get a fresh folder instead of a stale cache.
seq_len and epochs are not in it: they only change how the loader reads the streams.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe.config import ConfigError

from .cache import (TOKENIZER, build_lock, log, open_tokens, read_meta, token_dtype,
                    write_meta, write_tokens)
from .corpus import Corpus, Document, open_corpus
from .loader import PackedLoader
from .split import name_hash, split_names
from .tokenizer import SIDECAR, BPETokenizer, train_bpe, training_sample

# Bump when the cache layout, the documents or tokenization change, so old folders are not
# reused. 2: builtin leaves generated tables out; files/hf documents named by file and row or
# by content instead of a global row index.
FORMAT_VERSION = 2


@dataclass
class TokenData:
    tokenizer: BPETokenizer
    train: dict[str, np.memmap]  # source name -> token ids
    val: np.memmap  # all sources' val documents, mixed in split-hash order
    epochs: dict[str, float]  # per-source epochs in one loader pass
    fingerprint: str
    cache_path: Path
    meta: dict


def fingerprint(corpus: Corpus, cfg) -> str:
    """Short sha256 of the corpus identity and the settings that shape the cache files."""
    key = {"format": FORMAT_VERSION, "kind": corpus.kind, "identity": corpus.identity,
           "vocab_size": cfg.model.vocab_size, "val_fraction": cfg.data.val_fraction,
           "tokenizer_train_mb": cfg.data.tokenizer_train_mb}
    if cfg.data.tokenizer:  # a given tokenizer: its files are part of what the cache is
        key["tokenizer"] = _given_tokenizer_hash(Path(cfg.data.tokenizer))
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _given_tokenizer_hash(path: Path) -> str:
    """sha256 of a data.tokenizer file and of the tokenizer_config.json beside it, if any."""
    if not path.is_file():
        raise FileNotFoundError(f"data.tokenizer={path} does not exist")
    h = hashlib.sha256(path.read_bytes())
    side = path.with_name(SIDECAR)
    if side.is_file():
        h.update(side.read_bytes())
    return h.hexdigest()


def data_fingerprint(cfg) -> str:
    """The cache fingerprint for a config, without reading or building anything."""
    return fingerprint(open_corpus(cfg.data), cfg)


def _folder(corpus, cfg) -> tuple[Path, str]:
    fp = fingerprint(corpus, cfg)
    return Path(cfg.data.cache_dir) / f"{corpus.kind}-{fp}", fp


def cache_folder(cfg) -> Path:
    """The folder ``prepare_data(cfg)`` builds or reuses (tokenizer.json, token streams)."""
    return _folder(open_corpus(cfg.data), cfg)[0]


def load_data(cfg) -> TokenData:
    """``prepare_data`` with bad data settings as a one-line ConfigError (what a run reports
    before it writes anything)."""
    try:
        return prepare_data(cfg)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"data: {e}") from e


def prepare_data(cfg) -> TokenData:
    """Open the token cache for ``cfg``, building it first if it does not exist yet."""
    corpus = open_corpus(cfg.data)
    folder, fp = _folder(corpus, cfg)
    meta = read_meta(folder, fp)
    if meta is None:
        with build_lock(folder):
            meta = read_meta(folder, fp)  # another process may have built it while we waited
            if meta is None:
                meta = _build(corpus, cfg, fp, folder)
    else:
        log(f"using cached tokens in {folder}")
    return _open(folder, meta, corpus.epochs, fp)


def _build(corpus: Corpus, cfg, fp: str, folder: Path) -> dict:
    start = time.perf_counter()
    log(f"building token cache {folder}")
    # A build killed part-way left meta.json out (so nothing here was trusted) and may have
    # left temporary files: clear them; a complete tokenizer.json is kept.
    for stale in folder.glob("*.tmp*"):
        stale.unlink(missing_ok=True)
    explicit_val = corpus.val_loader() if corpus.val_loader is not None else None
    train, train_hashed, val_docs, counts = split_documents(corpus.load(),
                                                            cfg.data.val_fraction, explicit_val)
    val = [text for _, text in val_docs]
    tok = _tokenizer(folder, train_hashed, cfg)
    dtype = token_dtype(cfg.model.vocab_size)
    files = {}
    for source, texts in train.items():
        name = f"train_{source}.bin"
        files[name] = write_tokens(folder / name, tok, texts, dtype, f"train {source}")
    files["val.bin"] = write_tokens(folder / "val.bin", tok, val, dtype, "val")
    meta = {
        "format": FORMAT_VERSION, "fingerprint": fp, "source": corpus.kind,
        "identity": corpus.identity, "vocab_size": cfg.model.vocab_size,
        "tokenizer_vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "dtype": dtype.name,
        "val_fraction": cfg.data.val_fraction, "tokenizer_train_mb": cfg.data.tokenizer_train_mb,
        "train_sources": sorted(train), "docs": counts, "tokens": files,
        "build_seconds": round(time.perf_counter() - start, 2),
    }
    write_meta(folder, meta)  # last: its presence marks the cache complete
    log(f"token cache built in {meta['build_seconds']}s")
    return meta


def split_documents(docs: dict[str, list[Document]], val_fraction: float,
                    explicit_val: list[Document] | None = None):
    """Per-source train texts, all train (hash, text) pairs, the val (name, text) pairs in the
    order val.bin holds them, and per-source document counts.

    With ``explicit_val`` (data.val_files, data.hf_val_split; single-source corpora only) every
    document of ``docs`` is trained on and those are the validation documents."""
    train: dict[str, list[str]] = {}
    train_hashed: list[tuple[float, str]] = []
    val: list[tuple[float, str, str]] = []  # (hash, name, text)
    counts = {}
    if explicit_val is not None:
        (source,) = docs
        if not explicit_val or not docs[source]:
            side = "validation" if not explicit_val else "training"
            raise ValueError(f"the {side} files hold no documents: check data.files and "
                             "data.val_files (or data.hf_split and data.hf_val_split)")
        val = [(name_hash(name), name, text) for name, text in explicit_val]
    for source, items in docs.items():
        if explicit_val is not None:
            flags = [False] * len(items)
        else:
            flags = split_names([name for name, _ in items], val_fraction, source)
        train[source] = []
        for (name, text), is_val in zip(items, flags):
            if is_val:
                val.append((name_hash(name), name, text))
            else:
                train[source].append(text)
                train_hashed.append((name_hash(name), text))
        counts[source] = {"train_docs": len(train[source]),
                          "val_docs": len(val) if explicit_val is not None else sum(flags)}
    # Hash order mixes the sources along the stream, so any stretch of it samples all of them.
    val.sort()
    return train, train_hashed, [(name, text) for _, name, text in val], counts


def _tokenizer(folder: Path, train_hashed: list[tuple[float, str]], cfg) -> BPETokenizer:
    """Train the BPE on training documents, unless a tokenizer.json is already there."""
    tok_path = folder / TOKENIZER
    if tok_path.is_file():  # left by a build that stopped after training: do not retrain
        log(f"reusing {tok_path}")
    elif cfg.data.tokenizer:  # data.tokenizer: a copy (with its eos), nothing trained
        log(f"tokenising with {cfg.data.tokenizer}")
        BPETokenizer.load(cfg.data.tokenizer).save(tok_path)
    else:
        # Hash order is a deterministic shuffle, so a size cap still samples every source.
        train_hashed = sorted(train_hashed, key=lambda ht: ht[0])
        sample = training_sample((t for _, t in train_hashed), cfg.data.tokenizer_train_mb)
        t0 = time.perf_counter()
        log(f"training BPE tokenizer (vocab {cfg.model.vocab_size}) on "
            f"{sum(len(t) for t in sample) / 1e6:.1f} M chars ...")
        train_bpe(sample, cfg.model.vocab_size).save(tok_path)
        log(f"  tokenizer trained in {time.perf_counter() - t0:.1f}s")
    # Reload from disk: the streams then come from exactly the cached tokenizer, and a freshly
    # trained in-memory tokenizer encodes several times slower than a loaded one.
    tok = BPETokenizer.load(tok_path)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"{tok_path} has {tok.vocab_size} tokens, more than model.vocab_size="
                         f"{cfg.model.vocab_size}: delete {folder} to retrain")
    return tok


def _open(folder: Path, meta: dict, epochs: dict[str, float], fp: str) -> TokenData:
    if sorted(meta["train_sources"]) != sorted(epochs):
        raise ValueError(f"{folder} holds sources {meta['train_sources']}, expected "
                         f"{sorted(epochs)}: delete it to rebuild")
    tok = BPETokenizer.load(folder / TOKENIZER)
    dtype, counts = meta["dtype"], meta["tokens"]
    train = {s: open_tokens(folder / f"train_{s}.bin", dtype, counts[f"train_{s}.bin"])
             for s in meta["train_sources"]}
    val = open_tokens(folder / "val.bin", dtype, counts["val.bin"])
    return TokenData(tok, train, val, dict(epochs), fp, folder, meta)
