"""``train.init_from: upcycle:SOURCE``: a new MoE run whose step 0 is the upcycle of a dense
model (our dense run or step folder, or a Hugging Face Llama / Qwen2 folder), made once into
``<data.cache_dir>/upcycle-<fingerprint>`` and then read as any ``init_from`` checkpoint, into
any layout (moe/train/init_from.py).

The run's config is the upcycled model's. Its ``model.*`` keys must be the source's as
upcycling leaves them (``upcycle_base``: every layer MoE, experts of the dense FFN's size,
renormalised weights) except ``MAY_SET``, the MoE layer's own keys (how many experts of what
size, top-k, routing, capacity, balancing; ``init_std`` only draws the router; which layers
stay dense), and the keys the caller adds (init_from's ``model.max_seq_len``,
``model.rope_scaling``). The granularity is the run's: dense hidden / ``model.expert_hidden``
(moe/upcycle/upcycle.py). The router is drawn from ``train.seed``; there is no noise
(``moe-upcycle --noise`` writes a noisy upcycle to start from instead).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

from moe.config import Config, saved_differences
from moe.upcycle.upcycle import (
    UpcycleError,
    dense_hidden,
    expert_granularity,
    is_hf_folder,
    load_source,
    upcycle_base,
    upcycle_model,
)

# The MoE layer's keys: what the run may set that the dense source has no say in.
MAY_SET = ("n_experts", "top_k", "expert_hidden", "capacity_factor", "eval_capacity_factor",
           "min_capacity", "drop_policy", "router_weights", "capacity_group_seqs",
           "router_jitter", "aux_loss_coef", "z_loss_coef", "expert_impl", "router_score",
           "route_scale", "balance", "bias_update_rate", "seq_aux_loss_coef", "routing",
           "init_std", "moe_every", "dense_layers")


def upcycle_problems(source: Config, hidden: int, cfg: Config,
                     keep: tuple[str, ...] = ()) -> list[str]:
    """``"model.key (source's -> run's)"`` for each model key the run ``cfg`` changes from
    the upcycled ``source`` outside ``MAY_SET`` and ``keep`` (dotted keys); ``ffn_hidden`` may
    differ only while no layer stays dense."""
    expected = upcycle_base(source, hidden)
    m = cfg.model
    free = set(MAY_SET) | {k.partition(".")[2] for k in keep if k.startswith("model.")}
    if all(m.is_moe_layer(i) for i in range(m.n_layers)):
        free.add("ffn_hidden")
    for key in free:
        setattr(expected.model, key, copy.deepcopy(getattr(m, key)))
    return [f"{key} ({old!r} -> {now!r})"
            for key, old, now in saved_differences(expected.to_dict(), cfg, ["model"])]


def _fingerprint(src: Path, cfg: Config) -> str:
    """Short sha256 of what the upcycle depends on: the run's model config and seed, and the
    source (a Hugging Face folder's fingerprint; our checkpoint's path and its files' names,
    sizes and modification times)."""
    from moe.checkpoint import resolve_checkpoint
    from moe.hf.import_hf import folder_fingerprint

    h = hashlib.sha256(json.dumps({"model": cfg.to_dict()["model"], "seed": cfg.train.seed},
                                  sort_keys=True, default=str).encode())
    if is_hf_folder(src):
        h.update(folder_fingerprint(src).encode())
    else:
        checkpoint = resolve_checkpoint(src)
        h.update(str(checkpoint.resolve()).encode())
        for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
            st = path.stat()
            h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def upcycle_cached(src: str | Path, cfg: Config, keep: tuple[str, ...] = ()) -> Path:
    """The run folder of ``src`` upcycled to ``cfg.model`` under ``cfg.data.cache_dir``
    (``upcycle-<fingerprint>``), made on first use. Its config is the source's with the run's
    model section, so ``init_from`` compares the data keys as for the source itself.
    UpcycleError (one line) names every model key the run may not change (``keep``: dotted
    keys it may besides ``MAY_SET``)."""
    from moe.hf.import_hf import build_once, write_run

    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist: name our dense run (or step) folder or "
                                "a Hugging Face Llama / Qwen2 folder")
    run = Path(cfg.data.cache_dir) / f"upcycle-{_fingerprint(src, cfg)}"

    def write(tmp: Path) -> None:
        dense, source, marker, tokenizer = load_source(src, run)
        hidden = dense_hidden(dense)
        problems = upcycle_problems(source, hidden, cfg, keep)
        if problems:
            raise UpcycleError(f"this run changes {', '.join(problems)} from the upcycled "
                               f"{src}; upcycling sets only the MoE layer's keys (experts, "
                               f"top_k, routing, capacity, balancing: MAY_SET in "
                               f"moe/upcycle/cached.py): use the source's values")
        expert_granularity(cfg.model, hidden)
        config = copy.deepcopy(source)
        config.model = copy.deepcopy(cfg.model)
        config.train.init_from, config.train.run_dir = None, str(run)
        model = upcycle_model(dense, cfg.model, cfg.train.seed)
        write_run(tmp, model, config.validate(), marker, tokenizer)

    return build_once(run, write)
