"""Sampling filters on hand-made logits: exactly which tokens temperature, top-k and top-p keep
(moe/inference/sampling.py)."""

import math

import pytest
import torch

from moe.inference import SamplingParams, filter_logits, probs, sample, sample_from
from moe.inference.sampling import inverse_cdf
from tests.helpers import chi2_pvalue

# Probabilities 0.4, 0.3, 0.15, 0.1, 0.05 at ids 2, 0, 4, 1, 3.
P = torch.tensor([0.3, 0.1, 0.4, 0.05, 0.15])
LOGITS = P.log()


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).reshape(-1).tolist())


def test_top_k_keeps_exactly_the_k_largest():
    assert kept(filter_logits(LOGITS, top_k=1)) == {2}
    assert kept(filter_logits(LOGITS, top_k=3)) == {2, 0, 4}
    assert kept(filter_logits(LOGITS, top_k=0)) == set(range(5))
    assert kept(filter_logits(LOGITS, top_k=99)) == set(range(5))
    # A tie at the k-th value keeps every tied token (as Hugging Face's TopKLogitsWarper).
    assert kept(filter_logits(torch.tensor([1.0, 3.0, 2.0, 2.0]), top_k=2)) == {1, 2, 3}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # Sorted mass before each token: 0 (id 2), 0.4 (id 0), 0.7 (id 4), 0.85 (id 1), 0.95 (id 3).
    # (Thresholds stay off the exact sums, which float rounding may put either side.)
    assert kept(filter_logits(LOGITS, top_p=0.39)) == {2}
    assert kept(filter_logits(LOGITS, top_p=0.41)) == {2, 0}
    assert kept(filter_logits(LOGITS, top_p=0.69)) == {2, 0}
    assert kept(filter_logits(LOGITS, top_p=0.71)) == {2, 0, 4}
    assert kept(filter_logits(LOGITS, top_p=0.9)) == {2, 0, 4, 1}
    assert kept(filter_logits(LOGITS, top_p=1.0)) == set(range(5))
    assert kept(filter_logits(LOGITS, top_p=1e-9)) == {2}  # the top token always stays


def test_top_k_then_top_p_then_renormalised():
    # top-k 3 leaves 0.4, 0.3, 0.15 -> renormalised 0.47, 0.35, 0.18; top-p 0.8 keeps 2 of them.
    out = probs(LOGITS, SamplingParams(top_k=3, top_p=0.8))
    assert kept(out.log()) == {2, 0}
    torch.testing.assert_close(out[[2, 0]], torch.tensor([0.4, 0.3]) / 0.7)
    assert math.isclose(float(out.sum()), 1.0, rel_tol=1e-6)


def test_temperature_scales_and_zero_is_one_hot_greedy():
    torch.testing.assert_close(filter_logits(LOGITS, temperature=2.0), LOGITS / 2)
    greedy = probs(torch.tensor([[1.0, 5.0, 5.0, 0.0]]), SamplingParams(temperature=0))
    assert greedy.tolist() == [[0.0, 1.0, 0.0, 0.0]]  # a tie: the first index, as argmax
    # Temperature applies before top-p: a hot distribution needs more tokens for the same mass.
    assert kept(filter_logits(LOGITS, temperature=0.25, top_p=0.9)) == {2, 0}
    assert kept(filter_logits(LOGITS, temperature=4.0, top_p=0.9)) == {2, 0, 4, 1, 3}


def test_sample_draws_only_kept_tokens_with_their_probabilities():
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(top_k=2)
    draws = torch.stack([sample(LOGITS[None], params, g) for _ in range(4000)]).reshape(-1)
    assert set(draws.tolist()) == {0, 2}
    assert abs(float((draws == 2).float().mean()) - 0.4 / 0.7) < 0.03
    # Greedy consumes no random numbers.
    state = g.get_state()
    assert int(sample(LOGITS[None], SamplingParams(temperature=0), g)) == 2
    assert torch.equal(g.get_state(), state)
    # A batch: one draw per row, rows filtered independently.
    rows = torch.stack([LOGITS, LOGITS.flip(0)])
    assert sample(rows, SamplingParams(top_k=1), g).tolist() == [2, 2]


def test_inverse_cdf_on_hand_computed_boundaries():
    """Id i is drawn for u * total in [cdf(i - 1), cdf(i)); zero-probability ids never, even
    at their (empty) interval's edge; u * total reaching the total gives the last id with
    mass (not V, nor a zero-probability id after it)."""
    p = torch.tensor([[0.0, 0.25, 0.0, 0.5, 0.25, 0.0]])  # cdf 0, .25, .25, .75, 1, 1
    for u, want in ((0.0, 1), (0.2499, 1), (0.25, 3), (0.7499, 3), (0.75, 4), (0.9999, 4),
                    (1.0, 4)):
        assert int(inverse_cdf(p, torch.tensor([[u]]))) == want, u
    # Unnormalised rows, one u each.
    rows = torch.tensor([[2.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    assert inverse_cdf(rows, torch.tensor([[0.6], [0.0]])).tolist() == [[1], [2]]
    for bad in ([[0.5, float("nan")]], [[0.5, -0.1]], [[0.0, 0.0]], [[float("inf"), 1.0]]):
        with pytest.raises(ValueError, match="cannot sample"):
            sample_from(torch.tensor(bad))


def test_sample_from_matches_the_distribution():
    """20000 draws from a distribution with zeros, a tiny and a dominant mass, against the
    exact probabilities by chi-square; the test has the power to see a one-id shift."""
    p = torch.tensor([0.0, 0.05, 0.3, 0.0, 0.002, 0.448, 0.2, 0.0])
    g = torch.Generator().manual_seed(0)
    draws = sample_from(p.expand(20000, -1).contiguous(), g)
    counts = torch.bincount(draws, minlength=len(p))
    assert counts[p == 0].sum() == 0
    assert chi2_pvalue(counts, p) > 1e-3
    assert chi2_pvalue(counts, p.roll(1)) < 1e-6  # power: off by one id is rejected
    # One row at a time (as the engine draws) gives the same distribution.
    one = torch.tensor([int(sample_from(p[None], g)[0]) for _ in range(4000)])
    assert chi2_pvalue(torch.bincount(one, minlength=len(p)), p) > 1e-3


@pytest.mark.parametrize("kw, field", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(top_k=-2), "top_k"), (dict(top_k=1.5), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=2.0), "max_new_tokens"),
])
def test_bad_sampling_params_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)
    if field != "max_new_tokens":
        with pytest.raises(ValueError, match=field):
            filter_logits(LOGITS, **kw)
