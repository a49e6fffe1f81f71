"""Images to a few latent vectors: a ViT patch encoder, then Flamingo's Perceiver resampler.

    images [B, N, 3, H, W] in [0, 1]
      -> VisionEncoder      patches of p x p pixels, a linear embedding, learned positions,
                            pre-norm transformer blocks (bidirectional)   [B*N, P, d_vision]
      -> PerceiverResampler n_latents learned queries attend to [patches; latents]
                            (Flamingo, Sec. 2.1 and Fig. 5)               [B*N, L, d_vision]

Flamingo uses a frozen, contrastively pre-trained NFNet; nothing can be downloaded here, so
the encoder is small and trained with the rest. Names (an API, used by checkpoints and the
parameter plan): ``vision_encoder.{patch_embed, pos_embed, blocks.{j}.{attn_norm, attn.*,
ffn_norm, ffn.*}, norm}``, ``perceiver.{latents, layers.{j}.{media_norm, latent_norm, attn.*,
ffn_norm, ffn.*}, norm}``.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from moe.config import VisionConfig
from moe.model.init import Init, normal, prefixed, trunc_normal
from moe.model.layers import FeedForward, RMSNorm
from moe.vision.attention import CrossAttention, residual_std

# The generated images (black background, few shapes) have pixel mean 0.042 and std 0.172;
# a fixed affine map near those keeps the patch embedding's input centred.
PIXEL_MEAN, PIXEL_STD = 0.05, 0.2


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: self-attention and a GELU MLP (4x), both residual."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = CrossAttention(dim, dim, n_heads, n_heads, dim // n_heads)
        self.ffn_norm = RMSNorm(dim)
        self.ffn = FeedForward(dim, 4 * dim, "gelu")

    def init_rules(self, std: float, out_std: float) -> dict[str, Init]:
        return {**prefixed("attn_norm", self.attn_norm.init_rules()),
                **prefixed("attn", self.attn.init_rules(std, out_std)),
                **prefixed("ffn_norm", self.ffn_norm.init_rules()),
                **prefixed("ffn", self.ffn.init_rules(std, out_std))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn_norm(x)
        x = x + self.attn(h, h)
        return x + self.ffn(self.ffn_norm(x))


class VisionEncoder(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.patch_size = vc.patch_size
        n_patches = (vc.image_size // vc.patch_size) ** 2
        self.patch_embed = nn.Linear(3 * vc.patch_size ** 2, vc.d_vision, bias=False)
        self.pos_embed = nn.Parameter(torch.empty(n_patches, vc.d_vision))
        self.blocks = nn.ModuleList([EncoderBlock(vc.d_vision, vc.encoder_heads)
                                     for _ in range(vc.encoder_layers)])
        self.norm = RMSNorm(vc.d_vision)

    def init_rules(self, std: float) -> dict[str, Init]:
        out_std = residual_std(std, len(self.blocks))
        rules = {"patch_embed.weight": trunc_normal(std), "pos_embed": normal(std),
                 **prefixed("norm", self.norm.init_rules())}
        for j, block in enumerate(self.blocks):
            rules.update(prefixed(f"blocks.{j}", block.init_rules(std, out_std)))
        return rules

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, 3, H, W] in [0, 1] -> [B, P, d_vision] (P = (H / p) * (W / p))."""
        p = self.patch_size
        x = (images - PIXEL_MEAN) / PIXEL_STD
        x = rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)
        x = self.patch_embed(x.to(self.patch_embed.weight.dtype)) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class ResamplerLayer(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.media_norm = RMSNorm(dim)
        self.latent_norm = RMSNorm(dim)
        self.attn = CrossAttention(dim, dim, n_heads, n_heads, dim // n_heads)
        self.ffn_norm = RMSNorm(dim)
        self.ffn = FeedForward(dim, 4 * dim, "gelu")

    def init_rules(self, std: float, out_std: float) -> dict[str, Init]:
        return {**prefixed("media_norm", self.media_norm.init_rules()),
                **prefixed("latent_norm", self.latent_norm.init_rules()),
                **prefixed("attn", self.attn.init_rules(std, out_std)),
                **prefixed("ffn_norm", self.ffn_norm.init_rules()),
                **prefixed("ffn", self.ffn.init_rules(std, out_std))}

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        lat = self.latent_norm(latents)
        # Flamingo: the latents attend to the media AND to themselves (keys concatenated).
        latents = latents + self.attn(lat, torch.cat([self.media_norm(media), lat], dim=1))
        return latents + self.ffn(self.ffn_norm(latents))


class PerceiverResampler(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.empty(vc.n_latents, vc.d_vision))
        self.layers = nn.ModuleList([ResamplerLayer(vc.d_vision, vc.encoder_heads)
                                     for _ in range(vc.resampler_layers)])
        self.norm = RMSNorm(vc.d_vision)

    def init_rules(self, std: float) -> dict[str, Init]:
        """The latents and the attention's wq / wk at std d^-0.5 (not ``std``): attention
        logits of order 1 at initialisation, so each latent's attention already depends on
        the image. At 0.02 the logits are ~0, every latent is the mean of the patches (mostly
        black background), and measured, 300 steps of pre-training (moe/vision/pretrain.py)
        left the what-is-where loss at the label prior (1.7); at d^-0.5, 0.44."""
        out_std = residual_std(std, len(self.layers))
        wide = self.latents.shape[1] ** -0.5
        rules = {"latents": normal(wide), **prefixed("norm", self.norm.init_rules())}
        for j, layer in enumerate(self.layers):
            rules.update(prefixed(f"layers.{j}", layer.init_rules(std, out_std)))
            rules[f"layers.{j}.attn.wq.weight"] = trunc_normal(wide)
            rules[f"layers.{j}.attn.wk.weight"] = trunc_normal(wide)
        return rules

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        """media: [B, P, d] -> [B, n_latents, d]."""
        latents = self.latents.expand(media.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(media, latents)
        return self.norm(latents)
