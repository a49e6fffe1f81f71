"""Text from an image: sampling from the vision model, and the scoring of candidate answers.

Generation runs the full forward at every step (no KV cache): captions are a few dozen tokens
of a toy model, and the full forward is the reference the cached path would have to match.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from moe.inference.sampling import SamplingParams, sample
from moe.model.loss import IGNORE_INDEX


def image_tensor(images: np.ndarray | torch.Tensor, device=None) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [0, 1] (the model's input)."""
    t = torch.as_tensor(images)
    return (t.movedim(-1, -3).float() / 255.0).to(device)


@torch.no_grad()
def caption_image(model: nn.Module, image: np.ndarray, prompt_ids: list[int], *,
                  max_new_tokens: int, params: SamplingParams | None = None,
                  generator: torch.Generator | None = None) -> list[int]:
    """Continue ``prompt_ids`` (it starts with the image marker, the token the image sits
    before) given one image (uint8 [H, W, 3]); returns the new tokens, stopping after any of
    ``params.stop_tokens``. ``params`` default: greedy. Routing is dropless."""
    params = params or SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    device = next(model.parameters()).device
    images = image_tensor(image[None, None], device)  # [1, 1, 3, H, W]
    media_pos = torch.zeros(1, 1, dtype=torch.long, device=device)
    ids, new = list(prompt_ids), []
    limit = model.cfg.max_seq_len
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            if len(ids) >= limit:
                break
            # Dropless, as moe.generate: a capacity would drop tokens of this one sequence.
            logits = model(torch.tensor([ids], device=device), images=images,
                           media_pos=media_pos, capacity_factor=None)[0, -1].float()
            tok = int(sample(logits[None], params, generator)[0])
            ids.append(tok)
            new.append(tok)
            if tok in params.stop_tokens:
                break
    finally:
        model.train(was_training)
    return new


def answer_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of log-probabilities of each row's counted targets (not IGNORE_INDEX): [B]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    counted = targets != IGNORE_INDEX
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (picked * counted).sum(-1)
