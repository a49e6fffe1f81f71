"""Local files for ``data.source=files``: which files, how they decode, how a big one is cut
into documents, and where a broken one breaks.

Every error here is one line that names the file (and the line where one is known), because a
user who points ``data.files`` at a folder of their own text has to find the bad file in it.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
from pathlib import Path

FILE_FORMATS = {".txt": "text", ".md": "text", ".py": "text",
                ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
BLOCK = 1 << 20  # bytes per encoding-check read (then up to the next line end)


def warn(msg: str) -> None:
    print(f"[data] warning: {msg}", file=sys.stderr, flush=True)


def _glob_base(pattern: str) -> str:
    """The folder part of a glob before its first wildcard: ``corpus/**/*.jsonl`` -> corpus."""
    parts = Path(pattern).parts
    fixed = parts[:next(i for i, p in enumerate(parts) if glob.has_magic(p))]
    return str(Path(*fixed)) if fixed else "."


def resolve_files(patterns: list[str], key: str = "data.files") -> dict[Path, str]:
    """Expand paths and globs (``**`` allowed) in order: resolved path -> document name.

    The name is the path relative to the folder the glob starts from (the file name for a
    plain path), so it does not depend on where the corpus lives or on which other files match.
    """
    out: dict[Path, str] = {}
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"{key} pattern {pattern!r} matches no files")
            base = _glob_base(pattern)
            named = [(m, Path(os.path.relpath(m, base)).as_posix()) for m in matches]
        elif os.path.isfile(pattern):
            named = [(pattern, Path(pattern).name)]
        else:
            raise FileNotFoundError(f"{key} entry {pattern!r} is not a file")
        for m, name in named:
            out.setdefault(Path(m).resolve(), name)  # a file named twice is read once
    by_name: dict[str, Path] = {}
    for path, name in out.items():
        if name in by_name:
            raise ValueError(f"{key} {by_name[name]} and {path} both get the document "
                             f"name {name!r}: match them with one glob over a common folder")
        by_name[name] = path
    return out


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


# ---------------------------------------------------------------------------------------------
# Encodings: strict = one-line error at the first bad byte, replace = U+FFFD and one warning


def _decode(raw: bytes, path: Path, encoding: str, errors: str, offset: int = 0,
            line: int = 1) -> tuple[str, int, int | None]:
    """(text, undecodable bytes, line of the first) for ``raw``, which starts at byte
    ``offset`` / line ``line`` of ``path``. Strict raises at the first bad byte."""
    try:
        return raw.decode(encoding), 0, None
    except UnicodeDecodeError as e:
        at = line + raw.count(b"\n", 0, e.start)
        if errors == "strict":
            raise ValueError(
                f"data.files {path} is not {encoding} text: line {at}, byte offset "
                f"{offset + e.start} ({e.reason}): set data.encoding (latin-1, cp1252, ...) or "
                "data.encoding_errors=replace") from None
        # surrogateescape maps each undecodable byte to one lone surrogate: count them.
        bad = len(re.findall("[\udc80-\udcff]", raw.decode(encoding, "surrogateescape")))
        return raw.decode(encoding, "replace"), bad, at


def _warn_replaced(path: Path, encoding: str, bad: int, first: int) -> None:
    warn(f"{path} is not valid {encoding}: {bad} undecodable byte(s) read as U+FFFD, the first "
         f"on line {first} (data.encoding_errors=replace)")


def read_text(path: Path, encoding: str, errors: str) -> str:
    """A whole text file, decoded per the policy, newlines made universal (as `datasets`'
    text builder and ``open()`` read them)."""
    text, bad, first = _decode(path.read_bytes(), path, encoding, errors)
    if bad:
        _warn_replaced(path, encoding, bad, first)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def check_encoding(path: Path, encoding: str, errors: str) -> int:
    """Check a file ``datasets`` will read: a strict error or one warning; returns the number
    of undecodable bytes. Reads blocks ending at a line end (the codec must be
    ASCII-compatible, so a newline byte is always a character boundary)."""
    offset, line, total, first = 0, 1, 0, None
    with open(path, "rb") as f:
        while block := f.read(BLOCK) + f.readline():
            _, bad, at = _decode(block, path, encoding, errors, offset, line)
            if bad and first is None:
                first = at
            total += bad
            offset += len(block)
            line += block.count(b"\n")
    if total:
        _warn_replaced(path, encoding, total, first)
    return total


# ---------------------------------------------------------------------------------------------
# Documents of a text file


def chunk_text(text: str, size: int) -> list[str]:
    """Cut ``text`` into documents of at least ``size`` characters (the last may be shorter).

    Each cut is at the first blank line in the ``size`` characters after the chunk's minimum
    length, else at the first line end there, else at exactly ``2 * size``. A cut is made only
    when that window is complete, so it depends on text already in the file: appending to the
    file moves no cut and changes no chunk but the last (which grows, or is cut anew).
    """
    if size <= 0 or len(text) <= size:
        return [text]
    chunks, p = [], 0
    while len(text) - p > size:
        s = p + size
        q = text.find("\n\n", s, s + size)
        if q >= 0:
            cut = q + 2
        elif len(text) < s + size:
            break  # the window is not complete: appended text could put a blank line in it
        else:
            q = text.find("\n", s, s + size)
            cut = q + 1 if q >= 0 else s + size
        chunks.append(text[p:cut])
        p = cut
    if p < len(text):
        chunks.append(text[p:])
    return chunks


def chunk_names(name: str, n: int) -> list[str]:
    """``text/<file>`` for the first chunk (so a file that grows past chunk_chars keeps its
    name), ``text/<file>@<k>`` for chunk k >= 1."""
    return [f"text/{name}"] + [f"text/{name}@{k}" for k in range(1, n)]


# ---------------------------------------------------------------------------------------------
# Where a file that `datasets` could not read is broken


def json_error(path: Path, encoding: str) -> str | None:
    """``"line N, column C: what"`` for the first thing in a JSON / JSON Lines file that
    ``datasets`` cannot read (a syntax error, a line that is not an object), or None."""
    text = path.read_bytes().decode(encoding, errors="replace")
    whole = None
    if path.suffix.lower() == ".json":
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as e:
            whole = f"line {e.lineno}, column {e.colno}: {e.msg}"
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            # A .json file whose first line is not JSON alone is one document, not JSON Lines.
            return whole if whole and n == 1 else f"line {n}, column {e.colno}: {e.msg}"
        if not isinstance(row, dict):
            return f"line {n}: a {type(row).__name__}, not a JSON object (one row per line)"
    return None


def parquet_error(path: Path) -> str | None:
    import pyarrow.parquet as pq

    try:
        pq.read_table(path)
        return None
    except Exception as e:  # noqa: BLE001 - any reason pyarrow gives is the answer
        return str(e).splitlines()[0] if str(e) else type(e).__name__


def first_line(e: BaseException) -> str:
    """The innermost cause's first line: `datasets` wraps the useful message in
    DatasetGenerationError("An error occurred while generating the dataset")."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
