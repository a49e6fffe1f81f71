"""A trained model from a checkpoint, for inference, export and analysis (not to resume:
that is ``restore_checkpoint``): ``load_model`` and ``resolve_checkpoint``, the choice every
tool makes of which checkpoint to load (warning in one line about each broken one it skips).
Folders of the former single-file format (``step_*/state.pt``) are refused with a one-line
``CheckpointError`` saying how to proceed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moe.checkpoint.integrity import (
    CheckpointError,
    check_checkpoint,
    is_checkpoint,
    latest_good_checkpoint,
    read_extra,
)
from moe.checkpoint.unsharded import full_state

if TYPE_CHECKING:
    from moe.config import Config
    from moe.model import Transformer

__all__ = ["IMPORTED", "UPCYCLED", "WEIGHTS_ONLY", "LoadedModel", "load_model",
           "resolve_checkpoint", "saved_config"]

# Keys of a checkpoint's extra that mark weights written by a tool rather than by training, and
# name their source: an imported Hugging Face model (moe/hf/import_hf.py; its data section is
# a placeholder) or an upcycled dense model (moe/upcycle/upcycle.py). Neither has optimizer or
# data state: runs start from them (train.init_from) and never resume them.
IMPORTED = "imported_from"
UPCYCLED = "upcycled_from"
WEIGHTS_ONLY = (IMPORTED, UPCYCLED)

ROOT = Path(__file__).resolve().parents[1]  # the repository, where training normally runs


def _is_step_folder(path: Path) -> bool:
    return is_checkpoint(path) or path.name.startswith(("step_", ".tmp_step_", ".old_step_"))


def is_consolidated_file(path: str | Path) -> bool:
    """A file written by scripts/consolidate.py (not a file inside a step folder)."""
    path = Path(path)
    return path.is_file() and not _is_step_folder(path.parent)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder to load for ``path``, verified (moe/checkpoint/integrity.py):

    - a run folder: its newest good checkpoint; broken newer ones are skipped with a one-line
      warning each; FileNotFoundError if it has none, CheckpointError if none is usable;
    - a step folder (or a file in it): that one, or CheckpointError if it is broken (a
      checkpoint named by the user never silently becomes another).
    """
    path = Path(path)
    if path.is_dir() and not _is_step_folder(path):
        latest = latest_good_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"no checkpoint in {path} (nor in {path}/checkpoints)")
        return latest
    return check_checkpoint(path)


@dataclass
class LoadedModel:
    model: Transformer  # in eval mode, on the device asked for
    cfg: Config  # the checkpoint's own config (what the weights were trained with)
    checkpoint: Path  # the step folder or consolidated file the weights came from
    step: int
    tokenizer: Path | None  # tokenizer.json: the run folder's copy, else the data cache's


def load_model(path: str | Path, device: str | torch.device = "cpu",
               cache_dir: str | None = None) -> LoadedModel:
    """The trained model of ``path``, for inference, export and analysis (not to resume
    training: that is ``restore_checkpoint``), whole in this one process and in eval mode.

    ``path``: a run folder (its newest checkpoint that verifies, see ``resolve_checkpoint``),
    a ``step_*`` folder of any layout, or a file written by scripts/consolidate.py.
    ``cfg.data.cache_dir`` becomes ``cache_dir`` if given; a relative one that does not exist
    here but does in the repository (where training normally runs) is taken from there.
    ``tokenizer`` is the run folder's tokenizer.json (a consolidated file: the one beside it),
    else the data cache's; None if neither exists.
    """
    from moe.model import build_model

    path = Path(path)
    if is_consolidated_file(path):
        checkpoint, state, beside = path, _read_consolidated(path, device), path.parent
    else:
        checkpoint = resolve_checkpoint(path)
        state, beside = full_state(checkpoint, map_location=device), checkpoint.parent.parent
    cfg = _config(state["config"], cache_dir)
    if cfg.vision.enabled:  # the text model plus the vision parts (moe/vision/model.py)
        from moe.vision.model import build_vision_model

        model = build_vision_model(cfg.model, cfg.vision, device)
    else:
        model = build_model(cfg.model, device)  # build_model keeps tied embeddings tied
    model.load_state_dict(state["model"], strict=True)
    return LoadedModel(model.eval(), cfg, checkpoint, int(state.get("step", 0)),
                       _tokenizer(cfg, beside))


def saved_config(checkpoint: str | Path, cache_dir: str | None = None
                 ) -> tuple[Config, int, Path | None]:
    """A step folder's config (``data.cache_dir`` resolved as ``load_model`` does), training
    step and tokenizer, read without any tensor: what a sharded load needs before it builds
    its shards (moe/inference/sharded.py)."""
    checkpoint = Path(checkpoint)
    extra = read_extra(checkpoint)
    cfg = _config(extra["config"], cache_dir)
    return cfg, int(extra.get("step", 0)), _tokenizer(cfg, checkpoint.parent.parent)


def _config(raw: dict, cache_dir: str | None) -> Config:
    from moe.config import from_dict

    cfg = from_dict(raw)
    cfg.data.cache_dir = cache_dir or _cache_dir(cfg.data.cache_dir)
    return cfg.validate()


def _read_consolidated(path: Path, device) -> dict:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read means unusable
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path} does not load as a checkpoint file "
                              f"({type(e).__name__}: {first})") from None
    if not isinstance(state, dict) or not {"model", "config"} <= state.keys():
        raise CheckpointError(f"{path} is not a consolidated checkpoint (no model and config): "
                              f"give a run folder, a step folder or a scripts/consolidate.py "
                              f"output")
    # A file consolidated from the former state.pt format may keep torch.compile's prefix.
    state["model"] = {k.replace("_orig_mod.", ""): v for k, v in state["model"].items()}
    return state


def _cache_dir(cache_dir: str) -> str:
    """A relative ``data.cache_dir`` is relative to where training ran, normally the repository
    root: use that when it does not exist relative to the current folder."""
    p = Path(cache_dir)
    if p.is_absolute() or p.exists() or not (ROOT / p).exists():
        return cache_dir
    return str(ROOT / p)


def _tokenizer(cfg: Config, beside: Path) -> Path | None:
    from moe.data.cache import TOKENIZER
    from moe.data.prepare import cache_folder

    if (beside / TOKENIZER).is_file():  # the trainer writes it into the run folder
        return beside / TOKENIZER
    try:
        cached = cache_folder(cfg) / TOKENIZER
    except FileNotFoundError:  # its data.tokenizer is gone: no cache to look in
        return None
    return cached if cached.is_file() else None
