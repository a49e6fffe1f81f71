"""One typed config: defaults < YAML file < ``--section.key=value`` overrides.

Every key lives in a dataclass below; an unknown key, a value of the wrong type or an
impossible combination raises :class:`ConfigError` with a one-line message that names the key
and says what to change. ``Config.to_dict()`` is what each run folder saves as ``config.yaml``.
"""

from __future__ import annotations

import codecs
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad key or value in a config; the message is one line naming the key."""


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats such as ``3e-3`` (1.1 wants ``3.0e-3``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _yaml_load(text: str):
    return yaml.load(text, Loader=_YamlLoader)


@dataclass
class RopeScalingConfig:
    """``model.rope_scaling``: stretch rotary positions past the pre-training context (the
    formulas and their papers: moe/model/rope.py; docs/long_context.md has the recipe)."""
    type: str = "yarn"  # linear | dynamic (NTK, no fine-tune needed) | yarn
    factor: float = 4.0  # the context grows by this factor (>= 1)
    # The pre-training context N: dynamic and yarn need it; linear ignores it.
    original_max_seq_len: int | None = None
    # YaRN's ramp: dimensions turning < beta_slow times over N tokens are interpolated, more
    # than beta_fast times kept as trained (the paper's and HF's defaults).
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    # YaRN's cos/sin multiplier; null: 0.1 ln(factor) + 1 (attention logits x its square).
    attention_factor: float | None = None

    def validate(self, max_seq_len: int) -> None:
        _choice(self, "type", ("linear", "dynamic", "yarn"))
        if not self.factor >= 1:
            raise ConfigError(f"model.rope_scaling.factor={self.factor} must be >= 1 (the context "
                              "grows by this factor)")
        n = self.original_max_seq_len
        if n is None and self.type != "linear":
            raise ConfigError(f"model.rope_scaling.original_max_seq_len is required for type="
                              f"{self.type}: set it to the pre-training context (e.g. 128)")
        if n is not None and not 0 < n <= max_seq_len:
            raise ConfigError(f"model.rope_scaling.original_max_seq_len={n} must be in "
                              f"[1, model.max_seq_len={max_seq_len}]")
        if not 0 < self.beta_slow < self.beta_fast:
            raise ConfigError(f"model.rope_scaling.beta_fast={self.beta_fast} and beta_slow="
                              f"{self.beta_slow} must satisfy 0 < beta_slow < beta_fast")
        if self.attention_factor is not None and not self.attention_factor > 0:
            raise ConfigError(f"model.rope_scaling.attention_factor={self.attention_factor} "
                              "must be > 0, or null for 0.1 ln(factor) + 1")
        if self.type == "yarn" and max_seq_len > self.factor * n:
            # YaRN's interpolated dimensions cover factor * N positions; past that they see
            # angles they never saw in training (extrapolation, which YaRN exists to avoid).
            raise ConfigError(f"model.max_seq_len={max_seq_len} exceeds model.rope_scaling."
                              f"factor={self.factor} x original_max_seq_len={n} = "
                              f"{self.factor * n:g}: raise factor to at least "
                              f"{max_seq_len / n:g} or lower max_seq_len")


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    # 1 = multi-query attention, n_heads = multi-head, in between = grouped-query.
    n_kv_heads: int = 1
    head_dim: int | None = None  # None: d_model // n_heads
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    # Context extension (linear | dynamic | yarn; null: plain RoPE): see RopeScalingConfig.
    rope_scaling: RopeScalingConfig | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    activation: str = "swiglu"  # swiglu | gelu
    init_std: float = 0.02
    # Feed-forward: layer i is MoE when (i + 1) % moe_every == 0 (1: every layer, 2: every other).
    moe_every: int = 1
    ffn_hidden: int = 1024  # hidden size of the dense feed-forward in non-MoE layers
    n_experts: int = 16
    top_k: int = 2
    expert_hidden: int = 512
    # capacity = ceil(capacity_factor * tokens_in_group * top_k / n_experts), at least min_capacity;
    # null = dropless. The eval factor applies in model.eval(): "train" (the default) = the same
    # as capacity_factor (so a dropless run also evaluates dropless), a number or null sets it.
    capacity_factor: float | None = 1.25
    eval_capacity_factor: float | str | None = "train"
    min_capacity: int = 4
    # Order of each expert's queue when capacity binds (the first `capacity` keep a slot):
    #   choice_major: all first choices in token order, then all second choices, ... (GShard,
    #                 Switch). Not causal: a later token's first choice can evict an earlier
    #                 token's second choice.
    #   token_major:  token order, a token's choices together (t0k0, t0k1, t1k0, ...; Megatron-Core
    #                 "position"). Causal with capacity_group_seqs=1.
    #   probs:        higher combine weight first, ties in token_major order. Not causal.
    drop_policy: str = "choice_major"
    # Combine weights: renorm = top-k softmax probs renormalised to sum 1 (Mixtral); raw = the
    # softmax probs of the chosen experts (Switch). auto = renorm for top_k >= 2, raw for top_k = 1
    # (renormalising one weight gives w / w = 1: a top-1 gate would get no LM-loss gradient).
    router_weights: str = "auto"
    # A capacity group is this many whole sequences: dropping never depends on the machine layout.
    capacity_group_seqs: int = 1
    router_jitter: float = 0.0  # multiplicative input noise U(1-eps, 1+eps) in training (Switch)
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    expert_impl: str = "auto"  # auto | grouped | bmm | loop (loop is the readable reference)
    # Routing research options (docs/moe.md, "Routing options"; moe/model/router.py).
    # Scores: softmax over experts (Mixtral, GShard) | sigmoid per expert (DeepSeek-V3); the
    # chosen weights are renormalised per router_weights, then multiplied by route_scale.
    router_score: str = "softmax"
    route_scale: float = 1.0
    # Balancing: aux_loss = the Switch/GShard loss at aux_loss_coef (applied ONLY here) | bias =
    # DeepSeek-V3's auxiliary-loss-free per-expert bias, added to the scores for selection only
    # and moved by bias_update_rate * sign(mean load - load) after every optimizer step, from
    # the global batch's loads (moe/model/balance.py) | none. seq_aux_loss_coef: DeepSeek-V3's
    # complementary sequence-wise balance loss (any balance; 0 = off).
    balance: str = "aux_loss"
    bias_update_rate: float = 1e-3
    seq_aux_loss_coef: float = 0.0
    # Always-on shared experts beside the routed ones (DeepSeekMoE), each of
    # shared_expert_hidden units (null: expert_hidden), run as ONE SwiGLU FFN of
    # n_shared_experts * shared_expert_hidden (the same function as summing separate ones).
    # n_experts=0 (with top_k=0) leaves only the shared experts: a dense FFN.
    n_shared_experts: int = 0
    shared_expert_hidden: int | None = None
    # token_choice: each token picks its top_k experts | expert_choice: each expert takes its
    # top-capacity tokens of every capacity group (Zhou et al. 2022; capacity =
    # ceil(capacity_factor * n * top_k / n_experts), so top_k * capacity_factor experts per
    # token on average). Expert choice is not causal: training and evaluation only.
    routing: str = "token_choice"

    def __post_init__(self) -> None:
        # ModelConfig(rope_scaling={"type": "yarn", ...}) from Python takes a mapping, as the
        # YAML path does; its keys are checked like config keys.
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = _coerce("model.rope_scaling", self.rope_scaling,
                                        RopeScalingConfig)

    def validate(self) -> None:
        if self.rope_scaling is not None and not isinstance(self.rope_scaling,
                                                            RopeScalingConfig):
            raise ConfigError(f"model.rope_scaling expects a mapping of "
                              f"{', '.join(f.name for f in dataclasses.fields(RopeScalingConfig))}"
                              f" (or null), got {self.rope_scaling!r}")
        _positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                  "max_seq_len", "moe_every", "ffn_hidden", "expert_hidden",
                  "capacity_group_seqs")
        self._validate_routing()
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} is not divisible by model.n_heads="
                              f"{self.n_heads}: change one of them or set model.head_dim")
        if self.head_dim is not None and (self.head_dim <= 0 or self.head_dim % 2):
            raise ConfigError(f"model.head_dim={self.head_dim} must be a positive even number")
        if self.head_dim is None and self.head_size % 2:  # rotary embeddings rotate pairs
            raise ConfigError(f"model.d_model={self.d_model} / model.n_heads={self.n_heads} = "
                              f"{self.head_size} is an odd head size (rotary embeddings need an "
                              f"even one): change d_model or n_heads, or set model.head_dim")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads="
                              f"{self.n_kv_heads}: use 1 (MQA), n_heads (MHA) or a divisor")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(f"model.capacity_factor={self.capacity_factor} must be > 0, or "
                              "null for dropless routing")
        ecf = self.eval_capacity_factor
        if isinstance(ecf, str) and ecf != "train":
            raise ConfigError(f"model.eval_capacity_factor={ecf!r} must be a number > 0, null "
                              "(dropless) or \"train\" (the same as model.capacity_factor)")
        if isinstance(ecf, (int, float)) and not ecf > 0:
            raise ConfigError(f"model.eval_capacity_factor={ecf} must be > 0, null (dropless) "
                              "or \"train\" (the same as model.capacity_factor)")
        _nonnegative(self, "min_capacity", "router_jitter", "aux_loss_coef", "z_loss_coef")
        if self.router_jitter >= 1:
            raise ConfigError(f"model.router_jitter={self.router_jitter} must be in [0, 1)")
        _choice(self, "activation", ("swiglu", "gelu"))
        if self.drop_policy == "position":
            raise ConfigError("model.drop_policy='position' was split in two: token_major is the "
                              "old order (Megatron's \"position\"), choice_major (the new default) "
                              "queues all first choices first (GShard, Switch)")
        _choice(self, "drop_policy", ("choice_major", "token_major", "probs"))
        _choice(self, "router_weights", ("auto", "renorm", "raw"))
        _choice(self, "expert_impl", ("auto", "grouped", "bmm", "loop"))
        if self.rope_theta <= 0 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ConfigError("model.rope_theta, model.norm_eps and model.init_std must be > 0")
        if self.rope_scaling is not None:
            self.rope_scaling.validate(self.max_seq_len)

    def _validate_routing(self) -> None:
        """n_experts / top_k and the routing research options (router_score ... routing)."""
        _choice(self, "router_score", ("softmax", "sigmoid"))
        _choice(self, "balance", ("aux_loss", "bias", "none"))
        _choice(self, "routing", ("token_choice", "expert_choice"))
        _nonnegative(self, "bias_update_rate", "seq_aux_loss_coef", "n_shared_experts")
        if not self.route_scale > 0:
            raise ConfigError(f"model.route_scale={self.route_scale} must be > 0")
        if self.shared_expert_hidden is not None and self.shared_expert_hidden <= 0:
            raise ConfigError(f"model.shared_expert_hidden={self.shared_expert_hidden} must be "
                              "> 0, or null (= model.expert_hidden)")
        if self.n_experts == 0:
            if self.n_shared_experts == 0 or self.top_k != 0:
                raise ConfigError(f"model.n_experts=0 (no routed experts) needs "
                                  f"model.n_shared_experts >= 1 and model.top_k=0, got "
                                  f"n_shared_experts={self.n_shared_experts}, top_k={self.top_k}")
            if self.balance == "bias" or self.routing == "expert_choice":
                raise ConfigError(f"model.n_experts=0 has no router for model.balance="
                                  f"{self.balance} / model.routing={self.routing}: set "
                                  f"balance=aux_loss (or none) and routing=token_choice")
            return
        _positive(self, "n_experts", "top_k")
        if self.top_k > self.n_experts:
            raise ConfigError(f"model.top_k={self.top_k} must be <= model.n_experts="
                              f"{self.n_experts}: lower top_k or add experts")
        if (self.routing == "token_choice" and self.top_k == 1
                and self.router_weights_resolved == "renorm" and self.balance != "aux_loss"
                and not self.seq_aux_loss_coef):
            # One renormalised weight is w / w = 1: no loss reaches the gate (measured gate
            # gradient 6.7e-13), so routing stays where initialisation put it.
            raise ConfigError(f"model.top_k=1 with model.router_weights=renorm gives every "
                              f"token the weight 1, and with model.balance={self.balance} the "
                              f"gate gets no gradient: set model.router_weights=raw (Switch) "
                              f"or auto")
        if self.routing == "expert_choice":
            if self.drop_policy != "choice_major" or self.router_weights != "auto":
                raise ConfigError(f"model.routing=expert_choice has no token queues or top-k "
                                  f"weights: leave model.drop_policy (got {self.drop_policy}) "
                                  f"and model.router_weights (got {self.router_weights}) at "
                                  f"their defaults")
            if self.balance != "none" or self.seq_aux_loss_coef:
                raise ConfigError(f"model.routing=expert_choice balances by construction: set "
                                  f"model.balance=none (got {self.balance}) and "
                                  f"model.seq_aux_loss_coef=0 (got {self.seq_aux_loss_coef})")
            if self.capacity_factor is None or self.eval_capacity_factor_resolved is None:
                raise ConfigError("model.routing=expert_choice needs a capacity: "
                                  "model.capacity_factor and model.eval_capacity_factor must be "
                                  "numbers (null would give every expert every token)")

    @property
    def shared_hidden_total(self) -> int:
        """Hidden units of the shared-expert FFN of an MoE layer (0 without shared experts)."""
        per = self.expert_hidden if self.shared_expert_hidden is None else self.shared_expert_hidden
        return self.n_shared_experts * per

    @property
    def eval_capacity_factor_resolved(self) -> float | None:
        """The capacity factor of model.eval(): ``"train"`` means capacity_factor."""
        ecf = self.eval_capacity_factor
        return self.capacity_factor if ecf == "train" else ecf

    @property
    def router_weights_resolved(self) -> str:
        """renorm or raw: ``auto`` is renorm for top_k >= 2 (Mixtral), raw for top_k = 1 (Switch).
        The router and the Hugging Face export both read this."""
        if self.router_weights == "auto":
            return "renorm" if self.top_k >= 2 else "raw"
        return self.router_weights

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        return (i + 1) % self.moe_every == 0


@dataclass
class DataConfig:
    # builtin: the running interpreter's standard library (code) + pydoc_data.topics (prose).
    # hf: a Hugging Face hub dataset by name. files: local text / JSONL / parquet files.
    source: str = "builtin"
    hf_name: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    files: list = field(default_factory=list)  # paths or globs, for source=files
    # Explicit validation documents: files (same formats as data.files; no hash split of
    # data.files then) or a split of the hub dataset (e.g. "validation"); empty / null: the
    # hash split by data.val_fraction.
    val_files: list = field(default_factory=list)
    hf_val_split: str | None = None
    text_field: str = "text"
    # Local files are decoded with this codec (ASCII-compatible: utf-8, latin-1, cp1252, ...);
    # undecodable bytes: strict = a one-line error naming file, line and byte offset,
    # replace = U+FFFD in their place and one warning line per file.
    encoding: str = "utf-8"
    encoding_errors: str = "strict"
    # A text file longer than this many characters is cut into documents of about this size
    # (at a blank line, else a line end, in the next chunk_chars): one big input.txt still gets
    # a train/val split. 0: one document per file.
    chunk_chars: int = 20000
    # Per-source epochs of the built-in mixture (the reports: text twice, code four times).
    code_epochs: float = 4.0
    text_epochs: float = 2.0
    code_max_mb: float | None = None  # cap on stdlib source read (None: all of it)
    val_fraction: float = 0.02  # of documents, chosen by a stable hash of the document name
    seq_len: int = 256
    cache_dir: str = "data/cache"
    tokenizer_train_mb: float = 64.0  # at most this much training text feeds the BPE trainer
    # The validation set: this many windows of seq_len + 1 tokens spread evenly over the val
    # split, the same in every run and layout whatever train.micro_batch_size (evaluation cuts
    # them into micro-batches; the loss is a mean per token). A multiple of
    # model.capacity_group_seqs.
    val_windows: int = 128

    def validate(self) -> None:
        _choice(self, "source", ("builtin", "hf", "files"))
        if self.source == "hf" and not self.hf_name:
            raise ConfigError("data.hf_name is required when data.source=hf")
        if self.source == "files" and not self.files:
            raise ConfigError("data.files is required when data.source=files (paths or globs)")
        if self.val_files and self.source != "files":
            raise ConfigError(f"data.val_files is for data.source=files, not {self.source!r}: "
                              "use data.hf_val_split for a hub dataset")
        if self.hf_val_split is not None and self.source != "hf":
            raise ConfigError(f"data.hf_val_split is for data.source=hf, not {self.source!r}")
        if self.hf_val_split is not None and self.hf_val_split == self.hf_split:
            raise ConfigError(f"data.hf_val_split={self.hf_val_split!r} is also data.hf_split: "
                              "validate on another split, or null for the hash split")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ConfigError(f"data.encoding={self.encoding!r} is not a Python codec: use e.g. "
                              "utf-8, latin-1 or cp1252") from None
        _choice(self, "encoding_errors", ("strict", "replace"))
        _nonnegative(self, "chunk_chars")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        _positive(self, "seq_len", "tokenizer_train_mb", "val_windows")
        _nonnegative(self, "code_epochs", "text_epochs")
        if self.code_epochs + self.text_epochs <= 0:
            raise ConfigError("data.code_epochs + data.text_epochs must be > 0")


@dataclass
class TrainConfig:
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
    # checkpoint already in run_dir wins: the run resumes from it instead.
    init_from: str | None = None
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    # Recompute activations in backward to save memory (moe/parallel/activation_checkpoint.py):
    # none | full (each block re-run whole) | selective (matmul/attention outputs kept).
    activation_checkpointing: str = "none"
    threads: int = 0  # torch CPU threads; 0 = torch's default
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
        _positive(self, "batch_size", "micro_batch_size", "max_steps", "eval_every",
                  "ckpt_every", "keep_checkpoints", "sample_temperature",
                  "max_nonfinite")
        _nonnegative(self, "lr", "warmup_steps", "weight_decay", "grad_clip", "batch_ramp_tokens",
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
        _choice(self, "device", ("auto", "cpu", "cuda"))
        _choice(self, "dtype", ("auto", "fp32", "bf16"))
        _choice(self, "optimizer_impl", ("fused", "foreach", "for-loop"))
        _choice(self, "activation_checkpointing", ("none", "full", "selective"))
        _choice(self, "on_nonfinite", ("stop", "skip", "rollback"))

    def ramp_increment(self, group_seqs: int) -> int:
        """The batch ramp's step in sequences: batch_ramp_increment, or one capacity group."""
        return self.batch_ramp_increment or group_seqs


@dataclass
class ParallelConfig:
    # tp * pp * dp * ep must equal the world size. Data is split over dp * ep ranks (expert
    # parallel ranks hold different experts and see different data); experts are split over ep.
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b
    # Micro-batches per step and data rank under pipeline parallelism; null: the local batch
    # divided by train.micro_batch_size.
    pp_microbatches: int | None = None
    pp_stages_per_rank: int = 2  # virtual stages per rank for interleaved_1f1b
    pp_layers: list | None = None  # layers per stage, e.g. [1, 3]; null: as even as possible
    zero1: bool = False  # shard AdamW state over the data-parallel ranks (ZeRO stage 1)
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    # Collective timeout: bounds a rank that hangs without dying (a dead rank is noticed at
    # once on one node: gloo / torchrun's agent stop the others; docs/distributed.md,
    # "Elastic restarts").
    timeout_s: int = 600

    def validate(self) -> None:
        _positive(self, "tp", "pp", "dp", "ep", "pp_stages_per_rank", "timeout_s")
        _choice(self, "pp_schedule", ("gpipe", "1f1b", "interleaved_1f1b"))
        _choice(self, "backend", ("auto", "gloo", "nccl"))
        if self.pp_microbatches is not None and self.pp_microbatches <= 0:
            raise ConfigError(f"parallel.pp_microbatches={self.pp_microbatches} must be > 0")
        if self.pp_layers is not None and (
                not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                        for n in self.pp_layers)):
            raise ConfigError(f"parallel.pp_layers={self.pp_layers} must be a list of positive "
                              f"layer counts, one per pipeline stage")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.ep


@dataclass
class LogConfig:
    wandb: str = "disabled"  # disabled | offline | online
    wandb_project: str = "moe"
    wandb_group: str | None = None
    log_every: int = 10
    progress: bool = True

    def validate(self) -> None:
        _choice(self, "wandb", ("disabled", "offline", "online"))
        _positive(self, "log_every")


@dataclass
class VisionConfig:
    """``vision:`` a Flamingo-style image encoder joined to the text model by gated
    cross-attention (moe/vision/, docs/vision.md). ``enabled: false`` (the default) is a
    text-only run and every other key is unused. The text model keeps its ``model:`` keys, so
    a vision run can start from a text run's weights (``train.init_from``)."""
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

    def validate(self) -> None:
        _positive(self, "image_size", "patch_size", "d_vision", "encoder_layers",
                  "encoder_heads", "n_latents", "resampler_layers", "cross_attn_every",
                  "cross_attn_ffn_mult", "n_train", "n_val", "n_heldout", "max_objects")
        _choice(self, "attend", ("last", "all"))
        _choice(self, "pretrain_head", ("linear", "attention", "both"))
        _nonnegative(self, "pretrain_steps")
        _positive(self, "pretrain_lr")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision.image_size={self.image_size} is not a multiple of "
                              f"vision.patch_size={self.patch_size}")
        if self.d_vision % self.encoder_heads or (self.d_vision // self.encoder_heads) % 2:
            raise ConfigError(f"vision.d_vision={self.d_vision} must be vision.encoder_heads="
                              f"{self.encoder_heads} times an even head size")
        if not 1 <= self.max_objects <= 3:
            raise ConfigError(f"vision.max_objects={self.max_objects} must be 1, 2 or 3 (the "
                              "scenes have distinct colours and shapes)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    log: LogConfig = field(default_factory=LogConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        m, d, t = self.model, self.data, self.train
        if d.seq_len > m.max_seq_len:
            raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len="
                              f"{m.max_seq_len}: raise max_seq_len or shorten seq_len")
        g = m.capacity_group_seqs
        for key in ("micro_batch_size", "batch_size"):
            if getattr(t, key) % g:
                raise ConfigError(f"train.{key}={getattr(t, key)} must be a multiple of "
                                  f"model.capacity_group_seqs={g} (groups are whole sequences)")
        if d.val_windows % g:
            raise ConfigError(f"data.val_windows={d.val_windows} must be a multiple of "
                              f"model.capacity_group_seqs={g} (groups are whole sequences)")
        for key in ("batch_ramp_start", "batch_ramp_increment"):
            if getattr(t, key) % g:
                raise ConfigError(f"train.{key}={getattr(t, key)} must be a multiple of "
                                  f"model.capacity_group_seqs={g}")
        p = self.parallel
        if t.compile and p.pp > 1:
            raise ConfigError(f"train.compile=true is not supported with parallel.pp={p.pp} "
                              "(pipeline stages run uncompiled): set train.compile=false")
        if p.ep > 1 and m.n_experts == 0:
            raise ConfigError(f"parallel.ep={p.ep} splits routed experts, and model.n_experts=0 "
                              "has none: set parallel.ep=1")
        if p.backend == "nccl" and t.device == "cpu":
            raise ConfigError("parallel.backend=nccl needs CUDA tensors, but train.device=cpu: "
                              "use parallel.backend=gloo (or auto)")
        if m.routing == "expert_choice" and m.n_experts:
            self._check_expert_choice_capacity()
        if m.expert_impl == "grouped":
            self._check_grouped_mm()
        if self.vision.enabled:
            self._check_vision()
        return self

    def _check_vision(self) -> None:
        """What a vision run supports: data parallelism (and expert parallelism, which splits
        the text model's experts only); tensor and pipeline parallelism refuse."""
        p = self.parallel
        if p.tp > 1 or p.pp > 1:
            raise ConfigError(f"vision.enabled runs support parallel.dp and parallel.ep, not "
                              f"tp={p.tp} pp={p.pp}: set parallel.tp=1 and parallel.pp=1")
        if self.train.batch_ramp_tokens:
            raise ConfigError("vision.enabled runs take a fixed batch: set "
                              "train.batch_ramp_tokens=0")

    def _check_expert_choice_capacity(self) -> None:
        """Expert choice whose capacity is every token of a group makes each expert take every
        token: a dense model with extra weights, not a routing experiment."""
        from moe.model.router import expert_capacity

        m = self.model
        n = m.capacity_group_seqs * self.data.seq_len  # tokens in a group
        for key, cf in (("capacity_factor", m.capacity_factor),
                        ("eval_capacity_factor", m.eval_capacity_factor_resolved)):
            cap = expert_capacity(n, m.top_k, m.n_experts, cf, m.min_capacity)
            if cap >= n:
                raise ConfigError(f"model.routing=expert_choice with model.{key}={cf} gives "
                                  f"each expert {cap} slots for the {n} tokens of a capacity "
                                  f"group: every expert takes every token; lower {key} below "
                                  f"n_experts / top_k = {m.n_experts / m.top_k:g} (and "
                                  f"model.min_capacity={m.min_capacity} below {n})")

    def _check_grouped_mm(self) -> None:
        """``torch._grouped_mm``'s requirements (moe/model/experts.py), checked before a run
        starts: bf16 on CUDA, rows of 16 bytes (d_model and expert_hidden / tp multiples of 8
        in bf16, of 4 in fp32)."""
        m, t, tp = self.model, self.train, self.parallel.tp
        if t.device == "cuda" and t.dtype == "fp32":
            raise ConfigError("model.expert_impl=grouped needs bf16 on CUDA, but train.dtype="
                              "fp32: set train.dtype=bf16 (or auto), or model.expert_impl=auto")
        bf16 = t.dtype == "bf16" or (t.dtype == "auto" and t.device == "cuda")
        align = 8 if bf16 else 4
        if m.d_model % align or (m.expert_hidden // tp) % align:
            raise ConfigError(f"model.expert_impl=grouped needs model.d_model={m.d_model} and "
                              f"model.expert_hidden / parallel.tp = {m.expert_hidden // tp} to "
                              f"be multiples of {align} ({'bf16' if bf16 else 'fp32'}, 16-byte "
                              f"rows): change them, or use model.expert_impl=auto")

    def notices(self) -> list[str]:
        """One line for each accepted setting that does something other than its name says
        (the trainer prints them before step 1)."""
        m, out = self.model, []
        if m.n_experts and not any(m.is_moe_layer(i) for i in range(m.n_layers)):
            out.append(f"model.moe_every={m.moe_every} > model.n_layers={m.n_layers}: no layer "
                       f"is MoE, a dense model (model.n_experts, top_k and the routing keys are "
                       f"unused)")
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Loading: defaults < YAML < CLI


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a validated Config from an optional YAML file and ``--section.key=value`` strings."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = _yaml_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        raw = loaded
        for dotted, why in _REPLACED.items():
            section, key = dotted.split(".")
            if isinstance(raw.get(section), dict) and key in raw[section]:
                raise ConfigError(f"config file {path}: {dotted} was {why}")
    cfg = from_dict(raw)
    apply_overrides(cfg, overrides or [])
    return cfg.validate()


# Keys that no longer exist: a YAML file or override naming one gets this line; a run folder
# saved with one is read through ``upgrade_saved`` (the same meaning in today's keys).
_REPLACED = {"train.eval_batches": "replaced by data.val_windows, a number of windows (the "
                                   "former set was eval_batches x train.micro_batch_size)"}


def upgrade_saved(raw: dict) -> dict:
    """A saved config (a run folder's ``config.yaml``, a checkpoint's) in today's keys, the same
    run: ``train.eval_batches`` x ``train.micro_batch_size`` windows become
    ``data.val_windows`` (exactly the windows evaluated then)."""
    train = dict(raw.get("train") or {})
    if "eval_batches" not in train:
        return raw
    micro = train.get("micro_batch_size", TrainConfig.micro_batch_size)
    data = dict(raw.get("data") or {})
    data.setdefault("val_windows", train.pop("eval_batches") * micro)
    return {**raw, "train": train, "data": data}


def from_dict(raw: dict) -> Config:
    """A Config from a mapping of sections (a saved run's keys are upgraded first)."""
    raw = upgrade_saved(raw)
    cfg = Config()
    for section, values in raw.items():
        if section not in _sections():
            raise ConfigError(f"unknown config section '{section}': use one of "
                              f"{', '.join(_sections())}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping")
        for key, value in values.items():
            set_key(cfg, f"{section}.{key}", value)
    return cfg


def parse_override(arg: str) -> tuple[str, Any]:
    """``--model.top_k=2`` -> ("model.top_k", 2); values are parsed as YAML scalars."""
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"bad override '{arg}': write --section.key=value")
    key, text = arg[2:].split("=", 1)
    try:
        return key, _yaml_load(text) if text != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override --{key}: {text!r} is not a YAML value "
                          f"({getattr(e, 'problem', None) or 'parse error'}): quote it") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line for a YAML error: "line 3, column 7: mapping values are not allowed here"."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark else what


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    for arg in overrides:
        key, value = parse_override(arg)
        set_key(cfg, key, value)
    return cfg


def set_key(cfg: Config, dotted: str, value: Any) -> None:
    """``section.key`` = value; ``section.key.sub`` sets one field of a nested mapping key
    (``model.rope_scaling.type=yarn``), creating it with its defaults when it is null."""
    parts = dotted.split(".")
    if len(parts) not in (2, 3) or parts[0] not in _sections():
        raise ConfigError(f"unknown config key '{dotted}': keys look like section.key with "
                          f"section one of {', '.join(_sections())}")
    section = getattr(cfg, parts[0])
    if len(parts) == 2:
        _set_field(section, parts[0], parts[1], value)
        return
    hints = typing.get_type_hints(type(section))
    nested = _nested_type(hints[parts[1]]) if parts[1] in hints else None
    if nested is None:
        raise ConfigError(f"unknown config key '{dotted}': {parts[0]}.{parts[1]} is not a "
                          "mapping key (keys look like section.key)")
    if getattr(section, parts[1]) is None:
        setattr(section, parts[1], nested())
    _set_field(getattr(section, parts[1]), f"{parts[0]}.{parts[1]}", parts[2], value)


def _set_field(obj: Any, prefix: str, name: str, value: Any) -> None:
    hints = typing.get_type_hints(type(obj))
    if f"{prefix}.{name}" in _REPLACED:
        raise ConfigError(f"config key '{prefix}.{name}' was {_REPLACED[f'{prefix}.{name}']}")
    if name not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(obj))
        raise ConfigError(f"unknown config key '{prefix}.{name}'; {prefix} keys are: {known}")
    setattr(obj, name, _coerce(f"{prefix}.{name}", value, hints[name]))


def _nested_type(hint: Any) -> type | None:
    """The dataclass of a nested mapping key (``Optional[RopeScalingConfig]``), else None."""
    options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return options[0] if len(options) == 1 and dataclasses.is_dataclass(options[0]) else None


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) > 1:  # e.g. float | str: the first type that takes the value
            for option in options:
                try:
                    return _coerce(key, value, option)
                except ConfigError:
                    pass
            names = " or ".join(getattr(a, "__name__", str(a)) for a in options)
            raise ConfigError(f"config key '{key}' expects {names}, got {value!r}")
        (hint,) = options
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is list or typing.get_origin(hint) is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return list(value)
    elif dataclasses.is_dataclass(hint):  # a nested mapping: each key checked as a config key
        if isinstance(value, hint):
            return dataclasses.replace(value)
        if isinstance(value, dict):
            obj = hint()
            for k, v in value.items():
                _set_field(obj, key, str(k), v)
            return obj
        fields = ", ".join(f.name for f in dataclasses.fields(hint))
        raise ConfigError(f"config key '{key}' expects a mapping of {fields} (or null), "
                          f"got {value!r}")
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"config key '{key}' expects {name}, got {value!r}")


def _sections() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def _section_name(obj: Any) -> str:
    return {ModelConfig: "model", DataConfig: "data", TrainConfig: "train",
            ParallelConfig: "parallel", LogConfig: "log",
            RopeScalingConfig: "model.rope_scaling", VisionConfig: "vision"
            }.get(type(obj), type(obj).__name__)


def _positive(obj: Any, *keys: str) -> None:
    for k in keys:
        v = getattr(obj, k)
        if not v > 0:
            raise ConfigError(f"{_section_name(obj)}.{k}={v} must be > 0")


def _nonnegative(obj: Any, *keys: str) -> None:
    for k in keys:
        v = getattr(obj, k)
        if v < 0:
            raise ConfigError(f"{_section_name(obj)}.{k}={v} must be >= 0")


def _choice(obj: Any, key: str, options: tuple[str, ...]) -> None:
    v = getattr(obj, key)
    if v not in options:
        raise ConfigError(f"{_section_name(obj)}.{key}={v!r} must be one of {', '.join(options)}")
