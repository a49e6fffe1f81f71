"""``vision:``: the Flamingo-style image encoder and its generated data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moe.config.fields import ConfigError, choice, nonnegative, positive


@dataclass
class VisionConfig:
    """``vision:`` a Flamingo-style image encoder joined to the text model by gated
    cross-attention (moe/vision/, docs/vision.md). ``enabled: false`` (the default) is a
    text-only run and every other key is unused. The text model keeps its ``model:`` keys, so
    a vision run can start from a text run's weights (``train.init_from``)."""
    SECTION: ClassVar[str] = "vision"
    enabled: bool = False
    # Images: made on the machine (moe/vision/data.py), square RGB, cut into patches.
    image_size: int = 32
    patch_size: int = 4
    # The ViT patch encoder: d_vision wide, encoder_layers deep.
    d_vision: int = 64
    encoder_layers: int = 2
    encoder_heads: int = 4
    # The Perceiver resampler: n_latents learned queries per image (Flamingo: 64).
    n_latents: int = 16
    resampler_layers: int = 1
    # A gated cross-attention block before text layers 0, k, 2k, ... (k = cross_attn_every);
    # its feed-forward is cross_attn_ffn_mult * model.d_model wide. Tokens see the latest
    # image at or before them (attend: last, Flamingo) or every one (all).
    cross_attn_every: int = 2
    cross_attn_ffn_mult: int = 4
    attend: str = "last"
    # Train only the vision parts (encoder, resampler, cross-attention): Flamingo's frozen LM.
    freeze_text: bool = False
    # Train the encoder and resampler only in their own pre-training (pretrain_steps), then
    # freeze them: Flamingo's frozen vision encoder. Without it the language-model loss
    # reshapes them, and they lose what the pre-training put there (docs/vision.md).
    freeze_encoder: bool = False
    # Steps of the vision encoder's own pre-training before step 1 of a new run (what is in
    # each grid cell, moe/vision/pretrain.py) at pretrain_lr: without it the gates do not
    # open. 0: none.
    pretrain_steps: int = 1500
    pretrain_lr: float = 1e-3
    # What reads the latents in that pre-training: linear (one head on all latents at once),
    # attention (one learned query per cell, through a multi-query cross-attention as the
    # text model's: each cell's contents must be where a query can find them) or both (the
    # two losses summed). docs/vision.md has what each gives.
    pretrain_head: str = "linear"
    # The generated data set (cached in data.cache_dir): images per split, objects per image.
    n_train: int = 20000
    n_val: int = 512
    n_heldout: int = 256
    max_objects: int = 3
    data_seed: int = 0
    # Weight in the training loss of each answer token of a question text (what follows
    # "a:" up to its "."; moe/vision/task.py answer_token_mask) against 1 for every other
    # token; the loss stays a weighted mean per token. The validation losses stay unweighted.
    answer_loss_weight: float = 1.0
    # The text model's own language-model pre-training before step 1 of a new run, as the
    # encoder's (moe/vision/text_pretrain.py): text_pretrain_steps AdamW steps on data.*
    # windows of model.max_seq_len tokens at text_pretrain_lr, a fresh optimizer after.
    # Flamingo starts from a pretrained LM; here binding needs it (docs/vision.md). 0: none.
    text_pretrain_steps: int = 0
    text_pretrain_lr: float = 3e-3
    # From step binding_from on, binding_share of each batch's rows are single binding
    # questions on training images ("q: is there a red circle? a: yes.", a yes and a
    # distractor no per image; moe/vision/task.py VisionLoader), asked once the colour and
    # shape reading has formed: from the start they are not learnt (docs/vision.md).
    binding_share: float = 0.0
    binding_from: int = 0
    # null: a binding row's tokens weigh as a text's (answer_loss_weight on its answer); a
    # number: its answer alone is a target, at this weight (the question's tokens are not:
    # they say nothing about binding), so the answers keep a share of each step's loss.
    binding_answer_weight: float | None = None

    def validate(self) -> None:
        positive(self, "image_size", "patch_size", "d_vision", "encoder_layers",
                  "encoder_heads", "n_latents", "resampler_layers", "cross_attn_every",
                  "cross_attn_ffn_mult", "n_train", "n_val", "n_heldout", "max_objects")
        choice(self, "attend", ("last", "all"))
        choice(self, "pretrain_head", ("linear", "attention", "both"))
        nonnegative(self, "pretrain_steps", "text_pretrain_steps", "binding_from")
        if not 0 <= self.binding_share < 1:
            raise ConfigError(f"vision.binding_share={self.binding_share} must be in [0, 1): "
                              "the share of each batch's rows that are binding questions")
        positive(self, "pretrain_lr", "text_pretrain_lr", "answer_loss_weight")
        if self.binding_answer_weight is not None:
            positive(self, "binding_answer_weight")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision.image_size={self.image_size} is not a multiple of "
                              f"vision.patch_size={self.patch_size}")
        if self.d_vision % self.encoder_heads or (self.d_vision // self.encoder_heads) % 2:
            raise ConfigError(f"vision.d_vision={self.d_vision} must be vision.encoder_heads="
                              f"{self.encoder_heads} times an even head size")
        if not 1 <= self.max_objects <= 3:
            raise ConfigError(f"vision.max_objects={self.max_objects} must be 1, 2 or 3 (the "
                              "scenes have distinct colours and shapes)")
