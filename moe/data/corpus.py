"""Corpus sources: where the documents come from, as (name, text) pairs per source.

``open_corpus`` is cheap: it only describes the data (``Corpus.identity``, which feeds the
cache fingerprint) so that an existing token cache can be used without reading any text.
``Corpus.load()`` reads the documents, and runs only when a cache has to be built.

- builtin: two sources from the running interpreter, no download. "code" is the standard
  library's ``.py`` files, "text" the prose of the language reference (``pydoc_data.topics``).
- hf: a Hugging Face hub dataset, one document per row of ``text_field``.
- files: local .txt/.md/.py (one document per file), .json/.jsonl or .parquet (one per row).

hf and files are a single source named "text" trained for 1 epoch per pass; the per-source
``code_epochs`` / ``text_epochs`` apply to builtin only.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

Document = tuple[str, str]  # (name, text); the name decides the train/val split

MB = 1_000_000  # data sizes are decimal megabytes

FILE_FORMATS = {".txt": "text", ".md": "text", ".py": "text",
                ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class Corpus:
    kind: str  # builtin | hf | files
    identity: dict[str, Any]  # what the data is; hashed into the cache fingerprint
    epochs: dict[str, float]  # per-source epochs in one loader pass
    loader: Callable[[], dict[str, list[Document]]]

    def load(self) -> dict[str, list[Document]]:
        """Read every document, grouped by source name (same keys as ``epochs``)."""
        docs = self.loader()
        if set(docs) != set(self.epochs):
            raise RuntimeError(f"corpus produced sources {sorted(docs)}, expected "
                               f"{sorted(self.epochs)}")
        return docs


def open_corpus(dcfg) -> Corpus:
    """Describe the corpus selected by a ``DataConfig`` without reading its text."""
    if dcfg.source == "builtin":
        return _builtin(dcfg)
    if dcfg.source == "hf":
        return _hub(dcfg)
    if dcfg.source == "files":
        return _files(dcfg)
    raise ValueError(f"data.source={dcfg.source!r} must be one of builtin, hf, files")


# ---------------------------------------------------------------------------------------------
# builtin: the interpreter's own standard library and language reference


def stdlib_files(code_max_mb: float | None = None) -> tuple[Path, list[tuple[str, int]]]:
    """The stdlib root and its non-empty ``.py`` files as sorted (relative path, size in bytes).

    With ``code_max_mb`` the list is the longest sorted prefix whose total size fits, so the
    same cap always selects the same files.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"the standard library folder {root} does not exist: use "
                                "data.source=files or hf")
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        # Third-party packages are not part of the interpreter and differ between machines.
        if "site-packages" in rel.parts or "__pycache__" in rel.parts or not path.is_file():
            continue
        size = path.stat().st_size
        if size:  # empty files (many __init__.py) would only add a separator token
            files.append((rel.as_posix(), size))
    files.sort()
    if code_max_mb is not None:
        if not code_max_mb > 0:
            raise ValueError(f"data.code_max_mb={code_max_mb} must be > 0, or null for all")
        budget, kept = code_max_mb * MB, []
        for rel, size in files:
            if size > budget:
                break
            kept.append((rel, size))
            budget -= size
        files = kept
    if not files:
        raise ValueError(f"no standard library .py files selected under {root}: raise "
                         f"data.code_max_mb (now {code_max_mb})")
    return root, files


def language_reference() -> dict[str, str]:
    """Topic name -> prose of the Python language reference, as shipped with the interpreter."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some stripped-down Python builds drop pydoc_data
        raise FileNotFoundError("this Python has no pydoc_data.topics (language reference): "
                                "use data.source=files or hf") from e
    return dict(topics)


def _builtin(dcfg) -> Corpus:
    root, files = stdlib_files(dcfg.code_max_mb)
    topics = language_reference()
    topics_hash = hashlib.sha256()
    for key in sorted(topics):
        topics_hash.update(f"{key}\0{topics[key]}\0".encode("utf-8"))
    identity = {
        "python": sys.version,
        "stdlib": str(root),
        # Count + total size + names catch a different Python or cap without reading the files;
        # mtimes are left out because they change on reinstall while the content does not.
        "code_files": len(files),
        "code_bytes": sum(size for _, size in files),
        "code_names_sha256": hashlib.sha256("\n".join(r for r, _ in files).encode()).hexdigest(),
        "code_max_mb": dcfg.code_max_mb,
        "text_topics": len(topics),
        "text_sha256": topics_hash.hexdigest(),
    }

    def load() -> dict[str, list[Document]]:
        code = [(f"code/{rel}", (root / rel).read_text(encoding="utf-8", errors="replace"))
                for rel, _ in files]
        text = [(f"text/{key}", topics[key]) for key in sorted(topics)]
        return {"code": code, "text": text}

    return Corpus("builtin", identity, {"code": dcfg.code_epochs, "text": dcfg.text_epochs},
                  load)


# ---------------------------------------------------------------------------------------------
# hf and files: anything the `datasets` library can load, one document per row


def column_docs(ds, text_field: str, what: str) -> list[Document]:
    """Documents from one string column of a ``datasets.Dataset``, named by row index."""
    if text_field not in ds.column_names:
        raise ValueError(f"data.text_field={text_field!r} is not a column of {what}; "
                         f"available columns: {', '.join(ds.column_names)}")
    docs = []
    for i, text in enumerate(ds[text_field]):
        if not isinstance(text, str):
            raise ValueError(f"row {i} of column {text_field!r} in {what} is "
                             f"{type(text).__name__}, not a string: point data.text_field at a "
                             "text column")
        docs.append((f"text/{i}", text))
    return docs


def _hub(dcfg) -> Corpus:
    # The hub revision is not part of the identity: a dataset updated upstream under the same
    # name keeps its old cache until the cache folder is deleted.
    identity = {"hf_name": dcfg.hf_name, "hf_config": dcfg.hf_config, "hf_split": dcfg.hf_split,
                "text_field": dcfg.text_field}

    def load() -> dict[str, list[Document]]:
        import datasets

        ds = datasets.load_dataset(dcfg.hf_name, dcfg.hf_config, split=dcfg.hf_split)
        what = f"hub dataset {dcfg.hf_name} ({dcfg.hf_config or 'default'}, {dcfg.hf_split})"
        return {"text": column_docs(ds, dcfg.text_field, what)}

    return Corpus("hf", identity, {"text": 1.0}, load)


def resolve_files(patterns: list[str]) -> list[Path]:
    """Expand paths and globs (``**`` allowed) in order; every entry must match a file."""
    out: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"data.files pattern {pattern!r} matches no files")
        elif os.path.isfile(pattern):
            matches = [pattern]
        else:
            raise FileNotFoundError(f"data.files entry {pattern!r} is not a file")
        out.extend(Path(m).resolve() for m in matches)
    return list(dict.fromkeys(out))  # a file named twice (path and glob) is read once


def files_format(paths: list[Path]) -> str:
    """The `datasets` builder for these files: text, json or parquet, from the extensions."""
    exts = sorted({p.suffix.lower() for p in paths})
    unknown = [e or "(none)" for e in exts if e not in FILE_FORMATS]
    if unknown:
        raise ValueError(f"data.files has unsupported extension(s) {', '.join(unknown)}; use "
                         f"{', '.join(FILE_FORMATS)}")
    formats = sorted({FILE_FORMATS[e] for e in exts})
    if len(formats) > 1:
        raise ValueError(f"data.files mixes formats ({', '.join(formats)} from "
                         f"{', '.join(exts)}): list files of one format only")
    return formats[0]


def _files(dcfg) -> Corpus:
    paths = resolve_files(dcfg.files)
    fmt = files_format(paths)
    # Local files can be edited in place, so size and mtime are part of the identity.
    identity = {"format": fmt, "text_field": dcfg.text_field,
                "files": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]}

    def load() -> dict[str, list[Document]]:
        import datasets

        kwargs = {"sample_by": "document"} if fmt == "text" else {}  # text: a file per row
        # `datasets` converts the files to Arrow first; keep that next to our own caches.
        ds = datasets.load_dataset(fmt, data_files=[str(p) for p in paths], split="train",
                                   cache_dir=str(Path(dcfg.cache_dir) / "hf-datasets"), **kwargs)
        what = f"{fmt} files {', '.join(p.name for p in paths[:3])}" + \
            (f" (+{len(paths) - 3} more)" if len(paths) > 3 else "")
        return {"text": column_docs(ds, dcfg.text_field, what)}

    return Corpus("files", identity, {"text": 1.0}, load)
