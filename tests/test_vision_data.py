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


def mentioned_pairs(text: str) -> set[tuple[str, str]]:
    """Every "<colour> <shape>" written in a text (captions, position and exists questions)."""
    words = text.replace("?", " ").replace(".", " ").replace(",", " ").split()
    return {(a, b) for a, b in zip(words, words[1:]) if a in COLOURS and b in SHAPES}


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
    # The bound is tight: three position questions with two-word positions.
    three = Scene((Shape("purple", "triangle", 0), Shape("white", "square", 2),
                   Shape("green", "circle", 6)))
    worst = " ".join(q.prompt + q.answer + "." for q in vd.questions(three)
                     if q.kind == "position")
    assert len(worst.split()) == vd.MAX_WORDS
    # No held-out pair in any train or val text; every seen pair is asked about.
    for split in (train, val):
        written = set().union(*map(mentioned_pairs, split.texts))
        assert written and not written & HELD_OUT
    asked = {vd.exists_pair(q) for t in train.texts for q in vd.parse_questions(t)
             if q.kind == "exists"}
    assert asked == set(TRAIN_COMBOS)
    # The heldout split's texts do name held-out pairs (its captions), but never ask if one
    # is there: exists questions are about seen pairs in every split.
    assert set().union(*map(mentioned_pairs, held.texts)) & HELD_OUT
    assert all(vd.exists_pair(q) not in HELD_OUT for t in held.texts
               for q in vd.parse_questions(t) if q.kind == "exists")


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
    for q in qs + vd.exists_questions(scene):
        assert q.answer in vd.candidates(q.kind)
    assert len(vd.candidates("colour")) == 6 and len(vd.candidates("count")) == 3
    assert vd.candidates("exists") == (" yes", " no") and "exists" in vd.KINDS
    texts = [vd.training_text(scene, np.random.default_rng(s)) for s in range(80)]
    # A caption or questions, never both (no answer to copy from a caption before it).
    assert {t for t in texts if not t.startswith("q: ")} == {vd.caption(scene)}
    asked = [t for t in texts if t.startswith("q: ")]
    assert 20 < len(asked) < 60
    known = {q.prompt + q.answer for q in qs + vd.exists_questions(scene)}
    n_exists = []
    for text in asked:
        assert text.count("q: ") in (2, 3)
        for chunk in text[3:].split(" q: "):
            assert ("q: " + chunk).rstrip(".") in known
        parsed = vd.parse_questions(text)
        assert " ".join(q.prompt + q.answer + "." for q in parsed) == text
        n_exists.append(sum(q.kind == "exists" for q in parsed))
    # A question text asks one exists question or none, each about half the time.
    assert set(n_exists) == {0, 1} and 0.25 < np.mean(n_exists) < 0.75


def test_exists_questions_of_hand_made_scenes():
    yes, no = " yes", " no"
    # Red circle is held out: of the cross pairs only "blue square" (blue from the circle,
    # square from the red one) is a seen distractor.
    two = Scene((Shape("blue", "circle", 7), Shape("red", "square", 0)))
    assert vd.exists_questions(two) == [
        Question("q: is there a red square? a:", yes, "exists"),
        Question("q: is there a blue circle? a:", yes, "exists"),
        Question("q: is there a blue square? a:", no, "exists"),
    ]
    # One object: no distractor, so the negatives share one attribute with it and the other
    # is absent (red circle and yellow square are held out).
    one = Scene((Shape("red", "square", 4),))
    assert [(q.prompt, q.answer) for q in vd.exists_questions(one)] == [
        ("q: is there a red square? a:", yes), ("q: is there a red triangle? a:", no),
        ("q: is there a red cross? a:", no), ("q: is there a green square? a:", no),
        ("q: is there a blue square? a:", no), ("q: is there a purple square? a:", no),
        ("q: is there a white square? a:", no)]
    # Two objects whose cross pairs (red circle, yellow square) are both held out: the same
    # fallback, per object.
    apart = Scene((Shape("red", "square", 0), Shape("yellow", "circle", 1)))
    negatives = [q.prompt for q in vd.exists_questions(apart) if q.answer == no]
    assert negatives[:2] == ["q: is there a red triangle? a:", "q: is there a red cross? a:"]
    assert "q: is there a yellow cross? a:" in negatives and len(negatives) == 11
    assert not {vd.exists_pair(q) for q in vd.exists_questions(apart)} & HELD_OUT
    # Without distractors: the one-absent negatives, per object, even where distractors exist
    # (the texts' easier negatives: presence alone answers them).
    assert [(q.prompt, q.answer) for q in vd.exists_questions(two, distractors=False)] == [
        ("q: is there a red square? a:", yes), ("q: is there a blue circle? a:", yes)] + [
        (f"q: is there a {c} {s}? a:", no) for c, s in (
            ("red", "triangle"), ("red", "cross"), ("green", "square"), ("purple", "square"),
            ("white", "square"), ("blue", "cross"), ("green", "circle"), ("yellow", "circle"),
            ("white", "circle"))]
    assert vd.exists_questions(one, distractors=False) == vd.exists_questions(one)
    # A three-object scene: 3 yes, and the 6 cross pairs less the held-out ones.
    three = Scene((Shape("green", "square", 0), Shape("blue", "circle", 4),
                   Shape("white", "triangle", 8)))
    qs = vd.exists_questions(three)
    assert [vd.exists_pair(q) for q in qs if q.answer == yes] == [
        ("green", "square"), ("blue", "circle"), ("white", "triangle")]
    assert [vd.exists_pair(q) for q in qs if q.answer == no] == [
        ("green", "circle"), ("green", "triangle"), ("blue", "square"),
        ("white", "square"), ("white", "circle")]  # blue triangle is held out


def _exists_texts(texts):
    for text in texts:
        parsed = vd.parse_questions(text)
        for q in parsed:
            if q.kind == "exists":
                yield q, [p for p in parsed if p is not q]


def test_exists_answers_are_balanced_and_not_given_by_the_text():
    train = vd.make_split("train", 3000, seed=5)
    balance = vd.exists_balance(train.texts)
    assert set(balance) == set(TRAIN_COMBOS)
    yes, no = (sum(v[i] for v in balance.values()) for i in (0, 1))
    assert yes + no > 600 and abs(yes - no) <= 10
    for pair, (y, n) in balance.items():  # the question alone predicts nothing
        assert abs(y - n) <= max(3, 0.1 * (y + n)), (pair, y, n)
    # No other question of the text names its colour or shape (which would give the answer:
    # "what shape is the red one? a: circle" rules out a red square).
    answers_after = Counter()
    for q, others in _exists_texts(train.texts):
        c, s = vd.exists_pair(q)
        for p in others:
            words = (p.prompt + p.answer).replace("?", " ").split()
            assert c not in words and s not in words, (q, p)
        before = others[:[*others, q].index(q)]
        answers_after[any(p.kind != "count" for p in before), q.answer] += 1
    # ... and a colour, shape or position question before it hints neither answer.
    for hinted in (False, True):
        y, n = answers_after[hinted, " yes"], answers_after[hinted, " no"]
        assert abs(y - n) <= 0.15 * (y + n), (hinted, y, n)
    # Negatives are mostly distractors (colour and shape both present, on two objects).
    kinds = Counter()
    for scene, text in zip(train.scenes, train.texts):
        for q in vd.parse_questions(text):
            if q.kind == "exists":
                c, s = vd.exists_pair(q)
                present = (c, s) in combos(scene)
                assert present == (q.answer == " yes")
                if not present:
                    apart = c in {o.colour for o in scene.objects} and s in {
                        o.shape for o in scene.objects}
                    kinds[apart] += 1
    assert kinds[True] > kinds[False] > 0


def test_exists_queries_on_val():
    val = vd.make_split("val", 60, seed=1)
    queries = vd.exists_queries(val, 50)
    assert queries == vd.exists_queries(val, 50) and len(queries) > 40
    assert all(i < 50 for i, _ in queries)
    for i in sorted({i for i, _ in queries}):  # a yes and a no about each image asked
        answers = [q for j, q in queries if j == i]
        assert [q.answer for q in answers] == [" yes", " no"]
        yes, no = (vd.exists_pair(q) for q in answers)
        scene = val.scenes[i]
        assert yes in combos(scene) and no not in combos(scene) and no not in HELD_OUT
        (a,) = [o for o in scene.objects if o.colour == no[0]]
        (b,) = [o for o in scene.objects if o.shape == no[1]]
        assert a != b  # a distractor: its colour and shape on two objects


def _check_probe(held, probe, max_objects=3):
    n = len(held)
    np.testing.assert_array_equal(probe.split.images[:n], held.images)
    assert probe.split.scenes[:n] == held.scenes
    assert len(probe.split.images) == len(probe.split.scenes) == len(probe.split.texts)
    answers = Counter((vd.exists_pair(q), q.answer) for _, q in probe.queries)
    for h in HELD_OUT:  # balanced per held-out pair, so overall: chance is 50%
        assert answers[h, " yes"] == answers[h, " no"]
    assert sum(answers.values()) == len(probe.queries)
    for i, q in probe.queries:
        assert q.kind == "exists" and vd.exists_pair(q) in HELD_OUT
        scene = probe.split.scenes[i]
        assert 1 <= len(scene.objects) <= max_objects
        assert len(vd.heldout_objects(scene)) == 1  # every image of the heldout distribution
        c, s = vd.exists_pair(q)
        if q.answer == " yes":
            assert i < n and (c, s) in combos(scene)
        else:
            assert (c, s) not in combos(scene)
            (a,) = [o for o in scene.objects if o.colour == c]
            (b,) = [o for o in scene.objects if o.shape == s]
            assert a != b


def test_binding_probe():
    held = vd.make_split("heldout", 120, seed=1)
    probe = vd.binding_probe(held, seed=1)
    _check_probe(held, probe)
    positives = [i for i, q in probe.queries if q.answer == " yes"]
    assert sorted(positives) == list(range(len(held)))  # every heldout image, once
    assert any(i < len(held) for i, q in probe.queries if q.answer == " no")  # some natural
    extra = probe.split.images[len(held):]
    assert len(extra) > 0 and all(img.any() for img in extra)
    again = vd.binding_probe(held, seed=1)  # deterministic
    assert again.queries == probe.queries
    np.testing.assert_array_equal(again.split.images, probe.split.images)
    other = vd.binding_probe(held, seed=2)
    assert [q for q in other.queries if q[1].answer == " yes"] == [
        q for q in probe.queries if q[1].answer == " yes"]
    assert other.split.scenes[len(held):] != probe.split.scenes[len(held):]
    # Two objects at most: only the held-out circles and crosses can be apart in an image
    # (their shape is held out with two colours); the others lose their yes's.
    held2 = vd.make_split("heldout", 60, seed=1, max_objects=2)
    probe2 = vd.binding_probe(held2, seed=1, max_objects=2)
    _check_probe(held2, probe2, max_objects=2)
    assert {vd.exists_pair(q)[1] for _, q in probe2.queries} == {"circle", "cross"}
    held1 = vd.make_split("heldout", 20, seed=1, max_objects=1)
    assert vd.binding_probe(held1, seed=1, max_objects=1).queries == []


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
