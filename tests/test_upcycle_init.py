"""``train.init_from: upcycle:SOURCE`` (moe/upcycle/cached.py): a dense run trained by our
trainer, upcycled into the new run's own MoE config (granularity 1, 2, 4) gives the dense
model's step-0 loss and validation loss, one process or a parallel layout; a config that
changes more than the MoE layer is refused by name."""

import pytest

from moe.config import ConfigError, load_config
from moe.train.init_from import resolve_init_from
from moe.train.loop import train
from moe.upcycle import upcycle
from tests.helpers import assert_same_rows, read_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The dense source: FFN of 40 hidden units (g = 1, 2, 4 slice it), moe_every > n_layers.
DENSE = ["--model.vocab_size=320", "--model.d_model=32", "--model.n_layers=2",
         "--model.n_heads=4", "--model.n_kv_heads=2", "--model.max_seq_len=16",
         "--model.moe_every=3", "--model.ffn_hidden=40", "--model.init_std=0.1",
         "--data.source=files", "--data.chunk_chars=300", "--data.seq_len=16",
         "--data.val_windows=4", "--train.batch_size=4", "--train.micro_batch_size=2",
         "--train.warmup_steps=0", "--train.eval_every=1", "--train.sample_tokens=0",
         "--log.progress=false", "--log.log_every=1"]
EXACT = ["--model.capacity_factor=null", "--model.eval_capacity_factor=null"]


def moe_overrides(g: int) -> list[str]:
    """Four copies of the FFN, each cut into g experts, two copies per token (renormalised
    weights: top_k >= 2); dropless."""
    return ["--model.moe_every=1", f"--model.n_experts={4 * g}", f"--model.top_k={2 * g}",
            f"--model.expert_hidden={40 // g}", *EXACT]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A dense run trained 2 steps on local text (its norms moved off one), and the loss and
    validation loss of its weights on the first batch of a new run from them."""
    root = tmp_path_factory.mktemp("upinit")
    text = "\n\n".join(f"def expert_{i}(x):\n    return x * {i % 5} + {i % 3}"
                       for i in range(300))
    (root / "train.txt").write_text(text)
    data = [f"--data.files={root / 'train.txt'}", f"--data.cache_dir={root / 'cache'}"]
    train(load_config(None, DENSE + data + ["--train.max_steps=2", "--train.lr=1e-2",
                                            f"--train.run_dir={root / 'dense'}"]))
    train(config(root, str(root / "dense"), "dense_again", []))
    return root, read_rows(root / "dense_again")


def config(root, init_from: str, name: str, model: list[str], *extra: str):
    """A run of the dense run's config.yaml (its data), ``model`` overrides, from
    ``init_from``, lr 0 for one step unless ``extra`` says otherwise."""
    return load_config(root / "dense" / "config.yaml",
                       [*model, f"--train.init_from={init_from}", f"--train.run_dir={root / name}",
                        "--train.max_steps=1", "--train.lr=0", *extra])


@pytest.mark.parametrize("g", [1, 2, 4])
def test_upcycled_run_starts_at_the_dense_models_loss(dense, g):
    root, want = dense
    train(config(root, f"upcycle:{root / 'dense'}", f"g{g}", moe_overrides(g)))
    got = read_rows(root / f"g{g}")
    assert want[0]["lm_loss"] > 1 and got[0]["layers"]  # a real loss, MoE layers routed
    assert_same_rows(want, got, ("lm_loss", "val_loss"), routing=False)
    made = [run / "config.yaml" for run in (root / "cache").glob("upcycle-*")]  # cached once
    assert sum(f"expert_hidden: {40 // g}\n" in c.read_text() for c in made) == 1


def test_what_upcycling_may_not_change_is_refused_by_name(dense):
    root, _ = dense
    with pytest.raises(ConfigError, match=r"^train\.init_from=upcycle:.*changes model\.d_model "
                                          r"\(32 -> 64\), model\.n_heads \(4 -> 8\) from the "
                                          r"upcycled") as e:
        resolve_init_from(config(root, f"upcycle:{root / 'dense'}", "x",
                                 moe_overrides(1) + ["--model.d_model=64", "--model.n_heads=8"]))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"model\.top_k=5 is not a multiple of the "
                                          r"granularity 2"):
        resolve_init_from(config(root, f"upcycle:{root / 'dense'}", "x",
                                 moe_overrides(2) + ["--model.top_k=5"]))
    with pytest.raises(ConfigError, match="data.chunk_chars"):  # the data are the source's
        resolve_init_from(config(root, f"upcycle:{root / 'dense'}", "x", moe_overrides(1),
                                 "--data.chunk_chars=200"))
    with pytest.raises(ConfigError, match="nope does not exist"):
        resolve_init_from(config(root, f"upcycle:{root / 'nope'}", "x", moe_overrides(1)))
    # An MoE source (the dense run's upcycle) has no single FFN to copy.
    upcycle(root / "dense", root / "moe", moe_overrides(1))
    with pytest.raises(ConfigError, match="has 4 experts: upcycle a dense model"):
        resolve_init_from(config(root, f"upcycle:{root / 'moe'}", "x", moe_overrides(1)))


def _train_rank(rank, world_size, config_path, overrides):
    train(load_config(config_path, overrides))


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--parallel.ep=2"], ["--parallel.tp=2"],
                                    ["--parallel.pp=2"]], ids=["ep2", "tp2", "pp2"])
def test_upcycled_run_on_a_layout_matches_one_process(dense, layout):
    """Granularity 2 on 2 gloo ranks: the dense model's loss at step 0, then training (lr > 0)
    the losses and gradient norms of one process."""
    from tests.dist_utils import run_ranks

    root, want = dense
    steps = ["--train.max_steps=2", "--train.lr=1e-2"]
    source = f"--train.init_from=upcycle:{root / 'dense'}"
    single = root / "layout_single"
    if not single.exists():
        train(config(root, source.split("=", 1)[1], single.name, moe_overrides(2), *steps))
    name = "layout_" + layout[0].split(".")[-1].replace("=", "")
    run_ranks(_train_rank, 2, str(root / "dense" / "config.yaml"),
              [*moe_overrides(2), source, f"--train.run_dir={root / name}",
               *steps, *layout], timeout_s=300)
    ref, got = read_rows(single), read_rows(root / name)
    assert got[0]["lm_loss"] == pytest.approx(want[0]["lm_loss"], rel=1e-5)
    losses = [r["loss"] for r in ref if "loss" in r]
    assert len(losses) == 2 and losses[1] != losses[0]  # it trained
    assert_same_rows(ref, got, ("loss", "lm_loss", "aux_loss", "grad_norm", "val_loss"))
