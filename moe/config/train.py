"""``train:``: batch, schedule, optimizer, evaluation, checkpoints and the run folder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moe.config.fields import ConfigError, choice, nonnegative, positive


@dataclass
class TrainConfig:
    SECTION: ClassVar[str] = "train"
    seed: int = 1337
    batch_size: int = 16  # global batch, in sequences
    micro_batch_size: int = 16  # sequences per forward; accumulation = batch / micro
    # Batch-size ramp-up: the global batch grows linearly from batch_ramp_start (0: one
    # increment) to batch_size over the first batch_ramp_tokens tokens (0 disables), in steps
    # of batch_ramp_increment sequences (0: model.capacity_group_seqs). The batches depend on
    # these keys only; a layout whose data ranks cannot split start and increment is refused.
    batch_ramp_tokens: int = 0
    batch_ramp_start: int = 0
    batch_ramp_increment: int = 0
    max_steps: int = 300
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    # Length of the cosine decay; null = max_steps. Set it when a run will be extended later
    # (a larger max_steps on resume), so the schedule, and the losses, match an unbroken run.
    decay_steps: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    # AdamW kernel: fused (one kernel over all tensors; 3-5x faster than torch's CPU default,
    # the for-loop, on 2 cores: see moe/optim/adamw.py) | foreach | for-loop. Same update up to
    # float rounding.
    optimizer_impl: str = "fused"
    eval_every: int = 50  # (the validation set itself: data.val_windows)
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    run_dir: str = "runs/tiny"
    # A new run from a trained model's weights (a run folder or a step_* folder) with a fresh
    # optimizer, schedule and data position; only model.max_seq_len, model.rope_scaling and
    # data.seq_len (and any train.* key) may differ from its config (moe/train/init_from.py). A
    # checkpoint already in run_dir wins: the run resumes from it instead. "hf:DIR": a Hugging
    # Face folder, imported once (moe/hf/import_hf.py); from an import only model.* keys are
    # compared, and data.tokenizer must be set. "upcycle:SOURCE": this run's MoE upcycled from
    # a dense run or HF Llama / Qwen2 folder, made once (moe/upcycle/cached.py); only the MoE
    # layer's model keys may differ from the source's.
    init_from: str | None = None
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    # Recompute activations in backward to save memory (moe/parallel/activation_checkpoint.py):
    # none | full (each block re-run whole) | selective (matmul/attention outputs kept).
    activation_checkpointing: str = "none"
    threads: int = 0  # torch CPU threads; 0 = torch's default (one per physical core)
    # A step whose loss or global gradient norm is not finite: stop (one-line error, the last
    # checkpoint kept) | skip (drop that batch's update) | rollback (reload the latest
    # checkpoint, keep the data position past the batch: PaLM's answer to loss spikes).
    on_nonfinite: str = "stop"
    max_nonfinite: int = 10  # skip/rollback give up after this many events with no progress
    sample_tokens: int = 200
    sample_prompt: str = "def "
    sample_temperature: float = 0.8
    sample_top_k: int = 50

    def validate(self) -> None:
        positive(self, "batch_size", "micro_batch_size", "max_steps", "eval_every",
                  "ckpt_every", "keep_checkpoints", "sample_temperature",
                  "max_nonfinite")
        nonnegative(self, "lr", "warmup_steps", "weight_decay", "grad_clip", "batch_ramp_tokens",
                     "batch_ramp_start", "batch_ramp_increment", "sample_tokens", "sample_top_k",
                     "threads")
        if self.decay_steps is not None and self.decay_steps <= 0:
            raise ConfigError(f"train.decay_steps={self.decay_steps} must be > 0 or null")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"train.batch_size={self.batch_size} must be a multiple of "
                              f"train.micro_batch_size={self.micro_batch_size}")
        if self.batch_ramp_start > self.batch_size:
            raise ConfigError(f"train.batch_ramp_start={self.batch_ramp_start} must be <= "
                              f"train.batch_size={self.batch_size}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError("train.beta1 and train.beta2 must be in [0, 1)")
        if not self.eps > 0:
            raise ConfigError(f"train.eps={self.eps} must be > 0 (AdamW divides by "
                              f"sqrt(v) + eps)")
        choice(self, "device", ("auto", "cpu", "cuda"))
        choice(self, "dtype", ("auto", "fp32", "bf16"))
        choice(self, "optimizer_impl", ("fused", "foreach", "for-loop"))
        choice(self, "activation_checkpointing", ("none", "full", "selective"))
        choice(self, "on_nonfinite", ("stop", "skip", "rollback"))

    def ramp_increment(self, group_seqs: int) -> int:
        """The batch ramp's step in sequences: batch_ramp_increment, or one capacity group."""
        return self.batch_ramp_increment or group_seqs
