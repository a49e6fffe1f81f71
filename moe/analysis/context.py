"""Validation loss by position: does a model use (or survive) a longer context?

A model trained at N tokens and run on windows of L > N tokens is judged by its loss at each
position: positions < N test that nothing broke, positions >= N test the extension (docs/
long_context.md). Windows come from the validation stream (``moe.analysis.windows.val_windows``).

    losses = token_losses(model, windows, batch_size)         # [n, L]
    per_pos = losses.mean(0)                                  # [L], as position_losses
    rows = bucket_losses(per_pos, [128, 256, 512])            # [(0, 128, loss), (128, 256, ..)]

Two models evaluated on the same windows differ by less noise than either's per-bucket loss
(the windows' content dominates it): compare them window by window (the CLI's JSON has each
window's bucket losses, ``window_losses``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe.model.moe import CONFIGURED_CAPACITY


@torch.no_grad()
def token_losses(model: torch.nn.Module, windows: torch.Tensor, batch_size: int,
                 capacity_factor=CONFIGURED_CAPACITY) -> torch.Tensor:
    """Next-token loss of every window and position ``[n, L]`` for ``windows [n, L + 1]``
    (inputs are the first L tokens, targets the last L), in eval mode. ``capacity_factor``:
    the MoE layers' factor for these forwards (default: the config's eval factor; None:
    dropless, so that no position's loss depends on which other tokens were dropped)."""
    if len(windows) == 0:
        raise ValueError("no windows to evaluate")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    kw = {} if capacity_factor is CONFIGURED_CAPACITY else {"capacity_factor": capacity_factor}
    rows = []
    try:
        for i in range(0, len(windows), batch_size):
            w = windows[i:i + batch_size].to(device)
            logits = model(w[:, :-1], **kw)
            rows.append(F.cross_entropy(logits.float().transpose(1, 2), w[:, 1:],
                                        reduction="none").cpu())  # [B, L]
    finally:
        model.train(was_training)
    return torch.cat(rows)


def position_losses(model: torch.nn.Module, windows: torch.Tensor, batch_size: int,
                    capacity_factor=CONFIGURED_CAPACITY) -> torch.Tensor:
    """Mean next-token loss at each position ``[L]`` over the windows (``token_losses``)."""
    return token_losses(model, windows, batch_size, capacity_factor).double().mean(0).float()


def bucket_losses(per_pos: torch.Tensor, edges: list[int]) -> list[tuple[int, int, float]]:
    """``(start, end, mean loss)`` for positions [0, e1), [e1, e2), ...; ``edges`` ascending,
    the last at most ``len(per_pos)``."""
    if not edges or list(edges) != sorted(set(edges)) or edges[0] <= 0 \
            or edges[-1] > len(per_pos):
        raise ValueError(f"bucket edges {edges} must be ascending, > 0 and <= {len(per_pos)}")
    rows, start = [], 0
    for end in edges:
        rows.append((start, end, float(per_pos[start:end].mean())))
        start = end
    return rows
