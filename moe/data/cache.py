"""On-disk token caches: flat binary token streams plus a meta.json that marks them complete.

Every file is written to a temporary name and moved into place with ``os.replace`` (atomic on
one filesystem), and meta.json is written last: a folder without meta.json is an unfinished
build and is rebuilt, never read.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .tokenizer import BPETokenizer

META = "meta.json"
TOKENIZER = "tokenizer.json"
CHUNK_DOCS = 64  # documents per encode_batch call: enough for both cores, bounded memory


def log(msg: str) -> None:
    print(f"[data] {msg}", file=sys.stderr, flush=True)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces ``path``, on error it is removed."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """Exclusive lock so that parallel ranks build a cache once instead of racing."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_tokens(path: Path, tok: BPETokenizer, texts: Sequence[str], dtype: np.dtype,
                 label: str) -> int:
    """Tokenize ``texts`` into one stream, each document then <|endoftext|>; return its length."""
    chars = sum(len(t) for t in texts)
    log(f"tokenizing {label}: {len(texts)} docs, {chars / 1e6:.1f} M chars ...")
    start, total = time.perf_counter(), 0
    limit = np.iinfo(dtype).max
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            for i in range(0, len(texts), CHUNK_DOCS):
                stream = []
                for ids in tok.encode_batch(texts[i:i + CHUNK_DOCS]):
                    stream.extend(ids)
                    stream.append(tok.eot_id)
                arr = np.asarray(stream, dtype=np.int64)
                if arr.size and arr.max() > limit:
                    raise ValueError(f"token id {arr.max()} does not fit {dtype}: the tokenizer "
                                     "vocab exceeds model.vocab_size; delete the cache folder")
                f.write(arr.astype(dtype).tobytes())
                total += arr.size
            f.flush()
            os.fsync(f.fileno())
    log(f"  {label}: {total:,} tokens in {time.perf_counter() - start:.1f}s")
    return total


def open_tokens(path: Path, dtype: str, expected: int) -> np.memmap:
    """Memory-map a token file read-only, checking its length against meta.json."""
    if not path.is_file():
        raise FileNotFoundError(f"token cache file {path} is missing: delete {path.parent} to "
                                "rebuild the cache")
    size = path.stat().st_size // np.dtype(dtype).itemsize
    if size != expected:
        raise ValueError(f"token cache file {path} holds {size} tokens but meta.json says "
                         f"{expected}: delete {path.parent} to rebuild the cache")
    return np.memmap(path, dtype=dtype, mode="r")


def write_meta(folder: Path, meta: dict) -> None:
    with atomic_file(folder / META) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_meta(folder: Path, fingerprint: str) -> dict | None:
    """The meta.json of a complete cache, or None when the build has not finished."""
    path = folder / META
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    if meta.get("fingerprint") != fingerprint:
        raise ValueError(f"{path} has fingerprint {meta.get('fingerprint')!r}, expected "
                         f"{fingerprint!r}: delete {folder} to rebuild the cache")
    return meta
