"""Layout choices made for the user: pipeline micro-batches when parallel.pp_microbatches is
unset."""

from pathlib import Path

import pytest

from moe.config import ConfigError, load_config
from moe.parallel.mesh import ParallelDims

ROOT = Path(__file__).resolve().parents[1]


def _dims(overrides, path=None):
    cfg = load_config(path, overrides)
    dims = ParallelDims.from_config(cfg)
    dims.validate(cfg, dims.world_size)
    return dims, cfg


@pytest.mark.parametrize("overrides, expected", [
    # (batch, micro, pp, dp, group) -> fewest whole-group micro-batches, >= pp, <= micro each
    (["--train.batch_size=16", "--train.micro_batch_size=16", "--parallel.pp=2"], 2),
    (["--train.batch_size=16", "--train.micro_batch_size=4", "--parallel.pp=2"], 4),
    (["--train.batch_size=16", "--train.micro_batch_size=16", "--parallel.pp=4",
      "--model.n_layers=4"], 4),
    (["--train.batch_size=12", "--train.micro_batch_size=12", "--parallel.pp=2",
      "--parallel.dp=1"], 2),
    (["--train.batch_size=24", "--train.micro_batch_size=8", "--parallel.pp=2",
      "--model.capacity_group_seqs=4"], 3),  # 6 groups of 4: 3 micro-batches of 8
    (["--train.batch_size=24", "--train.micro_batch_size=24", "--parallel.pp=2",
      "--parallel.dp=2", "--model.capacity_group_seqs=4"], 3),  # local 12 = 3 groups: 3 of 4
    (["--train.batch_size=16", "--train.micro_batch_size=16", "--parallel.pp=2",
      "--parallel.pp_microbatches=8"], 8),  # set: kept
])
def test_pp_microbatches_chosen(overrides, expected):
    dims, cfg = _dims(overrides)
    assert dims.pp_microbatches(cfg) == expected


def test_first_run_config_takes_tp2_pp2_as_typed():
    # `torchrun --nproc_per_node=4 scripts/train.py --config configs/tiny.yaml --parallel.tp=2
    # --parallel.pp=2` failed validation ("needs at least parallel.pp=2 micro-batches, got 1").
    dims, cfg = _dims(["--parallel.tp=2", "--parallel.pp=2"], ROOT / "configs/tiny.yaml")
    n = dims.pp_microbatches(cfg)
    assert n >= 2 and cfg.train.batch_size % n == 0


@pytest.mark.parametrize("overrides, needle", [
    (["--train.batch_size=2", "--train.micro_batch_size=2", "--parallel.pp=2",
      "--model.capacity_group_seqs=2"], "cannot make parallel.pp=2 micro-batches"),
    (["--train.batch_size=16", "--train.micro_batch_size=16", "--parallel.pp=2",
      "--parallel.pp_microbatches=1"], "needs at least parallel.pp=2"),
    (["--train.batch_size=16", "--train.micro_batch_size=16", "--parallel.pp=2",
      "--parallel.pp_microbatches=3"], "must split into parallel.pp_microbatches=3"),
])
def test_pp_microbatches_errors_say_what_to_change(overrides, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        _dims(overrides)
    assert "\n" not in str(e.value)
