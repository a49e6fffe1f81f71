"""Each rank's random generators in a checkpoint, so a resume continues every rank's stream.

What draws from them: router jitter (``model.router_jitter``), on whichever rank holds the
router. Ranks hold different generators once they have run different layers (pipeline stages)
or different tokens (data ranks), so a checkpoint keeps every rank's:

    rng = {"torch": rank 0's CPU state, "cuda": rank 0's CUDA state (on a GPU),
           "layout": [pp, dp, ep, tp], "ranks": [each global rank's {"torch", "cuda"}]}

Restoring (``restore_rng_state``):

- on the layout that saved it, each rank takes its own state: the run continues exactly as an
  unbroken one (bit-identical on CPU);
- on another layout (or from a checkpoint of one rank's state only), every rank takes rank 0's,
  as every rank of a new run starts from the same ``train.seed``. Tensor-parallel ranks, which
  must draw the same jitter, so stay in step; the streams then differ from an unbroken run on
  the old layout (they are per rank, and the ranks are not the same ranks any more).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe.parallel.mesh import ParallelDims


def _local_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def rng_state(dims: ParallelDims, device: torch.device) -> dict:
    """Every rank's generator states, for rank 0's ``extra.pt``. Collective: every rank calls
    it (an ``all_gather_object`` of a few KiB per rank)."""
    mine = _local_state(device)
    if dims.mesh() is None:
        ranks = [mine]
    else:
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, {k: v.cpu() for k, v in mine.items()})
    return {**ranks[0], "layout": list(dims.shape), "ranks": ranks}


def restore_rng_state(rng: dict, dims: ParallelDims, device: torch.device) -> None:
    """Set this rank's generators from a checkpoint's ``rng`` (see the module doc)."""
    rank = dist.get_rank() if dims.mesh() is not None else 0
    ranks = rng.get("ranks")
    same = ranks is not None and rng.get("layout") == list(dims.shape) and len(ranks) > rank
    state = ranks[rank] if same else rng
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
