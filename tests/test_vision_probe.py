"""The readout probe of moe/vision/probe.py and scripts/vision_probe.py: labels and oracle
features on hand-made scenes, scoring on hand-made predictions, a probe that learns the seen
task, and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moe.cli import vision_probe as cli
from moe.vision import data as vd
from moe.vision import probe as vp

NONE_SHAPE, NONE_COLOUR = vp.N_SHAPES, vp.N_COLOURS


def _split(*scenes: vd.Scene) -> vd.VisionSplit:
    images = np.stack([vd.render(s) for s in scenes])
    return vd.VisionSplit(images, list(scenes), [""] * len(scenes))


SEEN = vd.Scene((vd.Shape("green", "square", 0), vd.Shape("red", "triangle", 4)))
HELD = vd.Scene((vd.Shape("red", "circle", 2), vd.Shape("blue", "cross", 8)))  # red circle held out


def test_attribute_labels_of_hand_made_scenes():
    assert ("red", "circle") in vd.HELD_OUT and ("blue", "cross") not in vd.HELD_OUT
    shape_of, colour_of = vp.attribute_labels(_split(SEEN, HELD))
    c, s = vd.COLOUR_NAMES.index, vd.SHAPES.index
    expect_shape = torch.full((2, 6), NONE_SHAPE)
    expect_shape[0, c("green")], expect_shape[0, c("red")] = s("square"), s("triangle")
    expect_shape[1, c("red")], expect_shape[1, c("blue")] = s("circle"), s("cross")
    expect_colour = torch.full((2, 4), NONE_COLOUR)
    expect_colour[0, s("square")], expect_colour[0, s("triangle")] = c("green"), c("red")
    expect_colour[1, s("circle")], expect_colour[1, s("cross")] = c("red"), c("blue")
    assert torch.equal(shape_of, expect_shape) and torch.equal(colour_of, expect_colour)


def test_oracle_features_are_one_hot_per_cell():
    feats = vp.oracle_features(_split(SEEN))
    assert feats.shape == (1, 9, vp.ORACLE_DIM) == (1, 9, 6 + 4 + 1 + 9)
    red_triangle = torch.zeros(vp.ORACLE_DIM)
    red_triangle[[vd.COLOUR_NAMES.index("red"), 6 + vd.SHAPES.index("triangle"), 10, 11 + 4]] = 1
    assert torch.equal(feats[0, 4], red_triangle)
    empty = torch.zeros(vp.ORACLE_DIM)
    empty[11 + 7] = 1  # an empty cell has only its cell bit
    assert torch.equal(feats[0, 7], empty)
    noisy = vp.oracle_features(_split(SEEN), noise=0.3, seed=1)
    assert torch.equal(noisy, vp.oracle_features(_split(SEEN), noise=0.3, seed=1))
    assert 0.2 < float((noisy - feats).std()) < 0.4


def test_any_pair_split_holds_held_out_pairs_and_the_splits_do_not():
    split = vp.any_pair_split(300, seed=0, size=16)
    pairs = {(o.colour, o.shape) for s in split.scenes for o in s.objects}
    assert vd.HELD_OUT <= pairs  # every held-out pair appears among 300 images
    assert split.images.shape == (300, 16, 16, 3)
    assert np.array_equal(split.images, vp.any_pair_split(300, seed=0, size=16).images)
    train = vd.make_split("train", 300, seed=0, size=16)
    assert not {(o.colour, o.shape) for s in train.scenes for o in s.objects} & vd.HELD_OUT


def test_score_probe_counts_each_object_in_its_group():
    split = _split(SEEN, HELD)
    shape_of, colour_of = vp.attribute_labels(split)
    shape_pred, colour_pred = shape_of.clone(), colour_of.clone()
    red, circle = vd.COLOUR_NAMES.index("red"), vd.SHAPES.index("circle")
    shape_pred[1, red] = vd.SHAPES.index("square")  # wrong only about the held-out red circle
    shape_pred[0, vd.COLOUR_NAMES.index("white")] = 0  # and one "none" missed

    def fake_probe(feats):
        return (torch.nn.functional.one_hot(shape_pred, NONE_SHAPE + 1).float(),
                torch.nn.functional.one_hot(colour_pred, NONE_COLOUR + 1).float())

    every = vp.score_probe(fake_probe, None, split)
    assert (every.shape, every.colour, every.n_objects) == (0.75, 1.0, 4)
    assert every.absent == pytest.approx(1 - 1 / (4 + 4 + 2 + 2))  # 8 absent colours, 4 shapes
    held = vp.score_probe(fake_probe, None, split, heldout_pairs=True)
    assert (held.shape, held.colour, held.n_objects) == (0.0, 1.0, 1)
    assert colour_pred[1, circle] == red
    seen = vp.score_probe(fake_probe, None, split, heldout_pairs=False)
    assert (seen.shape, seen.colour, seen.n_objects) == (1.0, 1.0, 3)


def test_probe_learns_the_seen_task_from_oracle_features():
    """The readout can do the task: from perfect features it answers validation images right.
    (What it then does on held-out pairs is the measurement, not a property: docs/vision.md.)"""
    train, val = vd.make_split("train", 2000, seed=3, size=16), vd.make_split("val", 200, 3, 16)
    probe, loss = vp.train_probe(vp.oracle_features(train), vp.attribute_labels(train), dim=32,
                                 n_heads=2, n_kv_heads=1, head_dim=16, steps=400, seed=0)
    scores = vp.score_probe(probe, vp.oracle_features(val), val)
    assert loss < 0.1 and scores.shape > 0.95 and scores.colour > 0.95 and scores.absent > 0.95


def test_binding_queries_of_hand_made_scenes():
    one = vd.Scene((vd.Shape("white", "square", 3),))  # no distractor: no query
    q = vp.binding_queries(_split(SEEN, one, HELD), seed=0)
    pairs = {(int(i), vp.PAIRS[int(p)], int(a)) for i, p, a in q}
    assert len(q) == 4 and {int(i) for i in q[:, 0]} == {0, 2}
    assert {(i, a) for i, _, a in pairs} == {(0, 1), (0, 0), (2, 1), (2, 0)}
    assert (0, ("green", "square"), 1) in pairs or (0, ("red", "triangle"), 1) in pairs
    assert (0, ("green", "triangle"), 0) in pairs or (0, ("red", "square"), 0) in pairs
    # The held-out red circle is never asked: blue cross is its scene's only seen object.
    assert (2, ("blue", "cross"), 1) in pairs
    assert (2, ("red", "cross"), 0) in pairs or (2, ("blue", "circle"), 0) in pairs
    # seed=None: the model's own val_exists queries, in their order.
    val = vd.make_split("val", 40, seed=2)
    fixed = vp.binding_queries(val)
    assert [(int(i), vp.PAIRS[int(p)], " yes" if a else " no") for i, p, a in fixed] == [
        (i, vd.exists_pair(q), q.answer) for i, q in vd.exists_queries(val)]


def _presence_features(split: vd.VisionSplit) -> torch.Tensor:
    """Oracle features with the binding taken out: which colours and which shapes are in
    the image, as two tokens, and nothing about which colour goes with which shape."""
    feats = vp.oracle_features(split)
    bags = torch.zeros(len(split), 2, vp.ORACLE_DIM)
    bags[:, 0, :vp.N_COLOURS] = feats[:, :, :vp.N_COLOURS].sum(1)
    bags[:, 1, vp.N_COLOURS:vp.N_COLOURS + vp.N_SHAPES] = feats[
        :, :, vp.N_COLOURS:vp.N_COLOURS + vp.N_SHAPES].sum(1)
    return bags


def test_binding_probe_needs_colour_and_shape_at_one_place(one_torch_thread):
    """From per-cell oracle features the binding readout answers the distractor questions;
    from the same colours and shapes with their cells taken apart it stays far below (a
    distractor's colour and shape are both present; only the pairs the training images never
    hold tell a little, e.g. red and circle present with red circle held out: 0.63 here):
    the probe measures co-location."""
    train, val = vd.make_split("train", 1500, seed=3, size=16), vd.make_split("val", 300, 3, 16)
    queries, val_queries = vp.binding_queries(train, seed=0), vp.binding_queries(val)
    dims = dict(dim=32, n_heads=2, n_kv_heads=1, head_dim=16, steps=300, seed=0)
    probe, loss = vp.train_binding_probe(vp.oracle_features(train), queries, **dims)
    assert loss < 0.1 and vp.score_binding(probe, vp.oracle_features(val), val_queries) > 0.95
    unbound, _ = vp.train_binding_probe(_presence_features(train), queries, **dims)
    assert vp.score_binding(unbound, _presence_features(val), val_queries) < 0.75


def _cli_args(tmp_path, *extra):
    return ["--config", "configs/vision_tiny.yaml", f"--data.cache_dir={tmp_path}",
            "--vision.n_train=64", "--vision.n_val=32", "--vision.n_heldout=16",
            "--vision.pretrain_steps=2", "--steps=5", "--threads=1", *extra]


def test_cli_json(tmp_path, capsys):
    assert cli.main(_cli_args(tmp_path, "--features=oracle,latents", "--noise=0,0.3",
                              "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["features"], r["noise"]) for r in out["rows"]] == [
        ("oracle", 0.0), ("oracle", 0.3), ("latents", None)]
    assert out["encoder"]["pretrain_steps"] == 2 and out["encoder_pairs"] == "seen"
    assert out["readout"] == {"dim": 128, "n_heads": 4, "n_kv_heads": 1, "head_dim": 32,
                              "steps": 5, "seed": 0}
    for row in out["rows"]:
        assert row["heldout_pair"]["n_objects"] == 16  # one held-out object per held-out image
        assert set(row["val"]) == {"shape", "colour", "absent", "n_objects"}
    assert "binding" not in out["rows"][0]
    assert cli.main(_cli_args(tmp_path, "--features=patches", "--encoder-pairs=all")) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| features |") and table[2].startswith("| patches |")
    assert cli.main(_cli_args(tmp_path, "--features=oracle", "--binding", "--json")) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert set(row["binding"]) == {"probe_loss", "n_queries", "val_exists", "seconds"}
    assert row["binding"]["n_queries"] == len(vp.binding_queries(
        vd.load_or_build(tmp_path, 64, 32, 16, 0).val)) > 0
    assert cli.main(_cli_args(tmp_path, "--features=oracle", "--binding")) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].endswith("val exists (chance 0.5) |") and table[2].count("|") == 6


@pytest.mark.parametrize("args, message", [
    (["--features=oracle,pixels"], "--features 'oracle,pixels': use a comma-separated subset"),
    (["--vision.enabled=false"], "the probe needs a vision config"),
    (["--vision.bogus=1"], "vision.bogus"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, message):
    assert cli.main(_cli_args(tmp_path, *args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
