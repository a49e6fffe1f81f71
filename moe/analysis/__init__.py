"""Diagnostics of trained checkpoints: routing report and batch dependence.

- :mod:`moe.analysis.windows`: held-out windows per corpus source (the model comes from
  ``moe.checkpoint.load_model``); ``with_data``: the ``--data.key=value`` overrides every
  analysis command takes (other text, the run's own tokenizer).
- :mod:`moe.analysis.routing`: load per expert, drops, router entropy and code/prose
  specialisation per MoE layer (``scripts/routing_report.py``).
- :mod:`moe.analysis.batch`: how a prompt's next-token distribution changes with the other
  sequences of its capacity group (``scripts/batch_dependence.py``).
- :mod:`moe.analysis.context`: validation loss by position bucket, for context extension
  (``scripts/eval_context.py``, docs/long_context.md).
- :mod:`moe.analysis.plots`: the PNG drawing the sweeps and reports use.
"""

from moe.analysis.batch import batch_dependence, group_forward
from moe.analysis.routing import routing_report, write_routing_report
from moe.analysis.windows import source_windows, val_windows, with_data

__all__ = ["source_windows", "val_windows", "with_data", "routing_report",
           "write_routing_report", "batch_dependence", "group_forward"]
