"""``Config``: every section together, and the checks that read more than one section."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from moe.config.data import DataConfig
from moe.config.fields import ConfigError
from moe.config.log import LogConfig
from moe.config.model import ModelConfig
from moe.config.parallel import ParallelConfig
from moe.config.train import TrainConfig
from moe.config.vision import VisionConfig


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
        if t.compile and p.dp_shard == "fsdp":
            raise ConfigError("train.compile=true is not supported with parallel.dp_shard=fsdp "
                              "(the whole-model compile would trace FSDP's hooks): drop one")
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
        if p.dp_shard == "fsdp":  # its one-element tanh gates split over no data ranks
            raise ConfigError("vision.enabled runs support parallel.dp_shard=none or zero1, not "
                              "fsdp (the gates cross_attn.*.attn_gate have one element)")
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
