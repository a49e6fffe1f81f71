"""Data pipeline: corpus -> train/val split -> byte-level BPE -> cached token streams -> batches.

Typical use::

    data = prepare_data(cfg)                       # builds the cache once, then reuses it
    loader = PackedLoader(data.train, data.epochs, cfg.data.seq_len, cfg.train.seed)
    x, y = loader.next_batch(cfg.train.micro_batch_size)
    evals = val_batches(data.val, cfg.data.seq_len, cfg.train.micro_batch_size,
                        cfg.data.val_windows)
"""

from .corpus import Corpus, Document, open_corpus
from .loader import PackedLoader, val_batches
from .prepare import TokenData, data_fingerprint, load_data, prepare_data
from .split import split_names
from .tokenizer import EOT, EOT_ID, BPETokenizer, train_bpe

__all__ = [
    "BPETokenizer", "Corpus", "Document", "EOT", "EOT_ID", "PackedLoader", "TokenData",
    "data_fingerprint", "load_data", "open_corpus", "prepare_data", "split_names", "train_bpe",
    "val_batches",
]
