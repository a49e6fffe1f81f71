"""Ablation sweeps: grid parsing, the fixed-compute rule, point commands, resume, failures,
plots."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe.ablate import (
    fixed_compute,
    is_finished,
    make_points,
    parse_grid,
    read_results,
    run_identity,
    run_stats,
    run_sweep,
    summary_markdown,
    train_command,
)
from moe.ablate.plots import sweep_plots
from moe.ablate.sweep import train_env
from moe.config import ConfigError, load_config
from moe.train.metrics import read_metrics

PNG = b"\x89PNG\r\n\x1a\n"

# Seconds-long runs on 2 cores (as in tests/test_train.py).
TINY = ["--model.vocab_size=512", "--model.d_model=64", "--model.n_layers=2",
        "--model.n_heads=4", "--model.n_experts=4", "--model.top_k=2",
        "--model.expert_hidden=64", "--model.max_seq_len=32", "--data.seq_len=32",
        "--data.code_max_mb=0.3", "--train.batch_size=8", "--train.micro_batch_size=8",
        "--train.max_steps=3", "--train.warmup_steps=1", "--data.val_windows=16",
        "--train.eval_every=3", "--log.log_every=1", "--train.sample_tokens=0"]


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 1000, path


# ---------------------------------------------------------------------------------------------
# Grid parsing


def test_parse_grid_product_null_and_types():
    grid = parse_grid(["model.n_experts=1,4", "model.capacity_factor=1,1.25,null",
                       "--data.source=builtin"])
    assert grid == {"model.n_experts": [1, 4], "model.capacity_factor": [1.0, 1.25, None],
                    "data.source": ["builtin"]}
    assert isinstance(grid["model.capacity_factor"][0], float)  # coerced: names stay stable
    points = make_points(None, ["--data.seq_len=32", "--model.max_seq_len=32"],
                         {k: grid[k] for k in ("model.n_experts", "model.capacity_factor")},
                         2, Path("/tmp/sweep"))
    assert len(points) == 2 * 3 * 2
    names = [p.name for p in points]
    assert names[0] == "n_experts=1__capacity_factor=1.0__seed=0"
    assert "n_experts=4__capacity_factor=null__seed=1" in names
    assert len(set(names)) == len(names)
    assert [p.seed for p in points[:2]] == [1337, 1338]


@pytest.mark.parametrize("items, match", [
    (["model.n_experts"], "bad grid entry"),
    (["model.n_experts="], "bad grid entry"),
    (["=1,2"], "bad grid entry"),
    (["model.n_experts=1,,2"], "empty value"),
    (["model.n_experts=1,1"], "twice"),
    (["model.n_experts=1", "model.n_experts=2"], "given twice"),
    (["model.n_expert=1,2"], "model.n_expert"),
    (["modle.n_experts=1,2"], "modle.n_experts"),
    (["model.n_experts=1,many"], "model.n_experts"),
    (["model.n_experts=null"], "model.n_experts"),
    (["train.seed=1,2"], "--seeds"),
    ([], "empty"),
])
def test_parse_grid_errors(items, match):
    with pytest.raises(ConfigError, match=match):
        parse_grid(items)


# ---------------------------------------------------------------------------------------------
# Fixed compute


def _base(*extra):
    return load_config(None, ["--model.top_k=2", "--model.expert_hidden=128",
                              "--train.max_steps=300", "--train.batch_size=16",
                              "--train.micro_batch_size=16", "--data.seq_len=64",
                              "--model.max_seq_len=128", *extra])


def test_fixed_compute_rule():
    base = _base()
    # fewer experts than top_k: top-1 and the whole active width in one expert
    assert fixed_compute(base, {"model.n_experts": 1}) == {
        "model.top_k": 1, "model.expert_hidden": 256}
    assert fixed_compute(base, {"model.n_experts": 4, "model.capacity_factor": None}) == {}
    assert fixed_compute(base, {"model.n_experts": 64}) == {}
    # top_k as a grid key: expert_hidden keeps top_k * expert_hidden = 256
    assert fixed_compute(base, {"model.top_k": 1}) == {"model.expert_hidden": 256}
    assert fixed_compute(base, {"model.top_k": 4}) == {"model.expert_hidden": 64}
    assert fixed_compute(base, {"model.top_k": 4, "model.expert_hidden": 32}) == {}
    with pytest.raises(ConfigError, match="not divisible by top_k=3"):
        fixed_compute(base, {"model.top_k": 3})
    # token budget 300 * 16 * 64
    assert fixed_compute(base, {"train.batch_size": 32}) == {"train.max_steps": 150}
    assert fixed_compute(base, {"train.batch_size": 8, "data.seq_len": 128}) == {
        "train.max_steps": 300}
    assert fixed_compute(base, {"train.batch_size": 32, "train.max_steps": 10}) == {}
    with pytest.raises(ConfigError, match="token budget"):
        fixed_compute(base, {"train.batch_size": 7})


def test_points_apply_adjustments_and_overrides(tmp_path):
    grid = parse_grid(["model.n_experts=1,4"])
    over = ["--model.top_k=2", "--model.expert_hidden=128", "--data.seq_len=32",
            "--model.max_seq_len=32"]
    p1, p4 = make_points(None, over, grid, 1, tmp_path)
    assert p1.adjusted == {"model.top_k": 1, "model.expert_hidden": 256}
    assert (p1.cfg.model.top_k, p1.cfg.model.expert_hidden) == (1, 256)
    assert (p4.cfg.model.top_k, p4.cfg.model.expert_hidden) == (2, 128)
    assert p1.overrides[0] == "--log.progress=false"
    assert f"--train.run_dir={tmp_path / 'runs' / p1.name}" in p1.overrides
    assert "--train.seed=1337" in p1.overrides
    off = make_points(None, over, grid, 1, tmp_path, fixed=False)
    assert off[0].adjusted == {} and off[0].cfg is None and "top_k=2" in off[0].error
    # the user's own progress / wandb settings win; wandb runs get the sweep as their group
    p = make_points(None, over + ["--log.progress=true", "--log.wandb=offline"], grid, 1,
                    tmp_path, wandb_group="mysweep")[1]
    assert "--log.progress=false" not in p.overrides
    assert p.cfg.log.progress is True and p.cfg.log.wandb_group == "mysweep"


def test_train_command_plain_and_torchrun(tmp_path):
    (p,) = make_points(None, ["--data.seq_len=32", "--model.max_seq_len=32"],
                       parse_grid(["model.capacity_factor=null"]), 1, tmp_path)
    cmd = train_command(p, "configs/tiny.yaml")
    assert cmd[:3] == [sys.executable, "-m", "moe.cli.train"]  # a module, never scripts/ by path
    assert cmd[3:5] == ["--config", "configs/tiny.yaml"]
    assert "--model.capacity_factor=null" in cmd
    cmd = train_command(p, None, nproc=4)
    assert cmd[:7] == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc_per_node=4", "-m", "moe.cli.train"]
    assert "--config" not in cmd


@pytest.mark.slow
def test_train_module_runs_from_any_folder(tmp_path):
    """What train_command launches is the training CLI, also outside the checkout."""
    res = subprocess.run([sys.executable, "-m", "moe.cli.train", "--help"], cwd=tmp_path,
                         env=train_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "--config" in res.stdout and "--section.key=value" in res.stdout


def test_run_identity_is_the_capacity_not_the_factor():
    def ident(*over):
        return run_identity(load_config(None, ["--data.seq_len=64", "--model.max_seq_len=64",
                                               "--model.min_capacity=0", *over]))

    # one expert, top-1: every capacity factor >= 1 gives all 64 tokens a slot (dropless)
    dense = ["--model.n_experts=1", "--model.top_k=1"]
    assert len({ident(*dense, f"--model.capacity_factor={cf}")
                for cf in ("1.0", "1.25", "2.0", "null")}) == 1
    assert ident(*dense, "--model.capacity_factor=0.5") != ident(*dense)
    # 16 experts, top-2, 64 tokens: 8 vs 10 slots; 4 experts: 2.0 gives 64 slots = dropless
    assert ident("--model.capacity_factor=1.0") != ident("--model.capacity_factor=1.25")
    four = ["--model.n_experts=4", "--model.top_k=2"]
    assert ident(*four, "--model.capacity_factor=2.0") == ident(*four,
                                                                "--model.capacity_factor=null")
    # min_capacity binds: 16 experts, cf 0.25 and 0.5 both get the minimum of 4 slots
    assert (ident("--model.capacity_factor=0.25", "--model.min_capacity=4")
            == ident("--model.capacity_factor=0.5", "--model.min_capacity=4"))
    # the run folder does not matter; anything else does
    assert ident("--train.run_dir=a") == ident("--train.run_dir=b")
    assert ident("--train.seed=1") != ident("--train.seed=2")
    assert ident("--model.eval_capacity_factor=1.0") != ident("--model.eval_capacity_factor=2.0")


@pytest.mark.slow
def test_equivalent_points_share_one_run(tmp_path):
    """4 experts, top-2, 32-token groups: capacity factor 2.0 gives 32 slots, as dropless does.
    The second point is not trained; it reports the first one's run and numbers."""
    out = tmp_path / "sweep"
    rows = run_sweep(None, TINY + [f"--data.cache_dir={tmp_path / 'cache'}",
                                   "--model.eval_capacity_factor=null"],
                     parse_grid(["model.capacity_factor=2.0,null"]), 1, out,
                     echo=lambda s: None, plots=False)
    first, second = rows
    assert first["status"] == second["status"] == "ok"
    assert second["same_as"] == first["name"] and second["run_dir"] == first["run_dir"]
    assert second["final_val_loss"] == first["final_val_loss"]
    assert not (out / "runs" / second["name"]).exists()
    assert read_results(out / "results.csv")[1]["same_as"] == first["name"]
    assert f"`{second['name']}` = `{first['name']}`" in (out / "summary.md").read_text()


def test_finished_and_stats_from_metrics(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000020").mkdir(parents=True)
    rows = [{"step": s, "lm_loss": 5.0 - s / 10, "drop_frac": s / 100, "tokens_per_s": 100.0 + s}
            for s in range(1, 21)] + [{"step": 20, "tokens": 1, "val_loss": 3.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert not is_finished(run, 20)  # no extra.pt yet: not a complete checkpoint
    (run / "checkpoints" / "step_00000020" / "extra.pt").write_bytes(b"x")
    assert is_finished(run, 20) and not is_finished(run, 30)
    st = run_stats(run, 20)
    assert st["final_val_loss"] == 3.5 and st["final_lm_loss"] == 3.0
    assert st["drop_frac"] == pytest.approx((0.19 + 0.20) / 2)  # last 10% of 20 rows
    assert st["tokens_per_s"] == pytest.approx(110.5)


def test_read_metrics_skips_a_half_written_row(tmp_path):
    assert read_metrics(tmp_path) == []  # no metrics.jsonl yet
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lm_loss": 5.0}\n{"step": 2, "lm_')
    assert read_metrics(tmp_path) == [{"step": 1, "lm_loss": 5.0}]


def test_sweep_plots_from_rows_and_metrics(tmp_path):
    """The plots draw what they are given: the run folders named in the rows do not exist."""
    rows, metrics = [], {}
    for n in (1, 4):
        for cf in (1.0, None):
            for s in (0, 1):
                run = str(tmp_path / "nowhere" / f"{n}_{cf}_{s}")
                rows.append({"model.n_experts": n, "model.capacity_factor": cf, "seed_index": s,
                             "status": "ok", "final_val_loss": 3.0 + s - 0.1 * (n == 4),
                             "drop_frac": 0.1, "run_dir": run})
                layers = {str(i): {"tokens_per_expert": list(range(1, n + 1))} for i in (1, 3)}
                metrics[run] = [{"step": t, "lm_loss": 5.0 - t, "layers": layers}
                                for t in (1, 2)] + [{"step": 2, "tokens": 64, "val_loss": 4.0}]
    rows.append({"model.n_experts": 16, "model.capacity_factor": 1.0, "status": "failed"})
    warnings = []
    paths = sweep_plots(rows, ["model.n_experts", "model.capacity_factor"], tmp_path, metrics,
                        echo=warnings.append)
    assert not warnings and [p.stem for p in paths] == [
        "val_loss_vs_capacity", "drop_vs_capacity", "loss_curves", "expert_load_heatmap",
        "paired_deltas"]
    for p in paths:
        assert_png(p)
    assert not (tmp_path / "nowhere").exists()


def test_summary_mean_std():
    rows = [{"n": 4, "status": "ok", "final_val_loss": v, "drop_frac": 0.1, "tokens_per_s": 10}
            for v in (1.0, 2.0)] + [{"n": 16, "status": "failed", "error": "boom"}]
    md = summary_markdown(rows, ["n"], 2, True)
    # (no max/mean load in these rows: "-")
    assert "| 4 | 2/2 | 1.5000 ± 0.7071 | 0.1000 ± 0.0000 | - | 10 ± 0 |" in md
    assert "| 16 | 0/1 | - | - | - | - |" in md and "boom" in md


def test_summary_paired_deltas():
    # Seed 1 is worse everywhere by 0.5: the paired delta of n=16 is exactly -0.2 for both
    # seeds (std 0), though the unpaired val losses spread by 0.35 std.
    rows = [{"n": n, "cf": 1.0, "seed_index": s, "status": "ok", "drop_frac": 0.0,
             "tokens_per_s": 10, "final_val_loss": base + 0.5 * s}
            for n, base in ((4, 3.0), (16, 2.8)) for s in (0, 1)]
    md = summary_markdown(rows, ["n", "cf"], 2, True)
    assert "Δ val vs n=4" in md
    assert "| 4 | 1.0 | 2/2 | 3.2500 ± 0.3536 | - | - |" in md
    # sd 0: the interval is the point, and it excludes 0.
    assert "| 16 | 1.0 | 2/2 | 3.0500 ± 0.3536 | -0.2000 [-0.2000, -0.2000] | better |" in md
    assert "| n 4 → 16 | 1.0 | 2 | -0.2000 [-0.2000, -0.2000] | better |" in md
    assert "seed noise (std of val loss over seeds, mean over points) 0.3536" in md


# --- the statistics (moe/ablate/stats.py), on hand-computed numbers ---------------------------


def test_t_quantiles_and_intervals_by_hand():
    from moe.ablate.stats import mean_interval, t975, verdict

    assert t975(1) == 12.7062 and t975(2) == 4.3027 and t975(30) == 2.0423
    assert abs(t975(40) - 2.0211) < 2e-4 and abs(t975(120) - 1.9799) < 2e-4
    with pytest.raises(ValueError, match="at least 2"):
        t975(0)
    # d = [-0.03, -0.05, -0.04]: mean -0.04, sd 0.01, half-width 4.3027 * 0.01 / sqrt(3)
    iv = mean_interval([-0.03, -0.05, -0.04])
    half = 4.3027 * 0.01 / 3 ** 0.5  # 0.0248
    assert abs(iv.estimate + 0.04) < 1e-12 and abs(iv.sd - 0.01) < 1e-12
    assert abs(iv.low - (-0.04 - half)) < 1e-12 and abs(iv.high - (-0.04 + half)) < 1e-12
    assert iv.high < 0 and verdict(iv) == "better" and verdict(iv, lower_is_better=False) == \
        "worse"
    # The same mean with a spread that reaches 0: inconclusive.
    wide = mean_interval([-0.07, 0.01, -0.06])
    assert wide.low < 0 < wide.high and verdict(wide) == "inconclusive"
    assert verdict(mean_interval([0.3, 0.1])) == "inconclusive"  # t = 12.7 at 2 seeds
    assert verdict(mean_interval([0.2, 0.2])) == "worse"
    one = mean_interval([-0.5])
    assert one.n == 1 and verdict(one) == "inconclusive" and "no interval" in one.text()


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    from moe.ablate.stats import t975

    for df in list(range(1, 60)) + [100, 1000]:
        assert abs(t975(df) - stats.t.ppf(0.975, df)) < 1e-4, df


def test_paired_comparisons_pair_neighbours_by_seed():
    from moe.ablate.stats import paired_comparisons

    loss = {(1, 0): 3.50, (1, 1): 3.60, (1, 2): 3.40, (4, 0): 3.45, (4, 1): 3.56,
            (4, 2): 3.34, (16, 0): 3.44, (16, 1): 3.57, (16, 2): 3.33}
    rows = [{"n": n, "seed_index": s, "status": "ok", "final_val_loss": v}
            for (n, s), v in loss.items()]
    rows.append({"n": 16, "seed_index": 3, "status": "failed", "final_val_loss": None})
    comps = paired_comparisons(rows, ["n"])
    assert [(c.base, c.arm, c.interval.n) for c in comps] == [(1, 4, 3), (4, 16, 3)]
    # 1 -> 4: d = [-0.05, -0.04, -0.06], mean -0.05, sd 0.01: better.
    assert abs(comps[0].interval.estimate + 0.05) < 1e-9 and comps[0].verdict == "better"
    # 4 -> 16: d = [-0.01, +0.01, -0.01]: the interval holds 0.
    assert comps[1].verdict == "inconclusive"


# ---------------------------------------------------------------------------------------------
# A real sweep: two tiny runs, a point that cannot be configured, a point that crashes


@pytest.mark.slow
def test_sweep_runs_resumes_and_reports_failures(tmp_path):
    out = tmp_path / "sweep"
    over = TINY + [f"--data.cache_dir={tmp_path / 'cache'}"]
    grid = parse_grid(["model.top_k=1,2,99"])  # 99 > n_experts: a config error
    rows = run_sweep(None, over, grid, 1, out, fixed=False, echo=lambda s: None)
    status = {r["model.top_k"]: r["status"] for r in rows}
    assert status == {1: "ok", 2: "ok", 99: "failed"}
    assert "model.top_k=99" in rows[2]["error"]
    for r in rows[:2]:
        assert r["final_val_loss"] > 0 and r["active_params"] < r["total_params"]
        assert is_finished(r["run_dir"], 3)
        assert "$ " in (Path(r["run_dir"]) / "train.log").read_text()
    csv_rows = read_results(out / "results.csv")
    assert [r["status"] for r in csv_rows] == ["ok", "ok", "failed"]
    assert csv_rows[0]["top_k"] == 1 and csv_rows[0]["max_steps"] == 3
    assert "| 2 | 1/1 |" in (out / "summary.md").read_text()
    for name in ("val_loss_vs_capacity", "drop_vs_capacity", "loss_curves",
                 "expert_load_heatmap"):
        assert_png(out / f"{name}.png")

    # Re-run: finished points are skipped (moe.cli.train is not started: the logs do not grow).
    logs = {r["name"]: (out / "runs" / r["name"] / "train.log").read_text() for r in rows[:2]}
    mtimes = {n: os.stat(out / "runs" / n / "metrics.jsonl").st_mtime_ns for n in logs}
    again = run_sweep(None, over, grid, 1, out, fixed=False, echo=lambda s: None)
    assert [(r["status"], r["cached"]) for r in again] == [("ok", True), ("ok", True),
                                                           ("failed", False)]
    for n, text in logs.items():
        assert (out / "runs" / n / "train.log").read_text() == text
        assert os.stat(out / "runs" / n / "metrics.jsonl").st_mtime_ns == mtimes[n]
    assert [r["final_val_loss"] for r in again[:2]] == [r["final_val_loss"] for r in rows[:2]]

    # A point whose training process fails is recorded with the end of its log.
    bad = run_sweep(None, over + ["--data.val_windows=100000"],
                    parse_grid(["model.capacity_factor=null"]), 1, tmp_path / "bad",
                    echo=lambda s: None, plots=False)
    assert bad[0]["status"] == "failed" and "exit 2" in bad[0]["error"]  # a one-line error
    assert "val_windows" in bad[0]["error"] and "Traceback" not in bad[0]["error"]


@pytest.mark.slow
def test_jobs_run_points_at_once_with_bit_identical_results(tmp_path):
    """--jobs 2 trains two points at once; at a fixed --threads-per-job every number of every
    run is bit-identical to --jobs 1 (threads are per job, never derived from --jobs)."""
    from moe.train.metrics import read_metrics

    over = TINY + [f"--data.cache_dir={tmp_path / 'cache'}"]
    grid = parse_grid(["model.top_k=1,2"])
    runs = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        rows = run_sweep(None, over, grid, 1, out, fixed=False, echo=lambda s: None,
                         plots=False, jobs=jobs, threads=1)
        assert [r["status"] for r in rows] == ["ok", "ok"]
        assert json.loads((out / "sweep.json").read_text())["jobs"] == jobs
        runs[jobs] = [[{k: v for k, v in m.items() if k not in ("tokens_per_s", "time")}
                       for m in read_metrics(r["run_dir"])] for r in rows]
        assert [r["model.top_k"] for r in rows] == [1, 2]  # point order, not finish order
    assert runs[1] == runs[2] and len(runs[1][0]) > 1
    with pytest.raises(ConfigError, match="--jobs=0"):
        run_sweep(None, over, grid, 1, tmp_path / "bad", jobs=0, echo=lambda s: None)


# ---------------------------------------------------------------------------------------------
# Evaluation-time ablation of one trained checkpoint (moe/ablate/evaluate.py)


@pytest.mark.slow
def test_eval_sweep_of_a_trained_checkpoint(tmp_path):
    """No training: the run's checkpoint at each eval-time setting, on its own val windows.
    With the trained settings the val loss is the trainer's own; dropless drops nothing; a
    smaller capacity drops more; a training-time key is refused by name."""
    from moe.ablate.evaluate import eval_sweep
    from moe.cli.ablate import main
    from moe.train.loop import train

    run = tmp_path / "run"
    cfg = load_config(None, TINY + [f"--data.cache_dir={tmp_path / 'cache'}",
                                    f"--train.run_dir={run}", "--model.capacity_factor=1.0",
                                    "--model.eval_capacity_factor=null",
                                    "--model.capacity_group_seqs=8"])
    train(cfg)
    logged = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r][-1]
    grid = parse_grid(["model.eval_capacity_factor=0.5,1.0,null",
                       "model.drop_policy=choice_major,token_major"])
    rows = eval_sweep(run, grid, tmp_path / "eval", echo=lambda s: None)
    by = {(r["model.eval_capacity_factor"], r["model.drop_policy"]): r for r in rows}
    assert all(r["status"] == "ok" for r in rows) and len(rows) == 6
    assert abs(by[(None, "choice_major")]["val_loss"] - logged) < 1e-5  # the trainer's number
    assert by[(None, "choice_major")]["drop_frac"] == by[(None, "token_major")]["drop_frac"] == 0
    for policy in ("choice_major", "token_major"):
        assert by[(0.5, policy)]["drop_frac"] > by[(1.0, policy)]["drop_frac"] > 0
    assert by[(None, "choice_major")]["val_loss"] == by[(None, "token_major")]["val_loss"]
    summary = (tmp_path / "eval" / "summary.md").read_text()
    assert "| null | token_major |" in summary and "trained with eval_capacity_factor=null" \
        in summary
    assert (tmp_path / "eval" / "val_loss_vs_eval_capacity_factor.png").stat().st_size > 1000
    refused = eval_sweep(run, parse_grid(["model.top_k=2,9"]), tmp_path / "k",
                         echo=lambda s: None)
    assert [r["status"] for r in refused] == ["ok", "failed"] and "top_k" in refused[1]["error"]
    with pytest.raises(ConfigError, match="model.n_experts.*need training"):
        eval_sweep(run, parse_grid(["model.n_experts=2"]), tmp_path / "x")
    assert main(["--run", str(run), "--out", str(tmp_path / "cli"),
                 "--grid", "model.eval_capacity_factor=1.0"]) == 0
    assert main(["--run", str(run), "--out", str(tmp_path / "cli2"),
                 "--grid", "model.n_experts=2"]) == 2
