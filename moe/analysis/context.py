"""Validation loss by position: does a model use (or survive) a longer context?

A model trained at N tokens and run on windows of L > N tokens is judged by its loss at each
position: positions < N test that nothing broke, positions >= N test the extension (docs/
long_context.md). Windows come from the validation stream (``moe.analysis.run.val_windows``).

    per_pos = position_losses(model, windows, batch_size)     # [L], mean over windows
    rows = bucket_losses(per_pos, [128, 256, 512])            # [(0, 128, loss), (128, 256, ..)]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe.model.moe import CONFIG_CAPACITY


@torch.no_grad()
def position_losses(model: torch.nn.Module, windows: torch.Tensor, batch_size: int,
                    capacity_factor=CONFIG_CAPACITY) -> torch.Tensor:
    """Mean next-token loss at each position ``[L]`` over ``windows [n, L + 1]`` (inputs are
    the first L tokens, targets the last L), in eval mode. ``capacity_factor``: the MoE
    layers' factor for these forwards (default: the config's eval factor; None: dropless)."""
    if len(windows) == 0:
        raise ValueError("no windows to evaluate")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
    try:
        for i in range(0, len(windows), batch_size):
            w = windows[i:i + batch_size].to(device)
            x, y = w[:, :-1], w[:, 1:]
            kw = {} if capacity_factor is CONFIG_CAPACITY else {"capacity_factor": capacity_factor}
            logits = model(x, **kw)
            loss = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # [B, L]
            total += loss.sum(0).double().cpu()
    finally:
        model.train(was_training)
    return (total / len(windows)).float()


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
