"""The vision-language model: the text Transformer, unchanged, plus Flamingo's vision parts.

    VisionLanguageModel(Transformer)
        tok_embeddings, layers.{i}.*, norm, output    the text model's names and weights
        vision_encoder.*                              ViT patch encoder (encoder.py)
        perceiver.*                                   Perceiver resampler (encoder.py)
        cross_attn.{i}.*                              a gated cross-attention block run before
                                                      text layer i, i = 0, k, 2k, ...
                                                      (k = vision.cross_attn_every)

Because the text parameters keep their names, a text run's checkpoint loads into the vision
model (``train.init_from``: the vision parts stay as initialised), and with the same seed the
text weights are drawn identically (moe/model/init.py keys every draw by name). At
initialisation every gate is 0, so ``model(tokens, images=..., media_pos=...)`` equals the
text-only ``Transformer(tokens)`` exactly (tests/test_vision.py). Without ``images`` the
forward IS the text model's (generation, the KV cache, export of the text part).
"""

from __future__ import annotations

import torch
from torch import nn

from moe.config import ModelConfig, VisionConfig
from moe.model.init import Init, materialize, prefixed
from moe.model.moe import CONFIGURED_CAPACITY
from moe.model.transformer import Transformer
from moe.vision.attention import GatedCrossAttentionBlock, media_mask, residual_std
from moe.vision.encoder import PerceiverResampler, VisionEncoder

# Top-level module names of the vision parts: what init_from may leave as initialised, what
# freeze_text keeps trainable, what count_params counts as vision.
VISION_MODULES = ("vision_encoder", "perceiver", "cross_attn")


def is_vision_param(name: str) -> bool:
    return name.split(".", 1)[0] in VISION_MODULES


class VisionLanguageModel(Transformer):
    def __init__(self, cfg: ModelConfig, vcfg: VisionConfig):
        super().__init__(cfg)
        self.vcfg = vcfg
        self.vision_encoder = VisionEncoder(vcfg)
        self.perceiver = PerceiverResampler(vcfg)
        self.cross_attn = nn.ModuleDict({
            str(i): GatedCrossAttentionBlock(
                cfg.d_model, vcfg.d_vision, cfg.n_heads, cfg.n_kv_heads, cfg.head_size,
                vcfg.cross_attn_ffn_mult * cfg.d_model, cfg.activation, cfg.norm_eps)
            for i in cross_attn_layers(cfg, vcfg)})

    def init_rules(self) -> dict[str, Init]:
        std = self.cfg.init_std
        rules = super().init_rules()
        rules.update(prefixed("vision_encoder", self.vision_encoder.init_rules(std)))
        rules.update(prefixed("perceiver", self.perceiver.init_rules(std)))
        out_std = residual_std(std, len(self.cross_attn))
        for key, block in self.cross_attn.items():
            rules.update(prefixed(f"cross_attn.{key}", block.init_rules(std, out_std)))
        return rules

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, N, 3, H, W] in [0, 1] -> latents [B, N * n_latents, d_vision]."""
        b, n = images.shape[:2]
        latents = self.perceiver(self.vision_encoder(images.flatten(0, 1)))
        return latents.reshape(b, n * latents.shape[1], -1)

    def gates(self) -> dict[str, tuple[float, float]]:
        """Per cross-attention block (keyed by the text layer it precedes): |tanh| of its
        attention and feed-forward gates."""
        return {key: block.gates() for key, block in self.cross_attn.items()}

    def forward(self, tokens: torch.Tensor, kv_cache=None, *, images: torch.Tensor | None = None,
                media_pos: torch.Tensor | None = None, media: torch.Tensor | None = None,
                capacity_factor=CONFIGURED_CAPACITY, decode_path: bool = False) -> torch.Tensor:
        """tokens [B, S]; images [B, N, 3, H, W] in [0, 1]; media_pos [B, N]: the position of
        the first token that sees each image (-1: no image in that slot; see
        ``media_mask``); or, instead of images, ``media``: their latents from
        ``encode_images`` [B, N * n_latents, d_vision] (a cached decode encodes once). Without
        either: the text model's forward. Returns logits."""
        if images is None and media is None:
            return super().forward(tokens, kv_cache, capacity_factor=capacity_factor,
                                   decode_path=decode_path)
        if images is not None and media is not None:
            raise ValueError("give images or their media latents, not both")
        n_images = images.shape[1] if images is not None else \
            media.shape[1] // self.vcfg.n_latents
        if media_pos is None or media_pos.shape != (tokens.shape[0], n_images):
            raise ValueError(f"{n_images} image(s) per row need media_pos of shape "
                             f"{(tokens.shape[0], n_images)} (the first token that sees each)")
        if media is None:
            media = self.encode_images(images)
        h, cos, sin, extra = self.prepare(tokens, kv_cache, capacity_factor, decode_path)
        positions = (kv_cache.input_pos if kv_cache is not None
                     else torch.arange(tokens.shape[1], device=tokens.device))
        mask, seen = media_mask(media_pos, positions, self.vcfg.n_latents, self.vcfg.attend)
        for key, layer in self.layers.items():
            if key in self.cross_attn:
                h = self.cross_attn[key](h, media.to(h.dtype), mask, seen)
            h = self.run_layer(key, layer, h, cos, sin, kv_cache, extra)
        return self.finish(h)


def cross_attn_layers(cfg: ModelConfig, vcfg: VisionConfig) -> list[int]:
    """The text layers a gated cross-attention block precedes: 0, k, 2k, ..."""
    return list(range(0, cfg.n_layers, vcfg.cross_attn_every))


def build_vision_model(cfg: ModelConfig, vcfg: VisionConfig, device: str | torch.device = "cpu",
                       seed: int | None = None) -> VisionLanguageModel:
    """As ``moe.model.build_model``: built on meta, then materialised and drawn from ``seed``."""
    with torch.device("meta"):
        model = VisionLanguageModel(cfg, vcfg)
    if torch.device(device).type == "meta":
        return model
    return materialize(model, device, seed)


def vision_param_counts(cfg: ModelConfig, vcfg: VisionConfig) -> dict[str, int]:
    """Parameters of each vision part (built on the meta device), their total, and the
    text model's: what scripts/count_params.py reports for a vision config."""
    model = build_vision_model(cfg, vcfg, "meta")
    counts = {part: sum(p.numel() for p in getattr(model, part).parameters())
              for part in VISION_MODULES}
    counts["vision_total"] = sum(counts.values())
    seen = {id(p) for part in VISION_MODULES for p in getattr(model, part).parameters()}
    counts["text_total"] = sum(p.numel() for p in {id(p): p for p in model.parameters()
                                                    }.values() if id(p) not in seen)
    counts["cross_attn_layers"] = len(model.cross_attn)
    return counts
