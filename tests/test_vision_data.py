"""The generated vision data: scenes, rendering, text, splits, the disk cache, image files."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from moe.vision import data as vd
from moe.vision.data import (
    COLOURS,
    HELD_OUT,
    SHAPES,
    TRAIN_COMBOS,
    Question,
    Scene,
    Shape,
)


def combos(scene: Scene) -> list[tuple[str, str]]:
    return [(o.colour, o.shape) for o in scene.objects]


def test_world_constants():
    assert list(COLOURS) == ["red", "green", "blue", "yellow", "purple", "white"]
    assert len(HELD_OUT) == 6 and len(TRAIN_COMBOS) == 18
    assert sorted(c for c, _ in HELD_OUT) == sorted(COLOURS)  # one held-out shape per colour
    assert ("red", "circle") in HELD_OUT and ("red", "square") not in HELD_OUT
    assert set(TRAIN_COMBOS) | HELD_OUT == {(c, s) for c in COLOURS for s in SHAPES}


def test_make_split_is_deterministic():
    a = vd.make_split("train", 50, seed=3)
    b = vd.make_split("train", 50, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.texts == b.texts and a.scenes == b.scenes
    c = vd.make_split("train", 50, seed=4)
    assert not np.array_equal(a.images, c.images) and a.texts != c.texts
    v = vd.make_split("val", 50, seed=3)  # same distribution, other images
    assert not np.array_equal(a.images, v.images)
    assert a.images.shape == (50, 32, 32, 3) and a.images.dtype == np.uint8


def test_split_combinations():
    train = vd.make_split("train", 2000, seed=0)
    val = vd.make_split("val", 200, seed=0)
    held = vd.make_split("heldout", 200, seed=0)
    for split in (train, val):
        assert not any(c in HELD_OUT for s in split.scenes for c in combos(s))
    assert all(sum(c in HELD_OUT for c in combos(s)) == 1 for s in held.scenes)
    seen = Counter(c for s in train.scenes for c in combos(s))
    assert set(seen) == set(TRAIN_COMBOS)
    assert {len(s.objects) for s in train.scenes} == {1, 2, 3}
    assert {c for s in held.scenes for c in combos(s) if c in HELD_OUT} == HELD_OUT
    for s in train.scenes + held.scenes:
        for attr in ("colour", "shape", "cell"):
            values = [getattr(o, attr) for o in s.objects]
            assert len(set(values)) == len(values)
        assert [o.cell for o in s.objects] == sorted(o.cell for o in s.objects)
    assert max(len(t.split()) for t in train.texts) <= vd.MAX_WORDS


def test_scene_validation_and_serialisation():
    with pytest.raises(ValueError, match="distinct colours"):
        Scene((Shape("red", "circle", 0), Shape("red", "square", 1)))
    with pytest.raises(ValueError, match="unknown colour"):
        Shape("pink", "circle", 0)
    scene = vd.random_scene(np.random.default_rng(0), 3, heldout=True)
    d = json.loads(json.dumps(vd.scene_to_dict(scene)))
    assert vd.scene_from_dict(d) == scene


def test_render_hand_made_scene():
    img = vd.render(Scene((Shape("red", "square", 4),)), size=32)
    assert tuple(img[16, 16]) == COLOURS["red"]
    for y, x in [(0, 0), (0, 31), (31, 0), (31, 31)]:
        assert tuple(img[y, x]) == (0, 0, 0)
    # Jittered renders stay different images of the same scene, inside the centre cell.
    rng = np.random.default_rng(0)
    a, b = vd.render(Scene((Shape("red", "square", 4),)), rng=rng), vd.render(
        Scene((Shape("red", "square", 4),)), rng=rng)
    assert not np.array_equal(a, b)
    ys, xs = np.nonzero(a.any(-1))
    assert ys.min() >= 10 and ys.max() <= 21 and xs.min() >= 10 and xs.max() <= 21


@pytest.mark.parametrize("shape, corner_filled", [("circle", False), ("square", True),
                                                  ("triangle", False), ("cross", False)])
def test_shapes_are_visible(shape, corner_filled):
    img = vd.render(Scene((Shape("blue", shape, 4),)), size=48)
    on = img.any(-1)
    ys, xs = np.nonzero(on)
    assert on[ys.min(), xs.min()] == corner_filled  # the bounding box's top-left corner
    assert tuple(img[ys[0], xs[0]]) == COLOURS["blue"]
    if shape == "triangle":  # upward: wider at the bottom than at the top
        assert on[ys.max()].sum() > on[ys.min()].sum()


def test_caption_and_questions():
    # Listed out of order on purpose: the text follows reading order (cell index).
    scene = Scene((Shape("blue", "square", 7), Shape("red", "circle", 0)))
    assert vd.caption(scene) == "a red circle at the top left and a blue square at the bottom."
    assert vd.caption(Scene((Shape("red", "circle", 4),))) == "a red circle at the centre."
    three = Scene((Shape("red", "circle", 0), Shape("green", "cross", 2),
                   Shape("white", "triangle", 8)))
    assert vd.caption(three) == ("a red circle at the top left, a green cross at the top right "
                                 "and a white triangle at the bottom right.")
    qs = vd.questions(scene)
    assert qs[:3] == [
        Question("q: what colour is the circle? a:", " red", "colour"),
        Question("q: what shape is the red one? a:", " circle", "shape"),
        Question("q: where is the red circle? a:", " top left", "position"),
    ]
    assert Question("q: where is the blue square? a:", " bottom", "position") in qs
    assert qs[-1] == Question("q: how many shapes? a:", " two", "count")
    for q in qs:
        assert q.answer in vd.candidates(q.kind)
    assert len(vd.candidates("colour")) == 6 and len(vd.candidates("count")) == 3
    texts = [vd.training_text(scene, np.random.default_rng(s)) for s in range(40)]
    # A caption or questions, never both (no answer to copy from a caption before it).
    assert {t for t in texts if not t.startswith("q: ")} == {vd.caption(scene)}
    asked = [t for t in texts if t.startswith("q: ")]
    assert 5 < len(asked) < 35
    for text in asked:
        assert text.count("q: ") in (2, 3)
        for chunk in text[3:].split(" q: "):
            assert ("q: " + chunk).rstrip(".") in {q.prompt + q.answer for q in qs}


def test_composition_queries():
    held = vd.make_split("heldout", 40, seed=1)
    queries = vd.composition_queries(held)
    assert len(queries) == 80 and queries == held.composition_queries()
    for i, q in queries:
        (o,) = [o for o in held.scenes[i].objects if (o.colour, o.shape) in HELD_OUT]
        assert q.answer == {"colour": " " + o.colour, "shape": " " + o.shape}[q.kind]
        assert q.answer in vd.candidates(q.kind)
    assert vd.composition_queries(vd.make_split("train", 40, seed=1)) == []


def test_cache_builds_once_then_reads(tmp_path, monkeypatch):
    data = vd.load_or_build(tmp_path, 30, 10, 10, seed=0)
    names = {p.name for p in data.folder.iterdir()}
    assert {"train.npz", "train.json", "heldout.npz", "meta.json",
            "preview_val_3.png"} <= names
    assert vd.load_image(data.folder / "preview_train_0.png", size=128).shape == (128, 128, 3)

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt instead of reading the cache")

    monkeypatch.setattr(vd, "make_split", fail)
    again = vd.load_or_build(tmp_path, 30, 10, 10, seed=0)
    assert again.folder == data.folder
    for name in ("train", "val", "heldout"):
        a, b = getattr(data, name), getattr(again, name)
        np.testing.assert_array_equal(a.images, b.images)
        assert a.scenes == b.scenes and a.texts == b.texts
    monkeypatch.undo()

    # No meta.json: an unfinished build, rebuilt.
    (data.folder / "meta.json").unlink()
    (data.folder / "val.npz").unlink()
    rebuilt = vd.load_or_build(tmp_path, 30, 10, 10, seed=0)
    np.testing.assert_array_equal(rebuilt.val.images, data.val.images)
    assert (data.folder / "meta.json").is_file()


def test_cache_rejects_bad_files(tmp_path):
    data = vd.load_or_build(tmp_path, 20, 5, 5, seed=0)
    npz = data.folder / "train.npz"
    with open(npz, "wb") as f:  # a valid npz with the wrong image count
        np.savez_compressed(f, images=data.train.images[:7])
    with pytest.raises(ValueError, match="delete"):
        vd.load_or_build(tmp_path, 20, 5, 5, seed=0)
    npz.write_bytes(npz.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="delete"):
        vd.load_or_build(tmp_path, 20, 5, 5, seed=0)


def test_fingerprint_changes_with_parameters(tmp_path):
    base = vd.vision_params(20, 5, 5, seed=0)
    fps = {vd.vision_fingerprint(p) for p in (
        base, vd.vision_params(20, 5, 5, seed=1), vd.vision_params(20, 5, 5, seed=0, size=48),
        vd.vision_params(20, 5, 5, seed=0, max_objects=2))}
    assert len(fps) == 4
    assert all(len(fp) == 16 for fp in fps)
    a = vd.load_or_build(tmp_path, 8, 2, 2, seed=0).folder
    b = vd.load_or_build(tmp_path, 8, 2, 2, seed=0, size=48)
    assert a != b.folder and b.train.images.shape == (8, 48, 48, 3)


def test_image_files(tmp_path):
    img = vd.make_split("val", 1, seed=0).images[0]
    path = tmp_path / "x.png"
    vd.save_image(path, img)
    np.testing.assert_array_equal(vd.load_image(path), img)  # PNG is lossless
    vd.save_image(tmp_path / "big.png", img, scale=2)
    np.testing.assert_array_equal(vd.load_image(tmp_path / "big.png", size=64),
                                  img.repeat(2, 0).repeat(2, 1))
    assert vd.load_image(tmp_path / "big.png").shape == (32, 32, 3)  # bilinear down
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png"):
        vd.load_image(bad)
    with pytest.raises(ValueError, match="missing.png"):
        vd.load_image(tmp_path / "missing.png")
