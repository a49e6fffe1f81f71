"""Which checkpoints a run has, and whether one can be loaded: folders, manifests, crc32s.

A checkpoint can break after it was written (a truncated copy, a full disk during rsync, bit
rot). ``latest_good_checkpoint`` is the one place that decides which checkpoint of a run is
usable (the trainer, and every tool via ``moe.checkpoint.resolve_checkpoint``): newest first,
it checks each file's size and crc32 against the manifest, skips a broken one with a one-line
warning naming it and falls back to the previous one; ``CheckpointError`` (one line) when
checkpoints exist but none verifies. crc32, not sha256: it finds accidental damage (not
tampering) at ~1.5 GB/s against sha256's ~0.9 GB/s on these CPUs. A folder written before
manifests existed is checked against its DCP metadata (every chunk's file, offset and length)
and loaded with a one-line note.

Folders of the former single-file format (``step_*/state.pt``) are not checkpoints any more:
naming one, or resuming a run that has only those, is a one-line ``CheckpointError`` that says
how to proceed.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

FORMAT = 1
EXTRA_FILE = "extra.pt"  # its presence marks a complete checkpoint
MANIFEST_FILE = "manifest.json"  # written last: {"format", "files": {name: {"size", "crc32"}}}
_OLD_FILE = "state.pt"  # the former single-file format: recognised only to refuse it


class CheckpointError(ValueError):
    """No usable checkpoint, or a named one that is broken; the message is one line."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _say(message: str) -> None:
    print(message, file=sys.stderr)


# --- folders ------------------------------------------------------------------------------------


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def is_checkpoint(path: str | Path) -> bool:
    """A complete checkpoint folder (it holds extra.pt)."""
    return (Path(path) / EXTRA_FILE).is_file()


def _step(path: Path) -> int:
    return int(path.name.split("_")[1])


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step_*") if p.is_dir() and is_checkpoint(p)), key=_step)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, unverified: to load one, use latest_good_checkpoint."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def _old_format_error(where: Path) -> CheckpointError:
    return CheckpointError(
        f"{where} holds a checkpoint in the old single-file format ({_OLD_FILE}), which is no "
        f"longer supported: consolidate it with scripts/consolidate.py from an older version of "
        f"moe and load the .pt file it writes, or train again")


def _is_old_format(path: Path) -> bool:
    if path.is_file():
        return path.name == _OLD_FILE and path.parent.name.startswith("step_")
    return (path / _OLD_FILE).is_file() and not (path / EXTRA_FILE).exists()


def _folder(path: str | Path) -> Path:
    """A checkpoint folder from the folder itself or a file in it; a one-line CheckpointError
    for a folder of the old format."""
    path = Path(path)
    if _is_old_format(path):
        raise _old_format_error(path.parent if path.is_file() else path)
    if path.is_file():
        path = path.parent
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path


def read_extra(path: str | Path) -> dict:
    """The non-tensor state of a checkpoint (config, step, loader, RNG, ...), on the CPU."""
    return torch.load(_folder(path) / EXTRA_FILE, map_location="cpu", weights_only=True)


# --- the manifest -------------------------------------------------------------------------------


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_manifest(folder: Path) -> None:
    """Every other file's size and crc32, fsync'd: written last, it vouches for them."""
    files = {p.name: {"size": p.stat().st_size, "crc32": _crc32(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST_FILE}
    with open(folder / MANIFEST_FILE, "w") as f:
        json.dump({"format": FORMAT, "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def checkpoint_problem(path: str | Path, checksums: bool = True) -> str | None:
    """Why the checkpoint folder ``path`` cannot be loaded, in a few words; None when it can.
    Sizes always, crc32s too unless ``checksums=False``. A folder without a manifest (written
    before manifests) is checked against its DCP metadata."""
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if _is_old_format(path):
        return f"old single-file format ({_OLD_FILE}), no longer supported"
    if not (path / EXTRA_FILE).is_file():
        return f"no {EXTRA_FILE} (an unfinished save?)"
    if not (path / MANIFEST_FILE).is_file():
        return _check_against_metadata(path)
    try:
        files = json.loads((path / MANIFEST_FILE).read_text())["files"]
        entries = [(name, int(e["size"]), int(e["crc32"])) for name, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST_FILE} is unreadable ({type(e).__name__}: {e})"
    names = {name for name, _, _ in entries}
    for need in (".metadata", EXTRA_FILE):
        if need not in names:
            return f"{MANIFEST_FILE} does not list {need}"
    for name, size, _ in entries:
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, its manifest says {size}"
    if checksums:
        for name, _, crc in entries:
            if _crc32(path / name) != crc:
                return f"{name} fails its crc32 check: the file is damaged"
    return None


def _check_against_metadata(path: Path) -> str | None:
    """A folder from before manifests: every chunk the DCP metadata names must lie inside its
    file, and extra.pt must load (it is small)."""
    try:
        storage = dcp.FileSystemReader(path).read_metadata().storage_data or {}
        torch.load(path / EXTRA_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read means unusable
        return f"unreadable ({type(e).__name__}: {e})"
    ends: dict[str, int] = {}
    for info in storage.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        size = (path / name).stat().st_size if (path / name).is_file() else None
        if size is None or size < end:
            return f"{name} has {size or 0} bytes, its DCP metadata needs {end}"
    return None


# --- choosing the checkpoint to load ------------------------------------------------------------


def check_checkpoint(path: str | Path, say=_say) -> Path:
    """``path`` (a step folder or a file in it) if it verifies; CheckpointError naming it and
    the problem if not (a checkpoint asked for by name never falls back to another)."""
    path = _folder(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is broken: {problem}")
    _note_unverified(path, say)
    return path


def _note_unverified(path: Path, say) -> None:
    if not (path / MANIFEST_FILE).exists():
        say(f"note: {path} has no {MANIFEST_FILE} (saved by an older version): checked "
            f"against its DCP metadata only")


def latest_good_checkpoint(run_dir: str | Path, mesh=None, say=_say) -> Path | None:
    """The newest checkpoint of ``run_dir`` that verifies (see ``checkpoint_problem``); each
    newer broken one is skipped with a one-line warning naming it. None when the run has no
    checkpoint at all; CheckpointError (one line) when it has some but none is usable, or
    only ones of the old single-file format.

    Collective with a mesh: rank 0 verifies and broadcasts its choice (or its error), so every
    rank loads the same checkpoint and only rank 0 prints."""
    if mesh is not None:
        out: list = [None]
        if _rank() == 0:
            try:
                out[0] = ("ok", latest_good_checkpoint(run_dir, None, say))
            except CheckpointError as e:
                out[0] = ("error", str(e))
        dist.broadcast_object_list(out, src=0)
        kind, value = out[0]
        if kind == "error":
            raise CheckpointError(value)
        return value
    ckpts = list_checkpoints(run_dir)
    broken = []
    for path in reversed(ckpts):
        problem = checkpoint_problem(path)
        if problem is None:
            _note_unverified(path, say)
            return path
        broken.append(f"{path.name} ({problem})")
        say(f"warning: skipping broken checkpoint {path}: {problem}; trying the previous one")
    if broken:
        raise CheckpointError(f"no usable checkpoint in {checkpoint_dir(run_dir)}: "
                              f"{'; '.join(broken)}. Restore one, or move the folder away to "
                              f"start afresh")
    root = checkpoint_dir(run_dir)
    if root.is_dir() and any(_is_old_format(p) for p in root.glob("step_*")):
        raise _old_format_error(root)
    return None
