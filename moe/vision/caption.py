"""Text from an image: sampling from the vision model, and the scoring of candidate answers.

Generation encodes the image once and decodes with the text model's KV cache
(moe/inference/cache.py): the prompt in one forward, then one token per forward, each
attending to the cached keys and values and, through the gated cross-attention, to the image's
latents. ``use_cache=False`` runs the full forward over the whole sequence at every step: the
reference the cached path is tested equal to (tests/test_vision.py).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from moe.inference.cache import KVCache
from moe.inference.sampling import SamplingParams, sample
from moe.model.loss import IGNORE_INDEX


def image_tensor(images: np.ndarray | torch.Tensor, device=None) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [0, 1] (the model's input)."""
    t = torch.as_tensor(images)
    return (t.movedim(-1, -3).float() / 255.0).to(device)


@torch.no_grad()
def caption_image(model: nn.Module, image: np.ndarray, prompt_ids: list[int], *,
                  max_new_tokens: int, params: SamplingParams | None = None,
                  generator: torch.Generator | None = None, use_cache: bool = True,
                  step_logits: list[torch.Tensor] | None = None) -> list[int]:
    """Continue ``prompt_ids`` (it starts with the image marker, the token the image sits
    before) given one image (uint8 [H, W, 3]); returns the new tokens, stopping after any of
    ``params.stop_tokens``. ``params`` default: greedy. Routing is dropless. ``use_cache``:
    KV-cached decode (else the full forward each step); ``step_logits``: a list that gets
    each step's fp32 logits [vocab] (what the tests compare)."""
    params = params or SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    if not prompt_ids:
        raise ValueError("the prompt must hold at least the image marker token")
    device = next(model.parameters()).device
    media_pos = torch.zeros(1, 1, dtype=torch.long, device=device)
    ids, new = list(prompt_ids), []
    limit = model.cfg.max_seq_len
    was_training = model.training
    model.eval()
    try:
        # The image's latents, once: every step's cross-attention reads the same ones.
        media = model.encode_images(image_tensor(image[None, None], device))  # [1, L, d]
        cache = KVCache(model, 1) if use_cache else None
        fed = 0  # tokens of ids already in the cache
        for _ in range(max_new_tokens):
            if len(ids) >= limit:
                break
            tokens = torch.tensor([ids[fed:]] if use_cache else [ids], device=device)
            view = cache.view([0], tokens.shape[1]) if use_cache else None
            # Dropless, as moe.inference.generate: a capacity would drop tokens of this sequence.
            logits = model(tokens, view, media=media, media_pos=media_pos,
                           capacity_factor=None)[0, -1].float()
            if use_cache:
                cache.advance([0], [tokens.shape[1]])
                fed = len(ids)
            if step_logits is not None:
                step_logits.append(logits)
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
