"""Parallel sizes, their validation and the device mesh.

``ParallelDims`` holds the sizes, every check of a layout against a config (``validate``) and,
once built (``build_mesh``, done by ``moe.parallel.launch.init_distributed``), the device mesh:
``dims.mesh()`` is the whole mesh, ``dims.mesh("tp")`` one dimension, ``dims.mesh("dp_ep")`` a
flattened one.

Mesh dimensions, outermost first: ``("pp", "dp", "ep", "tp")``; tensor parallelism innermost
so its ranks share a node's fast links. A rank's data shard is its (dp, ep) coordinate: expert-
parallel ranks hold different experts *and* see different data, so dense parameters are
replicated over dp * ep ranks and expert parameters over dp ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from moe.config import Config, ConfigError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

MESH_DIMS = ("pp", "dp", "ep", "tp")
# 1-D meshes over several dims, made once with the mesh (every rank, same order) and then
# looked up by name like any dim: mesh["dp_ep"].
FLAT_DIMS = {"dp_ep": ("dp", "ep")}  # data ranks: dense gradients are summed here


@dataclass(frozen=True)
class ParallelDims:
    """The parallel sizes, their checks, and (once built) the device mesh over them."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    _mesh: DeviceMesh | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_config(cls, cfg: Config) -> ParallelDims:
        p = cfg.parallel
        return cls(tp=p.tp, pp=p.pp, dp=p.dp, ep=p.ep)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.ep

    @property
    def data_shards(self) -> int:
        """Ranks that see different data: dp * ep."""
        return self.dp * self.ep

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.pp, self.dp, self.ep, self.tp)

    def build_mesh(self, device_type: str = "cpu") -> DeviceMesh:
        """Make the ``("pp", "dp", "ep", "tp")`` mesh (and its flattened dims, ``FLAT_DIMS``)
        over the initialised process group; kept on this object. Collective: every rank."""
        from torch.distributed.device_mesh import init_device_mesh

        if self._mesh is not None:
            raise RuntimeError("the device mesh is already built")
        mesh = init_device_mesh(device_type, self.shape, mesh_dim_names=MESH_DIMS)
        for name, dims in FLAT_DIMS.items():
            mesh[dims]._flatten(name)
        object.__setattr__(self, "_mesh", mesh)  # frozen: sizes never change, the mesh is set once
        return mesh

    def mesh(self, dim: str | None = None) -> DeviceMesh | None:
        """The whole mesh, or the 1-D mesh of ``dim`` (a ``MESH_DIMS`` or ``FLAT_DIMS`` name);
        None in a single process (no mesh built)."""
        if self._mesh is None:
            return None
        return self._mesh if dim is None else self._mesh[dim]

    def describe(self) -> str:
        return (f"parallel.tp={self.tp} x parallel.pp={self.pp} x parallel.dp={self.dp} x "
                f"parallel.ep={self.ep}")

    def validate(self, cfg: Config, world_size: int) -> None:
        """Check the sizes against the world, the model and the training batch; errors name
        every size."""
        self.validate_layout(cfg, world_size)
        self.check_training_batch(cfg)

    def validate_layout(self, cfg: Config, world_size: int) -> None:
        """The checks a model split needs, training or not (inference runs these alone): the
        world size, heads, hidden sizes and experts divisible, the pipeline split possible."""
        if self.world_size != world_size:
            raise ConfigError(f"{self.describe()} = {self.world_size}, but the world size is "
                              f"{world_size}: make their product equal the number of processes")
        m = cfg.model
        if m.n_heads % self.tp:
            raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by parallel.tp="
                              f"{self.tp} ({self.describe()}, world size {world_size})")
        if m.n_kv_heads % self.tp and m.n_kv_heads != 1:
            raise ConfigError(f"model.n_kv_heads={m.n_kv_heads} must be 1 (replicated) or "
                              f"divisible by parallel.tp={self.tp}")
        if m.qk_norm == "projection" and self.tp > 1:
            raise ConfigError(f"model.qk_norm=projection normalises over every head, which "
                              f"parallel.tp={self.tp} splits: use tp=1 (dp, pp and ep apply)")
        n_moe = sum(m.is_moe_layer(i) for i in range(m.n_layers))
        if n_moe and m.expert_hidden % self.tp:
            raise ConfigError(f"model.expert_hidden={m.expert_hidden} is not divisible by "
                              f"parallel.tp={self.tp}")
        if n_moe and m.shared_hidden_total % self.tp:
            raise ConfigError(f"model.n_shared_experts x shared expert hidden = "
                              f"{m.shared_hidden_total} is not divisible by parallel.tp={self.tp}")
        if n_moe < m.n_layers and m.ffn_hidden % self.tp:
            raise ConfigError(f"model.ffn_hidden={m.ffn_hidden} is not divisible by "
                              f"parallel.tp={self.tp}")
        if m.n_experts % self.ep:
            raise ConfigError(f"model.n_experts={m.n_experts} is not divisible by parallel.ep="
                              f"{self.ep} ({self.describe()}, world size {world_size})")
        if self.ep > 1 and n_moe == 0:
            raise ConfigError(f"parallel.ep={self.ep} needs MoE layers (model.moe_every)")
        self.check_pipeline(cfg)

    def check_training_batch(self, cfg: Config) -> None:
        """The training batch splits over the data ranks and pipeline micro-batches."""
        t = cfg.train
        g = cfg.model.capacity_group_seqs
        if t.batch_size % (self.data_shards * g):
            raise ConfigError(f"train.batch_size={t.batch_size} must be a multiple of "
                              f"parallel.dp x parallel.ep = {self.data_shards} times "
                              f"model.capacity_group_seqs={g}")
        if self.pp > 1:
            self.pp_microbatches(cfg)  # raises when the local batch cannot be split
            if t.batch_ramp_tokens:
                raise ConfigError("train.batch_ramp_tokens is not supported with parallel.pp > 1")
        if t.batch_ramp_tokens:
            self.check_batch_ramp(cfg)

    def check_batch_ramp(self, cfg: Config) -> None:
        """The ramp's batches (moe/optim/adamw.py ``batch_size_at``) are the config's alone; this
        layout must split each into whole capacity groups per data rank, which holds for
        every ramp value exactly when it holds for the start and the increment."""
        t, g = cfg.train, cfg.model.capacity_group_seqs
        unit = self.data_shards * g
        inc = t.ramp_increment(g)
        for key, value in (("batch_ramp_start", t.batch_ramp_start or inc),
                           ("batch_ramp_increment", inc)):
            if value % unit:
                raise ConfigError(f"train.{key}={value} does not split over parallel.dp x "
                                  f"parallel.ep = {self.data_shards} data ranks in capacity "
                                  f"groups of model.capacity_group_seqs={g}: set "
                                  f"train.batch_ramp_start and train.batch_ramp_increment to "
                                  f"multiples of {unit}")

    def check_pipeline(self, cfg: Config) -> None:
        """Raise ConfigError when the pipeline split cannot exist: ``parallel.pp_layers`` not
        matching the stages, fewer layers than stages (both checked by ``split_layers``, the
        split the trainer and the accounting use), tied embeddings over several stages."""
        from moe.parallel.pipeline import n_pipeline_stages, split_layers

        if self.pp > 1 and cfg.model.tie_embeddings:
            raise ConfigError("model.tie_embeddings=true is not supported with parallel.pp > 1 "
                              "(the embedding and the head live on different stages)")
        split_layers(cfg.model.n_layers, n_pipeline_stages(cfg, self.pp), cfg.parallel.pp_layers)

    def pp_microbatches(self, cfg: Config) -> int:
        """Micro-batches per step and data rank under pipeline parallelism.

        ``parallel.pp_microbatches`` when set. Otherwise the fewest micro-batches (so each is
        as large as ``train.micro_batch_size`` allows) that are whole capacity groups, split
        the local batch evenly and number at least ``parallel.pp`` (what 1F1B needs; more also
        shrinks GPipe's bubble): ``tiny.yaml``'s batch of 16 at pp=2 gives 2 of 8 sequences.
        """
        t, p, g = cfg.train, cfg.parallel, cfg.model.capacity_group_seqs
        local = t.batch_size // self.data_shards
        if p.pp_microbatches is not None:
            n = p.pp_microbatches
            if local % n or (local // n) % g:
                raise ConfigError(f"the local batch of {local} sequences (train.batch_size / "
                                  f"(dp x ep)) must split into parallel.pp_microbatches={n} "
                                  f"micro-batches of whole capacity groups of {g}")
            if p.pp_schedule != "gpipe" and n < self.pp:
                raise ConfigError(f"parallel.pp_schedule={p.pp_schedule} needs at least "
                                  f"parallel.pp={self.pp} micro-batches, got "
                                  f"parallel.pp_microbatches={n}: raise it or leave it unset")
            return n
        groups = local // g
        least = max(self.pp, -(-local // t.micro_batch_size))
        for n in range(least, groups + 1):
            if groups % n == 0:
                return n
        raise ConfigError(f"the local batch of {local} sequences ({groups} capacity groups of "
                          f"{g}) cannot make parallel.pp={self.pp} micro-batches of whole "
                          f"groups: raise train.batch_size or lower model.capacity_group_seqs")
