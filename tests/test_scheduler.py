"""Continuous batching (moe/inference/scheduler.py): every request gets the tokens it gets alone.

More requests than slots, prompts and output lengths mixed, stop tokens and stop strings,
greedy and seeded sampling, a sequence sliding past the cache; a finished request frees its
slot for the next in the queue (first come, first served); aborts; the static-batching
baseline of the benchmark makes the same tokens.
"""

import pytest
import torch

from moe.inference import Engine, Request, SamplingParams, Scheduler, static_batches
from moe.model import build_model
from tests.helpers import tiny_model_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    """Dropless (batching cannot change routing); init_std 0.2 spreads the logits, so greedy
    comparisons are not decided by float noise between near-equal tokens."""
    cfg = tiny_model_config(capacity_factor=None, eval_capacity_factor=None, min_capacity=0,
                            max_seq_len=24, init_std=0.2)
    return build_model(cfg, seed=0).eval()


def alone(model, r: Request) -> list[int]:
    gen = None if r.seed is None else torch.Generator().manual_seed(r.seed)
    return Engine(model, 1).generate([r.prompt], r.params, gen)[0]


def workload(n: int, seed: int = 0) -> list[Request]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(0, 64, (int(torch.randint(1, 12, (1,), generator=g)),),
                               generator=g).tolist()
        sampled = i % 3 == 1
        params = SamplingParams(max_new_tokens=int(torch.randint(0, 16, (1,), generator=g)),
                                temperature=0.9 if sampled else 0.0, top_k=20 if sampled else 0,
                                top_p=0.9 if sampled else 1.0, stop_tokens=(3, 7)[: i % 3])
        out.append(Request(prompt, params, seed=100 + i if sampled else None, id=i))
    # One that runs past the cache (24 tokens): its window slides as the engine's does.
    out.append(Request(list(range(1, 15)), SamplingParams(max_new_tokens=20, temperature=0),
                       id=n))
    return out


def test_every_request_gets_the_tokens_it_gets_alone(model):
    reqs = workload(13)
    sched = Scheduler(Engine(model, n_slots=3))
    got = sched.run(reqs)
    assert not sched.has_work and sched.free == [0, 1, 2]
    for r, tokens in zip(reqs, got):
        assert tokens == alone(model, r), r.id
        p = r.params
        stopped = bool(tokens) and tokens[-1] in p.stop_tokens
        assert r.finish_reason == ("stop" if stopped else "length")
        assert len(tokens) == p.max_new_tokens or stopped
    assert any(r.finish_reason == "stop" for r in reqs)  # the stops were exercised
    assert len(got[-1]) == 20  # the sliding one ran its full length
    # The benchmark's baseline (static batches of 3) makes the same tokens.
    assert static_batches(Engine(model, 3), workload(13)) == got


def test_a_finished_request_frees_its_slot_for_the_queue(model):
    def req(i, n):
        return Request([1 + i, 2, 3], SamplingParams(max_new_tokens=n, temperature=0), id=i)

    a, b, c, d = req(0, 2), req(1, 5), req(2, 1), req(3, 3)
    sched = Scheduler(Engine(model, n_slots=2))
    for r in (a, b, c, d):
        sched.submit(r)
    assert sched.step() == [a, b] and (a.slot, b.slot) == (0, 1)  # prefill: first tokens
    assert list(sched.queue) == [c, d]
    assert sched.step() == [a, b] and a.finished and a.slot is None  # a's 2nd token: done
    assert sched.free == [0]
    changed = sched.step()  # c takes slot 0 (prefill) while b decodes
    assert set(changed) == {b, c} and c.finished and list(sched.queue) == [d]
    changed = sched.step()  # c took one token and left: d gets slot 0
    assert d in changed and d.slot == 0 and b.slot == 1
    while sched.has_work:
        sched.step()
    assert [r.id for r in sched.admitted] == [0, 1, 2, 3]  # first come, first served
    assert [len(r.tokens) for r in (a, b, c, d)] == [2, 5, 1, 3]


def test_stop_strings_end_the_request_and_are_cut_from_the_text(model):
    def detok(ids):  # one character per token: text positions are token positions
        return "".join(chr(ord("a") + t % 26) for t in ids)

    prompt = [5, 9, 2]
    free = Request(prompt, SamplingParams(max_new_tokens=12, temperature=0))
    full = alone(model, free)
    text = detok(full)
    stop = text[4:6]
    cut = text.find(stop)
    sched = Scheduler(Engine(model, n_slots=2), detokenize=detok)
    r = Request(prompt, SamplingParams(max_new_tokens=12, temperature=0), stop_strings=(stop,))
    other = Request([1, 2], SamplingParams(max_new_tokens=12, temperature=0))
    sched.run([r, other])
    assert r.finish_reason == "stop" and r.text == text[:cut]
    assert r.tokens == full[:cut + len(stop)]  # stopped on the token that completed it
    assert other.text == detok(other.tokens) and other.finish_reason == "length"


def test_abort_frees_the_slot_and_queue(model):
    sched = Scheduler(Engine(model, n_slots=1))
    a = sched.submit(Request([1, 2], SamplingParams(max_new_tokens=8, temperature=0)))
    b = sched.submit(Request([3], SamplingParams(max_new_tokens=8, temperature=0)))
    c = sched.submit(Request([4], SamplingParams(max_new_tokens=2, temperature=0)))
    sched.step()
    sched.abort(a)  # running: its slot is free again
    sched.abort(b)  # queued: it never runs
    assert sched.free == [0] and list(sched.queue) == [c]
    sched.run([])
    assert c.tokens == alone(model, c) and b.tokens == [] and not a.finished


def test_submit_refuses_what_cannot_run(model):
    sched = Scheduler(Engine(model, n_slots=1))
    with pytest.raises(ValueError, match="longer than the context"):
        sched.submit(Request(list(range(30))))
    with pytest.raises(ValueError, match="detokenize"):
        sched.submit(Request([1], stop_strings=("x",)))
    assert not sched.has_work


def test_the_benchmark_section_compares_the_same_tokens(model):
    from moe.bench.decode import batching_throughput

    r = batching_throughput(model, n_slots=3, n_requests=7, prompt_len=6, new_tokens=16,
                            repeats=1, seed=0)
    assert r["continuous_over_static"] > 0 and r["continuous_over_static_padded"] > 0
    b = r["batching"]
    assert b["same_tokens"] and b["generated_tokens"] > 0
    assert b["steps_continuous"] <= b["steps_static"]  # never more token steps than static
