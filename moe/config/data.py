"""``data:``: the corpus, its split, tokenizer and validation set."""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import ClassVar

from moe.config.fields import ConfigError, choice, nonnegative, positive


@dataclass
class DataConfig:
    SECTION: ClassVar[str] = "data"
    # builtin: the running interpreter's standard library (code) + pydoc_data.topics (prose).
    # hf: a Hugging Face hub dataset by name. files: local text / JSONL / parquet files.
    source: str = "builtin"
    hf_name: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    files: list = field(default_factory=list)  # paths or globs, for source=files
    # Explicit validation documents: files (same formats as data.files; no hash split of
    # data.files then) or a split of the hub dataset (e.g. "validation"); empty / null: the
    # hash split by data.val_fraction.
    val_files: list = field(default_factory=list)
    hf_val_split: str | None = None
    text_field: str = "text"
    # Local files are decoded with this codec (ASCII-compatible: utf-8, latin-1, cp1252, ...);
    # undecodable bytes: strict = a one-line error naming file, line and byte offset,
    # replace = U+FFFD in their place and one warning line per file.
    encoding: str = "utf-8"
    encoding_errors: str = "strict"
    # A text file longer than this many characters is cut into documents of about this size
    # (at a blank line, else a line end, in the next chunk_chars): one big input.txt still gets
    # a train/val split. 0: one document per file.
    chunk_chars: int = 20000
    # Per-source epochs of the built-in mixture (the reports: text twice, code four times).
    code_epochs: float = 4.0
    text_epochs: float = 2.0
    code_max_mb: float | None = None  # cap on stdlib source read (None: all of it)
    val_fraction: float = 0.02  # of documents, chosen by a stable hash of the document name
    seq_len: int = 256
    cache_dir: str = "data/cache"
    tokenizer_train_mb: float = 64.0  # at most this much training text feeds the BPE trainer
    # A tokenizer.json to tokenise with instead of training the BPE (e.g. an imported Hugging
    # Face run's, with the tokenizer_config.json beside it naming its end-of-text token, which
    # then separates documents); null: our byte-level BPE, trained on the data.
    tokenizer: str | None = None
    # The validation set: this many windows of seq_len + 1 tokens spread evenly over the val
    # split, the same in every run and layout whatever train.micro_batch_size (evaluation cuts
    # them into micro-batches; the loss is a mean per token). A multiple of
    # model.capacity_group_seqs.
    val_windows: int = 128

    def validate(self) -> None:
        choice(self, "source", ("builtin", "hf", "files"))
        if self.source == "hf" and not self.hf_name:
            raise ConfigError("data.hf_name is required when data.source=hf")
        if self.source == "files" and not self.files:
            raise ConfigError("data.files is required when data.source=files (paths or globs)")
        if self.val_files and self.source != "files":
            raise ConfigError(f"data.val_files is for data.source=files, not {self.source!r}: "
                              "use data.hf_val_split for a hub dataset")
        if self.hf_val_split is not None and self.source != "hf":
            raise ConfigError(f"data.hf_val_split is for data.source=hf, not {self.source!r}")
        if self.hf_val_split is not None and self.hf_val_split == self.hf_split:
            raise ConfigError(f"data.hf_val_split={self.hf_val_split!r} is also data.hf_split: "
                              "validate on another split, or null for the hash split")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ConfigError(f"data.encoding={self.encoding!r} is not a Python codec: use e.g. "
                              "utf-8, latin-1 or cp1252") from None
        choice(self, "encoding_errors", ("strict", "replace"))
        nonnegative(self, "chunk_chars")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        positive(self, "seq_len", "tokenizer_train_mb", "val_windows")
        nonnegative(self, "code_epochs", "text_epochs")
        if self.code_epochs + self.text_epochs <= 0:
            raise ConfigError("data.code_epochs + data.text_epochs must be > 0")
