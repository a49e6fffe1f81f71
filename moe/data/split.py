"""Deterministic train/val split of documents by a stable hash of their names.

A document's side depends only on its name and ``val_fraction``, never on the order, the
machine or the Python hash seed, so the same corpus always splits the same way and adding a
document does not move any other one.
"""

from __future__ import annotations

import hashlib


def name_hash(name: str) -> float:
    """Map a document name to [0, 1) via sha1; stable across runs and platforms."""
    digest = hashlib.sha1(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_names(names: list[str], val_fraction: float, source: str = "corpus") -> list[bool]:
    """Return one flag per name: True = validation document.

    A document is in val when its hash is below ``val_fraction``. Every source must keep at
    least one document on each side (the loader needs train windows, and val loss should cover
    every source), so when the hash rule leaves a side empty the document with the most
    extreme hash moves over. This needs at least two documents.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1): set data.val_fraction")
    if len(set(names)) != len(names):
        raise ValueError(f"source '{source}' has duplicate document names; each name must be "
                         "unique so the split is well defined")
    if len(names) < 2:
        raise ValueError(f"source '{source}' has {len(names)} document(s); a train/val split "
                         "needs at least 2: add documents")
    hashes = [name_hash(n) for n in names]
    is_val = [h < val_fraction for h in hashes]
    if not any(is_val):
        is_val[min(range(len(names)), key=hashes.__getitem__)] = True
    if all(is_val):
        is_val[max(range(len(names)), key=hashes.__getitem__)] = False
    return is_val
