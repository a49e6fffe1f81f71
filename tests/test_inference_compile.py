"""Compiled decode (moe/inference/compiled.py): one graph, no breaks, the eager engine's
tokens and logits (to 1e-5).

The fast tests trace with the ``aot_eager`` backend (the graph torch.compile captures, run
without generating code: seconds); the slow one compiles with inductor, as the engine does.
The gathered few-token MoE path it traces is checked against the eager decode path it
replaces.
"""

import pytest
import torch

from moe.inference import Engine, SamplingParams
from moe.inference.compiled import CompiledDecode
from moe.inference.weights import cast_for_serving
from moe.model.moe import MoE
from tests.helpers import dropless_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


def assert_same_decode(model, compiled: Engine, prompts: list[list[int]], steps: int = 6):
    """Greedy tokens of each prompt alone, and the logits of a ragged batch's decode steps
    (rows at different positions), equal to the eager engine's (logits to 1e-5)."""
    eager = Engine(model, len(prompts))
    for p in prompts:
        assert compiled.generate([p], GREEDY) == eager.generate([p], GREEDY)
    slots = list(range(len(prompts)))
    want, got = eager.prefill(slots, prompts), compiled.prefill(slots, prompts)
    for _ in range(steps):
        nxt = want.argmax(-1).tolist()
        want, got = eager.decode(slots, nxt), compiled.decode(slots, nxt)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert compiled.cache.lengths == eager.cache.lengths


def test_traced_decode_equals_eager():
    """Traced with fullgraph=True, which raises at any graph break: the step is one graph
    (the eager few-token path's expert ids read to the host would break it once per MoE
    layer)."""
    model = dropless_model()
    assert_same_decode(model, Engine(model, 2, compile="aot_eager"),
                       [[1, 2, 3, 4, 5], [7, 8]])


def test_gathered_few_token_path_equals_decode_path():
    """``MoE._forward_few_gathered`` (what compile traces) against ``_forward_few`` (the
    eager decode path, itself tested against the sorted path in tests/test_inference.py),
    for 1 to n_experts / top_k tokens, with the same experts chosen."""
    model = dropless_model()
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    g = torch.Generator().manual_seed(0)
    for t in (1, 2):
        x = torch.randn(t, model.cfg.d_model, generator=g)
        with torch.no_grad():
            want = moe._forward_few(x)
            chosen = moe.last_experts
            got = moe._forward_few_gathered(x)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        assert torch.equal(moe.last_experts, chosen)


def test_bad_input():
    model = dropless_model()
    with pytest.raises(ValueError, match="compile=True"):
        Engine(model, 1, capacity_factor=1.0, compile=True)
    with pytest.raises(ValueError, match="compile=True"):
        Engine(model, 1, decode_path=False, compile=True)
    int8 = cast_for_serving(dropless_model(), "int8")
    with pytest.raises(ValueError, match="Int8Experts"):
        Engine(int8, 1, compile="aot_eager")
    eng = Engine(model, 2, compile="aot_eager")
    eng.prefill([0], [list(range(1, 25))])  # slot 0 full (max_seq_len 24)
    with pytest.raises(ValueError, match="exceed the cache's max_len"):
        eng.decode([0], [1])
    with pytest.raises(ValueError, match="repeat a slot"):
        eng.decode([1, 1], [1, 2])
    assert eng.cache.lengths == [24, 0]  # nothing written, nothing advanced


@pytest.mark.slow
def test_inductor_decode_equals_eager():
    """What ``Engine(compile=True)`` runs: inductor's generated code (tens of seconds to
    compile on a CPU)."""
    model = dropless_model(n_layers=1)
    assert_same_decode(model, Engine(model, 1, compile=True), [[1, 2, 3, 4, 5]])
    assert isinstance(Engine(model, 1, compile=True).compiled, CompiledDecode)
