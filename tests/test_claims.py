"""The claims checker (moe/ablate/claims.py): verdicts on hand-made intervals and rows, the
loss-spike metric on a hand-written run, and --quick runs of two claims end to end (report.md
and claims.json in the shape the docs promise)."""

import json
import math

import pytest

from moe.ablate.claims import (
    CLAIMS,
    Check,
    check_verdict,
    claim_verdict,
    evaluate_check,
    loss_spike,
    report_markdown,
)
from moe.ablate.stats import Interval


def iv(low, high, n=3):
    return Interval((low + high) / 2, low, high, n, 0.1)


def test_check_verdicts_by_hand():
    lower = Check("final_val_loss", 1, 4, "lower")
    assert check_verdict(iv(-0.05, -0.01), lower) == "agrees"
    assert check_verdict(iv(0.01, 0.05), lower) == "disagrees"
    assert check_verdict(iv(-0.05, 0.01), lower) == "inconclusive"
    assert check_verdict(iv(-0.05, -0.01, n=1), lower) == "inconclusive"  # no interval
    higher = Check("final_val_loss", "a", "b", "higher")
    assert check_verdict(iv(0.01, 0.05), higher) == "agrees"
    assert check_verdict(iv(-0.05, -0.01), higher) == "disagrees"
    no_worse = Check("final_val_loss", 0, 1, "no_worse", margin=0.01)
    assert check_verdict(iv(-0.02, 0.009), no_worse) == "agrees"  # below the margin
    assert check_verdict(iv(-0.02, 0.02), no_worse) == "inconclusive"
    assert check_verdict(iv(0.001, 0.02), no_worse) == "disagrees"  # worse for sure
    no_better = Check("final_val_loss", 0, 1, "no_better", margin=0.005)
    assert check_verdict(iv(-0.004, 0.03), no_better) == "agrees"
    assert check_verdict(iv(-0.03, -0.001), no_better) == "disagrees"
    assert check_verdict(iv(-0.03, 0.01), no_better) == "inconclusive"
    with pytest.raises(ValueError, match="expect"):
        check_verdict(iv(0, 1), Check("x", 0, 1, "sideways"))
    assert claim_verdict(["agrees", "agrees"]) == "agrees"
    assert claim_verdict(["agrees", "inconclusive"]) == "inconclusive"
    assert claim_verdict(["agrees", "disagrees", "inconclusive"]) == "disagrees"
    assert claim_verdict([]) == "inconclusive"


def test_evaluate_check_pairs_by_seed_and_handles_divergence(tmp_path):
    rows = [{"n": n, "seed_index": s, "status": "ok", "final_val_loss": v}
            for (n, s), v in {(1, 0): 3.50, (1, 1): 3.60, (1, 2): 3.40, (4, 0): 3.45,
                              (4, 1): 3.56, (4, 2): 3.34, (4, 3): 1.0}.items()]
    c = evaluate_check(rows, "n", Check("final_val_loss", 1, 4, "lower"))
    # seed 3 has no base: left out. d = [-0.05, -0.04, -0.06], sd 0.01, t(2) = 4.3027
    assert c["seeds"] == 3 and abs(c["estimate"] + 0.05) < 1e-9
    assert abs(c["ci_high"] - (-0.05 + 4.3027 * 0.01 / 3 ** 0.5)) < 1e-9
    assert c["verdict"] == "agrees" and abs(c["base_mean"] - 3.5) < 1e-9
    # A metric that went infinite in every base run: the arm is lower, whatever the noise.
    spiky = [{"z": z, "seed_index": s, "status": "ok", "spike": math.inf if z == 0 else 0.1}
             for z in (0, 1) for s in (0, 1)]
    c = evaluate_check(spiky, "z", Check("spike", 0, 1, "lower"))
    assert c["verdict"] == "agrees" and c["estimate"] != c["estimate"]  # nan: no interval
    assert evaluate_check(spiky, "z", Check("spike", 0, 1, "higher"))["verdict"] == "disagrees"


def test_zero_check_reads_the_arm_alone_and_one_seed_refutes_it():
    zero = Check("kl", None, None, "zero", margin=1e-9)

    def rows(values):
        return [{"cf": cf, "seed_index": s, "status": "ok", "kl": v}
                for s, v in enumerate(values) for cf in (None, 1.25)]

    c = evaluate_check(rows([0.0, 1e-12, 0.0]), "cf", zero)
    assert c["verdict"] == "agrees" and c["seeds"] == 3
    assert c["ci_low"] == 0.0 and c["ci_high"] == 1e-12  # the range of the values
    assert evaluate_check(rows([0.0, 2e-3, 0.0]), "cf", zero)["verdict"] == "disagrees"
    assert evaluate_check([], "cf", zero)["verdict"] == "inconclusive"
    higher = Check("kl", None, 1.25, "higher")
    r = [{"cf": cf, "seed_index": s, "status": "ok", "kl": v}
         for (cf, s), v in {(None, 0): 0.0, (None, 1): 0.0, (None, 2): 0.0, (1.25, 0): 0.020,
                            (1.25, 1): 0.025, (1.25, 2): 0.022}.items()]
    assert evaluate_check(r, "cf", higher)["verdict"] == "agrees"
    claim = next(c for c in CLAIMS if c.name == "capacity_batch_dependence")
    assert [(ch.metric, ch.expect) for ch in claim.checks] == [("batch_kl_log10", "higher"),
                                                               ("batch_kl", "zero")]


def test_loss_spike_is_the_largest_rise_above_the_running_minimum(tmp_path):
    rows = [{"step": 1, "lm_loss": 5.0}, {"step": 2, "lm_loss": 4.0}, {"step": 2, "val_loss": 9},
            {"step": 3, "lm_loss": 4.5}, {"step": 4, "lm_loss": 3.0}, {"step": 5, "lm_loss": 3.2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert loss_spike(tmp_path) == 0.5
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 6, "lm_loss": float("nan")}) + "\n")
    assert loss_spike(tmp_path) == math.inf


def test_report_lists_every_claim_with_its_checks():
    result = {"name": "x", "source": "S", "statement": "T", "setting": "U", "seeds": 3,
              "verdict": "agrees", "estimate": -0.05, "ci_low": -0.07, "ci_high": -0.03,
              "wall_s": 120, "budget_min": 5, "plot": "x/paired_deltas.png",
              "failed": ["n=4__seed=2: boom"],
              "checks": [{"metric": "final_val_loss", "base": 1, "arm": 4, "expect": "lower",
                          "margin": 0.0, "base_mean": 3.5, "arm_mean": 3.45,
                          "estimate": -0.05, "ci_low": -0.07, "ci_high": -0.03,
                          "verdict": "agrees"}]}
    md = report_markdown([result])
    assert "| x | **agrees** | -0.0500 [-0.0700, -0.0300] | 3 | 2.0 min |" in md
    assert "| final_val_loss | 1 → 4 | 3.5000 | 3.4500 | -0.0500 [-0.0700, -0.0300] | lower " \
           "| agrees |" in md
    assert "boom" in md and "![x](x/paired_deltas.png)" in md


def test_the_shipped_claims_are_well_formed():
    names = [c.name for c in CLAIMS]
    assert len(names) == len(set(names)) >= 6
    for c in CLAIMS:
        assert c.checks and all({ch.base, ch.arm} <= set(c.values) for ch in c.checks), c.name
        assert all(v in c.values for v, _ in c.arm_overrides), c.name
    assert sum(c.budget_min for c in CLAIMS) <= 120  # the whole set in 2 hours


@pytest.mark.slow
def test_quick_claims_write_report_and_json(tmp_path):
    from moe.cli.claims import main

    out = tmp_path / "claims"
    assert main(["switch_more_experts", "olmoe_token_choice", "--quick", "--out", str(out),
                 "--jobs", "2", "--threads-per-job", "1"]) == 0
    data = json.loads((out / "claims.json").read_text())
    assert [d["name"] for d in data] == ["switch_more_experts", "olmoe_token_choice"]
    for d in data:
        assert d["verdict"] in ("agrees", "inconclusive", "disagrees")
        assert {"estimate", "ci_low", "ci_high", "wall_s", "checks"} <= set(d)
        assert d["ci_low"] <= d["estimate"] <= d["ci_high"] and d["wall_s"] > 0
        assert not d["failed"], d["failed"]  # expert choice's own overrides applied
    assert len(data[0]["checks"]) == 2 and data[0]["checks"][1]["base"] == 4
    report = (out / "report.md").read_text()
    assert report.count("## ") == 2 and "switch_more_experts" in report
    assert (out / "switch_more_experts" / "paired_deltas.png").stat().st_size > 1000
    assert main(["no_such_claim", "--out", str(out)]) == 2


@pytest.mark.slow
def test_quick_batch_dependence_claim_on_real_runs(tmp_path):
    # The batch_kl metric on the runs the claim trains: dropless is float noise (the zero check
    # agrees even at 24 steps), capacity 1.25 is not.
    from moe.cli.claims import main

    out = tmp_path / "claims"
    assert main(["capacity_batch_dependence", "--quick", "--out", str(out), "--jobs", "2",
                 "--threads-per-job", "1"]) == 0
    (data,) = json.loads((out / "claims.json").read_text())
    assert not data["failed"], data["failed"]
    higher, zero = data["checks"]
    assert zero["verdict"] == "agrees" and zero["ci_high"] <= 1e-9
    # log10(KL + 1e-12): the float-noise floor dropless, orders of magnitude above it with drops
    assert abs(higher["base_mean"] + 12) < 1e-3 and higher["arm_mean"] > -8
