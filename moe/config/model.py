"""``model:``: the architecture (attention, experts, routing, rotary positions)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from moe.config.fields import ConfigError, choice, coerce, nonnegative, positive


@dataclass
class RopeScalingConfig:
    """``model.rope_scaling``: stretch rotary positions past the pre-training context (the
    formulas and their papers: moe/model/rope.py; docs/long_context.md has the recipe)."""
    SECTION: ClassVar[str] = "model.rope_scaling"
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
        choice(self, "type", ("linear", "dynamic", "yarn"))
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
    SECTION: ClassVar[str] = "model"
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
    # RMSNorm on queries and keys before the rotary embedding (both off by default):
    # head = over each head's head_dim, one weight [head_dim] shared by the heads (Qwen3);
    # projection = over the whole q / k projection, weights [n_heads * head_dim] and
    # [n_kv_heads * head_dim] (OLMoE). Modules: layers.{i}.attention.{q_norm,k_norm}.
    qk_norm: str = "none"
    # Biases on the q, k and v projections (Qwen2); wo has none.
    qkv_bias: bool = False
    activation: str = "swiglu"  # swiglu | gelu
    init_std: float = 0.02
    # Feed-forward: layer i is MoE when (i + 1) % moe_every == 0 (1: every layer, 2: every other).
    moe_every: int = 1
    # Layers given a dense FFN whatever moe_every says (Qwen-MoE's mlp_only_layers).
    dense_layers: list = field(default_factory=list)
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
    # Scale the shared experts' output per token by sigmoid(x . w), w [1, d_model]: the module
    # feed_forward.shared_expert_gate (Qwen2-MoE). Needs n_shared_experts >= 1.
    shared_expert_gate: bool = False
    # token_choice: each token picks its top_k experts | expert_choice: each expert takes its
    # top-capacity tokens of every capacity group (Zhou et al. 2022; capacity =
    # ceil(capacity_factor * n * top_k / n_experts), so top_k * capacity_factor experts per
    # token on average). Expert choice is not causal: training and evaluation only.
    routing: str = "token_choice"

    def __post_init__(self) -> None:
        # ModelConfig(rope_scaling={"type": "yarn", ...}) from Python takes a mapping, as the
        # YAML path does; its keys are checked like config keys.
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = coerce("model.rope_scaling", self.rope_scaling,
                                        RopeScalingConfig)

    def validate(self) -> None:
        if self.rope_scaling is not None and not isinstance(self.rope_scaling,
                                                            RopeScalingConfig):
            raise ConfigError(f"model.rope_scaling expects a mapping of "
                              f"{', '.join(f.name for f in dataclasses.fields(RopeScalingConfig))}"
                              f" (or null), got {self.rope_scaling!r}")
        positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
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
        nonnegative(self, "min_capacity", "router_jitter", "aux_loss_coef", "z_loss_coef")
        if self.router_jitter >= 1:
            raise ConfigError(f"model.router_jitter={self.router_jitter} must be in [0, 1)")
        choice(self, "activation", ("swiglu", "gelu"))
        choice(self, "qk_norm", ("none", "head", "projection"))
        bad = [i for i in self.dense_layers
               if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.n_layers]
        if bad or len(set(self.dense_layers)) != len(self.dense_layers):
            raise ConfigError(f"model.dense_layers={self.dense_layers} must list distinct layer "
                              f"indices in [0, model.n_layers={self.n_layers})")
        if self.drop_policy == "position":
            raise ConfigError("model.drop_policy='position' was split in two: token_major is the "
                              "old order (Megatron's \"position\"), choice_major (the new default) "
                              "queues all first choices first (GShard, Switch)")
        choice(self, "drop_policy", ("choice_major", "token_major", "probs"))
        choice(self, "router_weights", ("auto", "renorm", "raw"))
        choice(self, "expert_impl", ("auto", "grouped", "bmm", "loop"))
        if self.rope_theta <= 0 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ConfigError("model.rope_theta, model.norm_eps and model.init_std must be > 0")
        if self.rope_scaling is not None:
            self.rope_scaling.validate(self.max_seq_len)

    def _validate_routing(self) -> None:
        """n_experts / top_k and the routing research options (router_score ... routing)."""
        choice(self, "router_score", ("softmax", "sigmoid"))
        choice(self, "balance", ("aux_loss", "bias", "none"))
        choice(self, "routing", ("token_choice", "expert_choice"))
        nonnegative(self, "bias_update_rate", "seq_aux_loss_coef", "n_shared_experts")
        if not self.route_scale > 0:
            raise ConfigError(f"model.route_scale={self.route_scale} must be > 0")
        if self.shared_expert_hidden is not None and self.shared_expert_hidden <= 0:
            raise ConfigError(f"model.shared_expert_hidden={self.shared_expert_hidden} must be "
                              "> 0, or null (= model.expert_hidden)")
        if self.shared_expert_gate and not self.n_shared_experts:
            raise ConfigError("model.shared_expert_gate=true gates the shared experts: set "
                              "model.n_shared_experts >= 1 (or the gate to false)")
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
        positive(self, "n_experts", "top_k")
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
        return (i + 1) % self.moe_every == 0 and i not in self.dense_layers
