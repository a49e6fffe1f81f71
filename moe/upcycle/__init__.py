"""Sparse upcycling (Komatsuzaki et al. 2022): a dense model becomes an MoE whose experts are
copies (or, granular, slices of copies) of its feed-forward, with a fresh router.
``upcycle.py``: ``upcycle_model`` (the weights) and ``upcycle`` (a run folder from our dense
run or a Hugging Face Llama / Qwen2 folder), the ``moe-upcycle`` command's work;
``cached.py``: ``train.init_from: upcycle:SOURCE`` (the upcycle made once into the data cache,
the run's config checked against the source)."""

from moe.upcycle.cached import MAY_SET, upcycle_cached, upcycle_problems
from moe.upcycle.upcycle import (
    UpcycleError,
    expert_granularity,
    upcycle,
    upcycle_model,
    upcycled_config,
)

__all__ = ["MAY_SET", "UpcycleError", "expert_granularity", "upcycle",
           "upcycle_cached", "upcycle_model", "upcycle_problems", "upcycled_config"]
