"""Sparse upcycling (Komatsuzaki et al. 2022): a dense model becomes an MoE whose experts are
copies of its feed-forward, with a fresh router. ``upcycle.py``: ``upcycle_model`` (the weights)
and ``upcycle`` (a run folder from our dense run or a Hugging Face Llama / Qwen2 folder), the
``moe-upcycle`` command's work."""

from moe.upcycle.upcycle import UpcycleError, upcycle, upcycle_model, upcycled_config

__all__ = ["UpcycleError", "upcycle", "upcycle_model", "upcycled_config"]
