"""The Flamingo-style vision model: exact identity at initialisation, who attends to which
image, the gates' gradients, and the trainer's vision runs (data parallel = one process,
exact resume, frozen text, init_from a text run, refused layouts, metrics)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dist_utils import run_ranks
from helpers import assert_same_rows, read_rows, tiny_model_config

from moe.config import ConfigError, VisionConfig, load_config
from moe.device import autocast_context
from moe.model import build_model
from moe.train.loop import train
from moe.vision.attention import GatedCrossAttentionBlock, media_mask
from moe.vision.model import build_vision_model, is_vision_param
from moe.vision.probe import encoder_features

VC = VisionConfig(enabled=True, image_size=16, patch_size=4, d_vision=32, encoder_layers=1,
                  encoder_heads=2, n_latents=4, resampler_layers=1, cross_attn_every=1)


def _inputs(b=2, s=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (b, s), generator=g)
    images = torch.rand(b, 2, 3, 16, 16, generator=g)
    media_pos = torch.tensor([[0, 5], [3, -1]])[:b]  # row 1: tokens 0-2 see no image
    return tokens, images, media_pos


def _open_gates(model, attn=1.0, ffn=1.0):
    with torch.no_grad():
        for block in model.cross_attn.values():
            block.attn_gate.fill_(attn)
            block.ffn_gate.fill_(ffn)


@pytest.mark.parametrize("bf16", [False, True])
def test_logits_equal_the_text_model_at_init(bf16):
    """tanh(0) = 0 gates: the vision model's logits ARE the text-only model's (same seed, so
    the same text weights), with images given, fp32 and under CPU bf16 autocast."""
    cfg = tiny_model_config()
    text, vision = build_model(cfg, seed=3), build_vision_model(cfg, VC, seed=3)
    tokens, images, media_pos = _inputs()
    with autocast_context(torch.device("cpu"), "bf16" if bf16 else "fp32"):
        want = text(tokens)
        got = vision(tokens, images=images, media_pos=media_pos)
        assert torch.equal(got, want)
        assert torch.equal(vision(tokens), want)  # no images: the text forward itself
    _open_gates(vision)
    assert not torch.allclose(vision(tokens, images=images, media_pos=media_pos),
                              text(tokens))


def test_media_mask_hand_computed():
    media_pos = torch.tensor([[0, 3], [2, -1]])
    mask, seen = media_mask(media_pos, torch.arange(5), n_latents=2, attend="last")
    assert mask.shape == (2, 1, 5, 4)
    # Row 0: tokens 0-2 see image 0 only, tokens 3-4 image 1 only (the latest).
    per_image = mask[0, 0, :, ::2]
    assert per_image.tolist() == [[True, False]] * 3 + [[False, True]] * 2
    assert torch.equal(mask[0, 0, :, 0], mask[0, 0, :, 1])  # both latents of an image
    # Row 1: tokens 0-1 see nothing (all True in the mask, zeroed by `seen`); -1 is no image.
    assert seen[1, :, 0].tolist() == [False, False, True, True, True]
    assert mask[1, 0, 2:, ::2].tolist() == [[True, False]] * 3
    mask_all, _ = media_mask(media_pos, torch.arange(5), n_latents=2, attend="all")
    assert mask_all[0, 0, :, ::2].tolist() == [[True, False]] * 3 + [[True, True]] * 2


def test_cross_attention_block_sees_only_its_images():
    """A token's output changes with the image it may see and no other: text before any
    image gets exactly x (+ the feed-forward, gated off here)."""
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(32, 16, 4, 1, 8, 64, "swiglu")
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():
        block.attn_gate.fill_(1.0)
        block.ffn_gate.fill_(0.0)
    x = torch.randn(1, 6, 32)
    media = torch.randn(1, 2 * 3, 16)  # two images of 3 latents
    mask, seen = media_mask(torch.tensor([[2, 4]]), torch.arange(6), 3, "last")
    out = block(x, media, mask, seen)
    assert torch.equal(out[0, :2], x[0, :2])  # no image before them: attends to nothing
    other = media.clone()
    other[:, :3] += 1.0  # change image 0
    out2 = block(x, other, mask, seen)
    assert torch.equal(out2[0, 4:], out[0, 4:])  # tokens 4-5 see only image 1
    assert not torch.allclose(out2[0, 2:4], out[0, 2:4])


def test_at_init_only_the_gates_and_the_text_model_get_gradients():
    """Flamingo's init: d/d(alpha) tanh(alpha) * y = y, so the gates learn first; the
    blocks' own weights get zero gradient until a gate opens."""
    cfg = tiny_model_config()
    model = build_vision_model(cfg, VC, seed=0)
    tokens, images, media_pos = _inputs()
    model(tokens, images=images, media_pos=media_pos).float().pow(2).mean().backward()
    block = model.cross_attn["0"]
    assert block.attn_gate.grad.abs().item() > 0 and block.ffn_gate.grad.abs().item() > 0
    assert block.attn.wq.weight.grad.abs().max().item() == 0
    assert model.perceiver.latents.grad.abs().max().item() == 0
    assert model.layers["0"].attention.wq.weight.grad.abs().max().item() > 0


def test_vision_parameter_names_are_stable():
    names = [n for n, _ in build_vision_model(tiny_model_config(), VC, "meta").named_parameters()]
    vision = [n for n in names if is_vision_param(n)]
    assert "vision_encoder.patch_embed.weight" in vision
    assert "perceiver.latents" in vision and "cross_attn.1.attn_gate" in vision
    text = [n for n in names if not is_vision_param(n)]
    assert text == [n for n, _ in build_model(tiny_model_config(), "meta").named_parameters()]


# -- the trainer ---------------------------------------------------------------------------

TEXT = ["--model.vocab_size=512", "--model.d_model=64", "--model.n_layers=2",
        "--model.n_heads=4", "--model.n_kv_heads=1", "--model.n_experts=4", "--model.top_k=2",
        "--model.expert_hidden=64", "--model.max_seq_len=128", "--model.capacity_factor=1.0",
        "--data.code_max_mb=0.3", "--train.warmup_steps=2", "--train.lr=3e-3",
        "--train.sample_tokens=0", "--log.progress=false", "--log.log_every=1"]
VISION = ["--vision.enabled=true", "--vision.image_size=16", "--vision.d_vision=32",
          "--vision.encoder_layers=1", "--vision.encoder_heads=2", "--vision.n_latents=4",
          "--vision.cross_attn_every=1", "--vision.n_train=48", "--vision.n_val=8",
          "--vision.n_heldout=4", "--vision.pretrain_steps=3", "--data.seq_len=112",
          "--train.batch_size=8",
          "--train.micro_batch_size=4", "--train.max_steps=3", "--train.eval_every=3",
          "--train.decay_steps=4"]
KEYS = ("vision_pretrain_loss", "text_pretrain_loss", "loss", "lm_loss", "aux_loss", "z_loss",
        "drop_frac", "grad_norm", "val_loss",
        "val_loss_shuffled_images", "val_loss_no_images", "heldout_accuracy", "val_accuracy",
        "heldout_accuracy_calibrated", "val_exists_accuracy", "heldout_exists_accuracy",
        "heldout_exists_accuracy_calibrated",
        "gate_attn_0", "gate_ffn_1")


def _vision_args(tmp, name, *extra):
    return TEXT + VISION + [f"--data.cache_dir={tmp / 'cache'}",
                            f"--train.run_dir={tmp / name}", *extra]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("vision")


@pytest.fixture(scope="module")
def single(workdir):
    """One process, three steps: the reference rows."""
    train(load_config(None, _vision_args(workdir, "single")))
    return read_rows(workdir / "single")


def test_vision_run_logs_what_the_issue_asks(single):
    evals = [r for r in single if "val_loss" in r]
    assert [r["step"] for r in evals] == [3]
    row = evals[0]
    for key in ("val_loss_shuffled_images", "val_loss_no_images", "heldout_accuracy",
                "heldout_colour_accuracy", "heldout_shape_accuracy", "val_accuracy",
                "heldout_accuracy_calibrated", "val_shape_accuracy_calibrated",
                "val_exists_accuracy", "val_exists_accuracy_calibrated",
                "heldout_exists_accuracy", "heldout_exists_accuracy_calibrated",
                "gate_attn_0", "gate_ffn_0", "gate_attn_1"):
        assert key in row, key
    assert 0 <= row["heldout_accuracy"] <= 1
    # The exists (binding) queries have their own keys: the colour / shape aggregates keep
    # their meaning (val_accuracy is the mean of its colour and shape parts: as many of each).
    assert not any(k.startswith(("val_exists_exists", "heldout_exists_exists")) for k in row)
    assert row["val_accuracy"] == pytest.approx(
        (row["val_colour_accuracy"] + row["val_shape_accuracy"]) / 2)
    assert row["heldout_accuracy"] == pytest.approx(
        (row["heldout_colour_accuracy"] + row["heldout_shape_accuracy"]) / 2)
    # Yes / no queries: 8 val images (those with a distractor), 4 heldout and their negatives.
    for key in ("val_exists_accuracy", "heldout_exists_accuracy"):
        assert 0 <= row[key] <= 1
    assert 0 < row["gate_attn_0"] < 0.1  # three steps: gates left 0, barely
    assert single[0]["step"] == 0 and single[0]["vision_pretrain_loss"] > 0
    steps = [r for r in single if "lm_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and steps[-1]["lm_loss"] < steps[0]["lm_loss"]


def _train_rank(rank, world, overrides):
    train(load_config(None, overrides))


@pytest.mark.slow
@pytest.mark.parametrize("name,world,extra", [("dp2", 2, ["--parallel.dp=2"]),
                                              ("ep2", 2, ["--parallel.ep=2"])])
def test_data_and_expert_parallel_match_one_process(workdir, single, name, world, extra):
    """Same global batch, split over ranks (micro-batches of 4 on each): every logged number,
    the vision metrics included, is the single process's."""
    run_ranks(_train_rank, world, _vision_args(workdir, name, *extra), timeout_s=300)
    assert_same_rows(single, read_rows(workdir / name), KEYS, tag=name)


def test_resume_continues_exactly(workdir, single):
    args = _vision_args(workdir, "resumed", "--train.ckpt_every=1")
    train(load_config(None, args + ["--train.max_steps=2"]))
    train(load_config(None, args))
    rows = read_rows(workdir / "resumed")
    # The first run also evaluated where it stopped (step 2): not in the reference.
    rows = [r for r in rows if not ("val_loss" in r and r["step"] == 2)]
    assert_same_rows(single, rows, KEYS, tag="resume")


def test_freeze_text_and_init_from_a_text_run(workdir):
    """A text run, then a vision run from its weights with the text model frozen: after
    training, every text weight is still the text run's and the vision parts moved."""
    from moe.checkpoint import load_model

    text_args = TEXT + [f"--data.cache_dir={workdir / 'cache'}", "--data.seq_len=32",
                        "--train.batch_size=4", "--train.micro_batch_size=4",
                        "--train.max_steps=2", "--train.eval_every=2", "--data.val_windows=4",
                        f"--train.run_dir={workdir / 'text'}"]
    train(load_config(None, text_args))
    train(load_config(None, _vision_args(workdir, "frozen", "--vision.freeze_text=true",
                                         f"--train.init_from={workdir / 'text'}")))
    text = load_model(workdir / "text").model.state_dict()
    loaded = load_model(workdir / "frozen")
    assert loaded.cfg.vision.enabled
    vision = loaded.model.state_dict()
    for name, value in text.items():
        assert torch.equal(vision[name], value), name
    fresh = build_vision_model(loaded.cfg.model, loaded.cfg.vision, seed=loaded.cfg.train.seed)
    moved = [n for n, p in fresh.state_dict().items()
             if is_vision_param(n) and not torch.equal(p, vision[n])]
    assert "cross_attn.0.attn_gate" in moved and "perceiver.latents" in moved


@pytest.mark.parametrize("bad,message", [
    ("--parallel.tp=2", "vision.enabled runs support parallel.dp and parallel.ep"),
    ("--parallel.pp=2", "vision.enabled runs support parallel.dp and parallel.ep"),
    ("--vision.image_size=30", "vision.image_size=30 is not a multiple"),
    ("--vision.attend=first", "vision.attend='first' must be one of last, all"),
    ("--vision.max_objects=4", "vision.max_objects=4 must be 1, 2 or 3"),
    ("--vision.pretrain_head=mlp",
     "vision.pretrain_head=.mlp. must be one of linear, attention, both"),
    ("--vision.answer_loss_weight=0", "vision.answer_loss_weight"),
])
def test_bad_vision_settings_are_one_line(tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, _vision_args(tmp_path, "bad", bad))
    assert "\n" not in str(err.value)


def test_text_longer_than_seq_len_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="raise data.seq_len"):
        train(load_config(None, _vision_args(tmp_path, "short", "--data.seq_len=16")))
    assert not (tmp_path / "short").exists()  # refused before anything is written


@pytest.mark.slow
def test_generate_captions_an_image_file_and_counts_vision_params(workdir, single, tmp_path):
    """scripts/generate.py --image PATH on a PNG; a file that is not an image and a text run
    are one-line errors. count_params lists the vision parameters apart."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from moe.vision import data as vd

    root = Path(__file__).resolve().parents[1]
    image = tmp_path / "shapes.png"
    vd.save_image(image, vd.render(vd.Scene((vd.Shape("red", "square", 4),)), 16))
    run = [sys.executable, "scripts/generate.py", "--run", str(workdir / "single"),
           "--temperature", "0", "--max-new-tokens", "5"]
    out = subprocess.run(run + ["--image", str(image)], cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("a") and len(out.stdout.strip()) > 1
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    out = subprocess.run(run + ["--image", str(bad)], cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and "not_an_image.png" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = subprocess.run([sys.executable, "scripts/count_params.py", "--json",
                          "--config", "configs/vision_tiny.yaml"], cwd=root,
                         capture_output=True, text=True, timeout=300)
    counts = json.loads(out.stdout)["vision"]
    assert counts["vision_total"] == (counts["vision_encoder"] + counts["perceiver"]
                                      + counts["cross_attn"]) > 0
    assert counts["text_total"] == json.loads(out.stdout)["total_params"]


def test_answer_logprobs_hand_computed():
    """Summed log-probabilities of the counted targets only (the answer, not the prompt)."""
    from moe.vision.caption import answer_logprobs

    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))
    targets = torch.tensor([[-100, 1, 2]])
    want = torch.log(torch.tensor(0.8)) + torch.log(torch.tensor(0.6))
    assert torch.allclose(answer_logprobs(logits, targets), want[None])


@pytest.mark.parametrize("bf16", [False, True])
def test_cached_caption_equals_the_full_forward(bf16):
    """caption_image's KV-cached decode (image encoded once, the prompt prefilled, then one
    token a forward) gives the full forward's logits at every step and the same tokens, with
    the gates open, in fp32 and under CPU bf16 autocast; it stops at max_seq_len."""
    from moe.vision.caption import caption_image

    cfg = tiny_model_config()
    model = build_vision_model(cfg, VC, seed=5).eval()
    _open_gates(model, attn=0.8, ffn=0.5)
    image = (torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(1)) * 255).to(
        torch.uint8).numpy()
    runs = {}
    with autocast_context(torch.device("cpu"), "bf16" if bf16 else "fp32"):
        for cached in (True, False):
            logits: list[torch.Tensor] = []
            new = caption_image(model, image, [0, 7, 9], max_new_tokens=12, use_cache=cached,
                                step_logits=logits)
            runs[cached] = (new, torch.stack(logits))
    assert runs[True][0] == runs[False][0] and len(runs[True][0]) == 12
    tol = 5e-2 if bf16 else 1e-5
    torch.testing.assert_close(runs[True][1], runs[False][1], atol=tol, rtol=tol)
    full = caption_image(model, image, [0] * (cfg.max_seq_len - 2), max_new_tokens=9)
    assert len(full) == 2  # the sequence reaches max_seq_len
    with pytest.raises(ValueError, match="image marker"):
        caption_image(model, image, [], max_new_tokens=3)


def test_cached_forward_with_media_equals_the_full_forward():
    """The model's cached path with precomputed latents (``media=``): a prefix, then the rest
    token by token, equals one full forward, for rows whose second image comes mid-sequence
    and a row that sees no image for its first tokens."""
    from moe.inference.cache import KVCache

    cfg = tiny_model_config()
    model = build_vision_model(cfg, VC, seed=6).eval()
    _open_gates(model)
    tokens, images, media_pos = _inputs()
    with torch.no_grad():
        want = model(tokens, images=images, media_pos=media_pos, capacity_factor=None)
        media = model.encode_images(images)
        cache = KVCache(model, 2)
        got = [model(tokens[:, :4], cache.view([0, 1], 4), media=media, media_pos=media_pos,
                     capacity_factor=None)]
        cache.advance([0, 1], [4, 4])
        for t in range(4, tokens.shape[1]):
            got.append(model(tokens[:, t:t + 1], cache.view([0, 1], 1), media=media,
                             media_pos=media_pos, capacity_factor=None))
            cache.advance([0, 1], [1, 1])
    torch.testing.assert_close(torch.cat(got, 1), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        model(tokens, images=images, media=media, media_pos=media_pos)
    with pytest.raises(ValueError, match=r"need media_pos of shape \(2, 2\)"):
        model(tokens, media=media, media_pos=media_pos[:, :1])


def test_probe_reads_a_trained_runs_encoder(workdir, single, capsys):
    """scripts/vision_probe.py --run: the readout probe on a trained vision run's encoder
    (the run's own config and data); --encoder-pairs is refused with --run."""
    import json

    from moe.cli import vision_probe

    run = str(workdir / "single")
    assert vision_probe.main(["--run", run, "--features=latents,oracle", "--steps=3",
                              "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["encoder"]["run"].startswith(run) and out["encoder"]["step"] > 0
    assert [r["features"] for r in out["rows"]] == ["latents", "oracle"]
    assert vision_probe.main(["--run", run, "--encoder-pairs=all"]) == 2
    assert "drop it with --run" in capsys.readouterr().err
    assert vision_probe.main(["--run", run, "--vision.n_val=8"]) == 2
    assert "its own config" in capsys.readouterr().err


@pytest.mark.parametrize("head", ["linear", "attention", "both"])
def test_encoder_pretraining_learns_with_either_head(head):
    """Both pre-training heads bring the what-is-where loss down from its start, and train
    only the encoder and the resampler (the text model and the gates are untouched)."""
    from moe.vision import data as vd
    from moe.vision.pretrain import pretrain_encoder

    model = build_vision_model(tiny_model_config(), VC, seed=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    split = vd.make_split("train", 256, seed=1, size=16)
    first = pretrain_encoder(model, split, 1, 32, 3e-3, seed=0, head_kind=head)
    last = pretrain_encoder(model, split, 150, 32, 3e-3, seed=0, head_kind=head)
    assert last < 0.6 * first
    moved = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"vision_encoder", "perceiver"}
    with pytest.raises(ValueError, match="unknown pre-training head 'mlp'"):
        pretrain_encoder(model, split, 1, 32, 3e-3, seed=0, head_kind="mlp")


def test_freeze_encoder_trains_it_in_pretraining_only(workdir):
    """vision.freeze_encoder: the run's encoder and resampler are exactly what their own
    pre-training made (redone here from the same seed), while the cross-attention and the
    text model train on."""
    from moe.checkpoint import load_model
    from moe.vision import data as vd
    from moe.vision.pretrain import pretrain_encoder

    cfg = load_config(None, _vision_args(workdir, "frozen_enc", "--vision.freeze_encoder=true",
                                         "--vision.pretrain_head=both"))
    train(cfg)
    trained = load_model(workdir / "frozen_enc").model.state_dict()
    vc, tc = cfg.vision, cfg.train
    fresh = build_vision_model(cfg.model, vc, seed=tc.seed)
    start = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    split = vd.load_or_build(cfg.data.cache_dir, vc.n_train, vc.n_val, vc.n_heldout,
                             vc.data_seed, vc.image_size, vc.max_objects).train
    pretrain_encoder(fresh, split, vc.pretrain_steps, tc.batch_size, vc.pretrain_lr, tc.seed,
                     vc.pretrain_head)
    for name, p in fresh.named_parameters():
        if name.startswith(("vision_encoder.", "perceiver.")):
            assert torch.equal(trained[name], p), name
    assert not torch.equal(start["perceiver.latents"], trained["perceiver.latents"])
    for name in ("cross_attn.0.attn_gate", "layers.0.attention.wq.weight"):
        assert not torch.equal(start[name], trained[name]), name


def test_answer_token_mask_hand_made_texts():
    """vision.answer_loss_weight's mask: exactly the answer tokens of each question (after
    "a:", up to its "."), nothing of the prompt, the full stop or a caption; the weights are
    answer_weight there, 1 on the other targets, 0 on padding."""
    from moe.data.tokenizer import train_bpe
    from moe.vision import data as vd
    from moe.vision.task import answer_token_mask, encode_texts, loss_weights

    corpus = [vd.caption(vd.Scene((vd.Shape("red", "square", 0), vd.Shape("blue", "circle", 8))))]
    corpus += ["q: is there a red circle? a: yes. q: how many shapes? a: two.",
               "q: where is the blue square? a: top left. q: what colour is the cross? a: green."]
    tok = train_bpe(corpus * 20, 300)
    texts = ["q: is there a red circle? a: yes. q: where is the blue square? a: top left.",
             "q: what colour is the cross? a: no.", corpus[0]]
    x, y = encode_texts(tok, texts, 40)
    mask = answer_token_mask(tok, texts, 40)
    answers = ["".join(tok.decode([int(t)]) for t, m in zip(y[i], mask[i]) if m)
               for i in range(3)]
    assert answers == [" yes top left", " no", ""]
    # each answer's tokens are contiguous and end right before its "."
    for i in range(2):
        pos = np.flatnonzero(mask[i])
        assert all(tok.decode([int(y[i, p + 1])]) == "." for p in pos if not mask[i, p + 1])
    w = loss_weights(mask, y, 4.0)
    assert set(w[mask].tolist()) == {4.0}
    assert (w[~mask & (y != -100)] == 1).all() and (w[y == -100] == 0).all()


@pytest.mark.parametrize("answer_weight", [1.0, 5.0])
def test_weighted_targets_give_the_weighted_mean_gradient(answer_weight):
    """forward_backward with target_weights (two micro-batches) gives the gradient of
    sum(w * ce) / sum(w) over the whole batch, computed here in one forward, and returns the
    UNWEIGHTED mean loss; weights of 1 are the plain n_targets path's gradient."""
    from moe.config import Config
    from moe.parallel.sharded_model import ShardedModel, moe_layer_names
    from moe.train.metrics import RoutingAccumulator

    mc = tiny_model_config(capacity_factor=None, eval_capacity_factor=None, aux_loss_coef=0.0,
                           z_loss_coef=0.0)
    cfg = Config(model=mc)
    cfg.train.batch_size, cfg.train.micro_batch_size, cfg.data.seq_len = 4, 2, 12
    g = torch.Generator().manual_seed(3)
    xy = torch.randint(1, mc.vocab_size, (4, 13), generator=g)
    x, y = xy[:, :-1], xy[:, 1:].clone()
    y[0, 8:] = -100  # padding
    y[3, 5:] = -100
    w = torch.where(y == -100, 0.0, 1.0)
    w[1, 2:4] = w[2, 7] = answer_weight  # "answers"
    n_targets = int((y != -100).sum())

    ref = build_model(mc, seed=0)
    ce = torch.nn.functional.cross_entropy(ref(x).flatten(0, 1), y.flatten(),
                                           ignore_index=-100, reduction="none")
    (ce @ w.flatten() / w.sum()).backward()

    model = build_model(mc, seed=0)
    rt = ShardedModel(cfg, model)
    rt.train(True)
    routing = RoutingAccumulator(moe_layer_names(cfg), mc.n_experts)
    loss = rt.forward_backward(x, y, routing, n_targets=n_targets, target_weights=w)
    assert loss == pytest.approx(float(ce.detach().sum()) / n_targets, rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    if answer_weight == 1.0:
        return
    plain = build_model(mc, seed=0)
    rt = ShardedModel(cfg, plain)
    rt.train(True)
    rt.forward_backward(x, y, RoutingAccumulator(moe_layer_names(cfg), mc.n_experts),
                        n_targets=n_targets)
    assert not torch.allclose(plain.output.weight.grad, model.output.weight.grad)


# -- binding questions alone (moe/vision/binding_lm.py, scripts/vision_binding.py) -----------

def _binding_setup(workdir):
    from moe.checkpoint import load_model
    from moe.data.tokenizer import BPETokenizer
    from moe.vision import binding_lm as blm
    from moe.vision import data as vd

    loaded = load_model(workdir / "single")
    vc = loaded.cfg.vision
    data = vd.load_or_build(loaded.cfg.data.cache_dir, vc.n_train, vc.n_val, vc.n_heldout,
                            vc.data_seed, vc.image_size, vc.max_objects)
    return loaded.model, BPETokenizer.load(loaded.tokenizer), data, blm, vd


def test_binding_rows_and_answer_logits(workdir, single):
    """A row per exists query (a yes and a distractor no per image), ending at "a:", its
    answer the first token of " yes" / " no"; dropless, the logits picked from a right-padded
    batch are each question's own forward at its last token (with capacity the padding takes
    expert slots, as in training)."""
    model, tok, data, blm, vd = _binding_setup(workdir)
    rows = blm.binding_rows(tok, data.val)
    queries = vd.exists_queries(data.val)
    assert len(rows) == len(queries) > 0
    for row, (image, q) in zip(rows, queries):
        assert row.image == image and row.ids == (tok.eot_id, *tok.encode(q.prompt))
        assert tok.decode(list(row.ids[-2:])).endswith("a:")
        assert row.answer == tok.encode(q.answer)[0]
    assert {r.answer for r in rows} == {tok.encode(" yes")[0], tok.encode(" no")[0]}
    media = encoder_features(model, data.val, "latents")
    assert media.shape == (len(data.val.images), model.vcfg.n_latents, model.vcfg.d_vision)
    picked = [rows[0], *[r for r in rows if len(r.ids) != len(rows[0].ids)][:1], rows[1]]
    assert len({len(r.ids) for r in picked}) == 2  # ragged: padding is exercised
    with torch.no_grad():
        logits, answers = blm.answer_logits(model.eval(), picked, media, tok.eot_id, None)
        for i, r in enumerate(picked):
            alone = model(torch.tensor([r.ids]), media=media[[r.image]], capacity_factor=None,
                          media_pos=torch.zeros(1, 1, dtype=torch.long))[0, -1]
            torch.testing.assert_close(logits[i], alone.float(), rtol=1e-5, atol=1e-5)
    assert answers.tolist() == [r.answer for r in picked]


def test_train_on_binding_freezes_the_encoder_and_records_a_curve(workdir, single):
    model, tok, data, blm, vd = _binding_setup(workdir)
    rows = blm.binding_rows(tok, data.train)
    media = encoder_features(model, data.train, "latents")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    yes, no = tok.encode(" yes")[0], tok.encode(" no")[0]
    curve = blm.train_on_binding(model, rows, media, rows, media, pad=tok.eot_id, yes=yes,
                                 no=no, steps=5, batch=4, lr=1e-2, eval_every=2)
    assert [r["step"] for r in curve] == [0, 2, 4, 5]
    assert [r["questions"] for r in curve] == [0, 8, 16, 20]
    assert all(0 <= r["val_exists"] <= 1 for r in curve) and curve[1]["loss"] > 0
    after = model.state_dict()
    for name, value in before.items():
        frozen = name.split(".", 1)[0] in ("vision_encoder", "perceiver")
        assert torch.equal(after[name], value) == frozen or "norm" in name, name
    assert not torch.equal(after["cross_attn.0.attn.wq.weight"],
                           before["cross_attn.0.attn.wq.weight"])
    # The accuracy counts the first answer token's yes-vs-no logit, hand-checked.
    with torch.no_grad():
        logits, answers = blm.answer_logits(model.eval(), rows, media, tok.eot_id)
    expect = float(((logits[:, yes] > logits[:, no]) == (answers == yes)).float().mean())
    assert blm.binding_accuracy(model, rows, media, tok.eot_id, yes, no) == expect


def test_oracle_media_is_the_probes_features_padded():
    from moe.vision import binding_lm as blm
    from moe.vision import data as vd
    from moe.vision.probe import ORACLE_DIM, oracle_features

    split = vd.make_split("val", 3, seed=2, size=16)
    media = blm.oracle_media(split, 16, 64)
    assert media.shape == (3, 16, 64)
    assert torch.equal(media[:, :9, :ORACLE_DIM], blm.ORACLE_SCALE * oracle_features(split))
    assert not media[:, 9:].any() and not media[:, :, ORACLE_DIM:].any()
    with pytest.raises(ValueError, match="do not fit"):
        blm.oracle_media(split, 4, 64)


def test_vision_binding_command(workdir, single, capsys):
    import json

    from moe.cli import vision_binding

    run = str(workdir / "single")
    assert vision_binding.main(["--run", run, "--steps=2", "--eval-every=1", "--batch=2,4",
                                "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["curves"]) == ["2", "4"] and out["features"] == "latents"
    assert [r["questions"] for r in out["curves"]["4"]] == [0, 4, 8]
    assert vision_binding.main(["--run", run, "--steps=1"]) == 0
    assert "| batch | 0 | 1 |" in capsys.readouterr().out
    for bad, message in ((["--batch=0"], "must be positive"),
                         (["--features=oracle"], "do not fit")):
        assert vision_binding.main(["--run", run, *bad]) == 2
        assert message in capsys.readouterr().err
    assert vision_binding.main(["--run", str(workdir / "nothing-here")]) == 2
    assert "error:" in capsys.readouterr().err


# -- the text model's pre-training and the binding rows (vision.text_pretrain_steps,
#    binding_share, binding_from) ----------------------------------------------------------

def _phase_loader(binding_from=1, share=0.5, n_text=10, n_bind=6):
    from moe.vision.task import ImageTextLoader, VisionLoader

    return VisionLoader(ImageTextLoader(n_text, 0),
                        ImageTextLoader(n_bind, 1) if share else None, binding_from, share)


def test_vision_loader_phases_hand_counted():
    """binding_from=1, share 1/2, batches of 4: step 1 four texts, steps 2-3 two texts and
    two binding rows; each source's draws are its own loader's, in order."""
    from moe.vision.task import ImageTextLoader, VisionLoader

    loader = _phase_loader()
    batches = [loader.next_batch(4) for _ in range(3)]
    assert [(len(b.texts), len(b.binding)) for b in batches] == [(4, 0), (2, 2), (2, 2)]
    texts, bind = ImageTextLoader(10, 0), ImageTextLoader(6, 1)
    assert np.array_equal(np.concatenate([b.texts for b in batches]), texts.next_indices(8))
    assert np.array_equal(np.concatenate([b.binding for b in batches]), bind.next_indices(4))
    assert _phase_loader(share=0.9).n_binding(4) == 3  # a text row always stays
    with pytest.raises(ValueError, match="exactly when"):
        VisionLoader(ImageTextLoader(4, 0), None, 0, 0.5)


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_vision_loader_resumes_in_every_phase(cut):
    """A loader rebuilt from the state after ``cut`` batches draws what the unbroken one
    draws next (across the phase boundary); a state without binding rows is refused."""
    ref = _phase_loader()
    want = [ref.next_batch(4) for _ in range(5)]
    first = _phase_loader()
    for _ in range(cut):
        first.next_batch(4)
    resumed = _phase_loader()
    resumed.load_state_dict(first.state_dict())
    for got, exp in zip([resumed.next_batch(4) for _ in range(5 - cut)], want[cut:]):
        assert np.array_equal(got.texts, exp.texts)
        assert np.array_equal(got.binding, exp.binding)
    with pytest.raises(ConfigError, match="resume with its vision.binding_share"):
        _phase_loader(share=0).load_state_dict(first.state_dict())
    texts_only = _phase_loader(share=0)  # a checkpoint from before the binding rows
    texts_only.load_state_dict(first.texts.state_dict())
    assert np.array_equal(texts_only.next_batch(4).texts, first.texts.next_indices(4))


def _with_text_steps(cfg, steps):
    import copy

    out = copy.deepcopy(cfg)
    out.vision.text_pretrain_steps = steps
    return out


def test_text_pretraining_trains_the_text_model_alone(workdir):
    """pretrain_text: the text weights move and the loss falls; every vision parameter
    (encoder, resampler, cross-attention) is bitwise what it was."""
    from moe.parallel.sharded_model import ShardedModel
    from moe.vision.task import VisionTask
    from moe.vision.text_pretrain import pretrain_text, text_pretrain_batch

    cfg = load_config(None, _vision_args(workdir, "text_pre", "--vision.text_pretrain_steps=12",
                                         "--vision.text_pretrain_lr=1e-2"))
    assert text_pretrain_batch(cfg) == 8 * 112 // 128 == 7
    task = VisionTask(cfg)
    model = build_vision_model(cfg.model, cfg.vision, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rt = ShardedModel(cfg, model)
    rt.train(True)
    first = pretrain_text(rt, _with_text_steps(cfg, 1), task.text)
    model.load_state_dict(before)
    last = pretrain_text(rt, cfg, task.text)
    assert last < first
    after = model.state_dict()
    for name, value in before.items():
        assert torch.equal(after[name], value) == is_vision_param(name), name


def test_binding_rows_are_the_training_images_exists_questions(workdir, single):
    """One row per exists query of the training images (a yes and a distractor no each):
    its image, its text with the answer and full stop, laid out as the texts' rows."""
    from moe.vision import data as vd
    from moe.vision.task import VisionTask, encode_texts

    cfg = load_config(None, _vision_args(workdir, "bind_rows", "--vision.binding_share=0.5",
                                         "--vision.answer_loss_weight=3"))
    task = VisionTask(cfg)
    queries = vd.exists_queries(task.data.train)
    assert len(task.bind_x) == len(queries) > 0
    assert task.bind_image.tolist() == [i for i, _ in queries]
    texts = [q.prompt + q.answer + "." for _, q in queries]
    assert texts[0].startswith("q: is there a ") and texts[0].endswith(("? a: yes.", "? a: no."))
    x, y = encode_texts(task.tokenizer, texts, cfg.data.seq_len)
    assert np.array_equal(task.bind_x, x) and np.array_equal(task.bind_y, y)
    answers = [task.tokenizer.decode(y[r][task.bind_w[r] == 3].tolist()) for r in range(4)]
    assert answers == [q.answer for _, q in queries[:4]]  # the answer alone weighs 3


PHASES = ["--vision.text_pretrain_steps=2", "--vision.binding_share=0.5",
          "--vision.binding_from=2", "--train.max_steps=4", "--train.eval_every=4",
          "--train.ckpt_every=1", "--data.seq_len=128"]  # 8 windows of 128 a text step


@pytest.fixture(scope="module")
def phased(workdir):
    """One process: two text pre-training steps, two steps of texts, two with binding rows
    (the reference)."""
    train(load_config(None, _vision_args(workdir, "phased", *PHASES)))
    return read_rows(workdir / "phased")


def test_phased_run_resumes_exactly(workdir, phased):
    """Stopped before the binding rows and after the first binding step, and resumed, the
    run logs exactly the unbroken run's numbers (the pre-training runs once, at step 0)."""
    assert [r["step"] for r in phased if "lm_loss" in r] == [1, 2, 3, 4]
    assert phased[0]["step"] == 0 and phased[0]["text_pretrain_loss"] > 0
    args = _vision_args(workdir, "phased_resumed", *PHASES)
    for stop in (2, 3):
        train(load_config(None, args + [f"--train.max_steps={stop}"]))
    train(load_config(None, args))
    rows = [r for r in read_rows(workdir / "phased_resumed")
            if not ("val_loss" in r and r["step"] in (2, 3))]
    assert_same_rows(phased, rows, KEYS, tag="phased resume")


@pytest.mark.slow
def test_phased_run_data_parallel_matches_one_process(workdir, phased):
    """The text pre-training's windows and the binding rows split over two ranks like any
    batch."""
    run_ranks(_train_rank, 2, _vision_args(workdir, "phased_dp2", *PHASES,
                                           "--parallel.dp=2"), timeout_s=300)
    assert_same_rows(phased, read_rows(workdir / "phased_dp2"), KEYS, tag="phased dp2")


@pytest.mark.parametrize("bad,message", [
    ("--vision.binding_share=1", r"vision.binding_share=1.0 must be in \[0, 1\)"),
    ("--vision.text_pretrain_steps=-1", "vision.text_pretrain_steps=-1 must be >= 0"),
    ("--vision.text_pretrain_lr=0", "vision.text_pretrain_lr"),
])
def test_bad_phase_settings_are_one_line(tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, _vision_args(tmp_path, "bad", bad))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("extra,message", [
    (["--vision.text_pretrain_steps=1", "--train.batch_size=2", "--train.micro_batch_size=2"],
     "= 1.75 windows a step"),
    (["--vision.text_pretrain_steps=1", "--vision.freeze_text=true"], "freeze_text=true freezes"),
    (["--vision.binding_share=0.5", "--vision.max_objects=1"], "raise vision.max_objects"),
])
def test_impossible_phases_are_refused_before_anything_is_written(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message) as err:
        train(load_config(None, _vision_args(tmp_path, "bad", *extra)))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "bad").exists()


def test_binding_rows_of_hand_made_scenes():
    """Hand-made scenes: image i asks about its object i % count (yes, objects in reading
    order) and its seen distractor i % count (no; red circle is held out, so scene 0 has
    one); a one-object scene has no distractor and gives no row."""
    from types import SimpleNamespace

    from moe.data.tokenizer import train_bpe
    from moe.vision import data as vd
    from moe.vision.task import _binding_rows

    scenes = [vd.Scene((vd.Shape("blue", "circle", 7), vd.Shape("red", "square", 0))),
              vd.Scene((vd.Shape("green", "cross", 4),)),
              vd.Scene((vd.Shape("green", "square", 0), vd.Shape("white", "triangle", 8)))]
    split = vd.VisionSplit(np.zeros((3, 16, 16, 3), np.uint8), scenes, [""] * 3)
    tok = train_bpe(["q: is there a red square? a: yes. no."] * 4, 300)
    task = SimpleNamespace(data=SimpleNamespace(train=split), tokenizer=tok, seq_len=64,
                           train_w=None)
    cfg = SimpleNamespace(vision=VisionConfig(enabled=True, binding_share=0.5))
    image, x, y, w = _binding_rows(task, cfg)
    assert image.tolist() == [0, 0, 2, 2] and w is None
    assert (x[:, 0] == tok.eot_id).all()  # the image marker, as the texts' rows
    assert [tok.decode(row[row != -100].tolist()) for row in y] == [
        f"{t}<|endoftext|>" for t in (
            "q: is there a red square? a: yes.", "q: is there a blue square? a: no.",
            "q: is there a green square? a: yes.", "q: is there a green triangle? a: no.")]
    # binding_answer_weight: the answer alone is a target (" yes" / " no", not the "."), at it
    weighted = SimpleNamespace(vision=VisionConfig(enabled=True, binding_share=0.5,
                                                   binding_answer_weight=5.0))
    _, x5, y5, w5 = _binding_rows(task, weighted)
    assert np.array_equal(x5, x)
    assert [tok.decode(row[row != -100].tolist()) for row in y5] == [" yes", " no"] * 2
    assert np.array_equal(w5, np.where(y5 != -100, 5.0, 0.0))
    with pytest.raises(ConfigError, match="raise vision.max_objects"):
        _binding_rows(task, SimpleNamespace(vision=VisionConfig(enabled=True, max_objects=1,
                                                               binding_share=0.5)))


@pytest.mark.parametrize("answer_weight", [None, 5.0])
def test_padding_columns_cut_from_a_step_change_nothing_dropless(workdir, answer_weight):
    """A training step cuts the columns past its longest text; dropless (no expert capacity
    for padding to share) and without router losses (which count every token, padding too)
    its loss and every gradient are the full-width step's."""
    from moe.parallel.sharded_model import ShardedModel, moe_layer_names
    from moe.train.metrics import RoutingAccumulator
    from moe.vision.task import IGNORE_INDEX, VisionTask

    cfg = load_config(None, _vision_args(workdir, "trim", "--model.capacity_factor=null",
                                         "--model.aux_loss_coef=0", "--model.z_loss_coef=0",
                                         "--vision.binding_share=0.25",
                                         "--vision.binding_answer_weight="
                                         f"{'null' if answer_weight is None else answer_weight}"))
    task = VisionTask(cfg)
    runs = []
    for cut in (True, False):
        model = build_vision_model(cfg.model, cfg.vision, seed=0)
        rt = ShardedModel(cfg, model)
        rt.train(True)
        routing = RoutingAccumulator(moe_layer_names(cfg), cfg.model.n_experts)
        loader = task.loader()
        if cut:
            widths = []

            def spy(x, *a, inner=rt.forward_backward, seen=widths, **k):
                seen.append(x.shape[1])
                return inner(x, *a, **k)

            rt.forward_backward = spy
            loss = task.step(rt, loader, 8, routing)
            assert widths[0] < cfg.data.seq_len  # the step did cut
        else:  # the same rows at full width, by hand
            b = loader.next_batch(8)
            x = np.concatenate([task.train_x[b.texts], task.bind_x[b.binding]])
            y = torch.from_numpy(np.concatenate([task.train_y[b.texts], task.bind_y[b.binding]]))
            images = np.concatenate([b.texts, task.bind_image[b.binding]])
            assert int((y != IGNORE_INDEX).sum(1).max()) < y.shape[1]  # there is padding to cut
            w = None
            if answer_weight is not None:  # texts 1 a token, binding answers answer_weight
                w = torch.from_numpy(np.concatenate([
                    (task.train_y[b.texts] != IGNORE_INDEX).astype(np.float32),
                    task.bind_w[b.binding]]))
            loss = rt.forward_backward(torch.from_numpy(x), y, routing,
                                       task._inputs(task.data.train, images),
                                       n_targets=int((y != IGNORE_INDEX).sum()),
                                       target_weights=w)
        runs.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()
                            if p.grad is not None}))
    (cut_loss, cut_grads), (full_loss, full_grads) = runs
    assert cut_loss == pytest.approx(full_loss, rel=1e-6)
    assert cut_grads.keys() == full_grads.keys()
    for name, g in cut_grads.items():
        torch.testing.assert_close(g, full_grads[name], rtol=1e-4, atol=1e-6, msg=name)
