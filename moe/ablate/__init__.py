"""Ablation sweeps: a grid over config keys x seeds, one ``python -m moe.cli.train`` process
per point.

    python scripts/ablate.py --config configs/ablate.yaml --seeds 2 --out runs/ablate \\
        --grid model.n_experts=1,4,16 model.capacity_factor=1.0,1.25,2.0,null

Layout of the sweep folder ``<out>``::

    sweep.json                 the command, grid, seeds, git revision and base config of the sweep
    runs/<name>/               one run folder per point (config.yaml, metrics.jsonl, checkpoints/,
                               train.log = the process's stdout and stderr, ablate.json)
    results.csv                one row per run (see results.RESULT_COLUMNS)
    summary.md                 mean +- std over seeds per grid point
    *.png                      plots (plots.py)

A point's name is built from its grid values and seed, e.g.
``n_experts=4__capacity_factor=1.25__seed=0``, so re-running the same command finds the same
folders: a point whose run folder holds the final checkpoint and a val row at ``max_steps`` is
skipped, an interrupted one resumes from its last checkpoint (the trainer resumes exactly), and
a point that fails (non-zero exit, or a config error found before launching) is recorded with
``status=failed`` and the end of its log, and the sweep goes on.

Points that would train the same model share one run (``same_as`` in results.csv): two configs
that differ only in capacity factors giving the same capacities (``run_identity``). With one
expert and top-1, every capacity factor >= 1 is dropless; with 4 experts, top-2 and groups of
64 tokens, 2.0 gives 64 slots, as many as the group has tokens. Such runs are bit-identical, so
training them again would only spend time.

One job per file; each imports only files listed above it, except that ``run_sweep`` imports
plots.py (and so matplotlib) when it draws:
    points.py   the grid, point names, the fixed-compute rule (``fixed_compute``), run identity
    results.py  results.csv and summary.md (mean ± std, deltas paired by seed)
    sweep.py    launching points, judging their run folders, ``run_sweep``
    plots.py    the sweep's PNGs from its rows and its runs' metrics
                (drawing: moe/analysis/plots.py)
"""

from moe.ablate.points import (
                               Point,
                               fixed_compute,
                               format_value,
                               make_points,
                               parse_grid,
                               point_name,
                               run_identity,
)
from moe.ablate.results import read_results, summary_markdown, write_results
from moe.ablate.sweep import is_finished, run_point, run_stats, run_sweep, train_command

__all__ = ["Point", "fixed_compute", "format_value", "is_finished", "make_points",
           "parse_grid", "point_name", "read_results", "run_identity", "run_point", "run_stats",
           "run_sweep", "summary_markdown", "train_command", "write_results"]
