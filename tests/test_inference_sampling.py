"""Sampling filters on hand-made logits: exactly which tokens temperature, top-k and top-p keep
(moe/inference/sampling.py)."""

import math

import pytest
import torch

from moe.inference import SamplingParams, filter_logits, probs, sample

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
