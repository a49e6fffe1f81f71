"""Generated images of coloured shapes, with captions and questions, for a toy Flamingo.

The world is a 3x3 grid of cells on a black background. A scene holds 1..max_objects objects
in distinct cells, with distinct colours and distinct shapes, so that every question below has
one answer. Colours, shapes and positions are module constants (``COLOURS``, ``SHAPES``,
``POSITIONS``; a cell is ``row * 3 + col``).

Compositional split: of the 6 x 4 colour x shape combinations, the 6 in ``HELD_OUT`` (colour
index c, shape index s with ``(c + s) % 4 == 0``: one shape per colour) are never drawn in the
train and val splits. Every image of the heldout split holds exactly one of them, so a model
that answers ``composition_queries`` right has put together a colour and a shape it has only
seen apart.

Text is lower case; answers start with a space because they are appended to their prompt::

    caption     "a red square at the top left and a blue circle at the bottom."
    colour      "q: what colour is the circle? a:"   -> " blue"
    shape       "q: what shape is the red one? a:"   -> " square"
    count       "q: how many shapes? a:"             -> " two"
    position    "q: where is the red square? a:"     -> " top left"
    exists      "q: is there a red square? a:"       -> " yes" / " no"
    training    the caption, or 2 or 3 questions, each "prompt answer.":
                "a red square at the top left and a blue circle at the bottom."
                "q: how many shapes? a: two. q: where is the blue circle? a: bottom."

Binding ("exists"). Colours and shapes are distinct within a scene, so no colour, shape or
position question needs a colour bound to a shape: the colour alone names the object. An
exists question does: its negatives are preferably *distractors*, a pair whose colour belongs
to one object of the scene and whose shape to another ("is there a blue triangle?" beside a
blue square and a red triangle), which a model that only knows which colours and which shapes
are present cannot answer.

The data mix (``training_text``): ``CAPTION_SHARE`` = 1/2 of the texts are the caption; of the
question texts, ``EXISTS_SHARE`` = 1/2 are one exists question and 1-2 other questions (in
random order), the rest 2-3 of the colour / shape / position / count questions. So
a quarter of all texts asks an exists question (21% of the questions of a train split; count
26%, colour, shape and position 17-18% each: colour and shape questions are about 60% as
many as in a mix without exists questions). In train
and val texts an exists question is only about a seen pair (never a ``HELD_OUT`` one): its
positive is an object's own pair, its negative a seen distractor or, when the scene has none
(one object, or only held-out cross pairs), a seen pair with one attribute from the scene and
the other absent. Nothing else in the text gives its answer away:

- the other questions of an exists text are the count question and questions about the
  objects it does not *involve* (so none names its colour or its shape, which would tell the
  answer: "what shape is the red one? a: circle" rules out a red square); it involves the
  objects carrying its colour or shape and, when that is one object of several, one more
  drawn at random, so that yes and no leave the same objects to the other questions;
- ``DISTRACTOR_SHARE`` of the exists texts draw their negative from the distractors (1: all,
  data format 3); the others from the one-absent pairs (``exists_questions(distractors=
  False)``), which presence alone answers: an easier signal, measured without effect on
  binding in docs/vision.md, so the default stays 1;
- which exists question a text asks is chosen to balance yes and no per (pair, object count)
  over the split (``make_split`` keeps the counts): overall and for every seen pair as many
  yes as no, to within a few, so the question alone predicts nothing (``exists_balance``).

Probes: ``composition_queries`` (the colour and the shape of each held-out object),
``binding_probe`` (is there <held-out pair>? yes on each heldout image, and as many no's per
held-out pair on images of the same distribution holding its colour and shape on two
different objects: a small split of its own, built from the heldout split and the seed), and
``exists_queries``, the seen-pair counterpart on val images (a yes and a distractor no each).

Cache (``load_or_build``): ``<cache_dir>/vision-<fingerprint>/`` holds, per split,
``{split}.npz`` (``images``: uint8 [N, size, size, 3]) and ``{split}.json`` (``scenes``: lists
of ``{"colour", "shape", "cell"}``, ``texts``), a few ``preview_{split}_{i}.png`` for humans,
and ``meta.json``, written last: a folder without it is an unfinished build and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from moe.data.cache import atomic_file, build_lock, log, read_meta, write_meta

# Bump when the images or texts change for the same parameters: old caches then miss.
FORMAT_VERSION = 3  # 3: exists questions in the texts

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
    "purple": (160, 60, 200),
    "white": (235, 235, 235),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
POSITIONS: tuple[str, ...] = ("top left", "top", "top right", "left", "centre", "right",
                              "bottom left", "bottom", "bottom right")
GRID = 3
NUMBER_WORDS: tuple[str, ...] = ("one", "two", "three", "four")
KINDS: tuple[str, ...] = ("colour", "shape", "count", "position", "exists")
ANSWERS_EXISTS: tuple[str, str] = ("yes", "no")
SPLITS: tuple[str, ...] = ("train", "val", "heldout")

# One held-out shape per colour (and each shape held out for one or two colours), so the
# heldout split tests every colour and every shape in a combination never seen.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    (c, s) for ci, c in enumerate(COLOUR_NAMES) for si, s in enumerate(SHAPES)
    if (ci + si) % 4 == 0)
TRAIN_COMBOS: tuple[tuple[str, str], ...] = tuple(
    (c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in HELD_OUT)

# Object size as a fraction of the cell: the circle's radius, the half-extent of the others.
RADIUS_RANGE = (0.30, 0.42)
RADIUS_DEFAULT = 0.36  # render(rng=None): no jitter, the middle size
MAX_JITTER_PX = 2.0
MAX_WORDS = 27  # the longest text: 3 position questions with 2-word positions, 9 words each
CAPTION_SHARE = 0.5  # of the texts: the caption; the others are questions
EXISTS_SHARE = 0.5  # of the question texts: one exists question and 1-2 others
DISTRACTOR_SHARE = 1.0  # of the exists texts: negatives drawn from the distractors
PROBE_STREAM = len(SPLITS)  # binding_probe's generator: (seed, PROBE_STREAM), apart from splits
PREVIEWS = 4  # preview PNGs per split
PREVIEW_SCALE = 4


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    cell: int

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {COLOUR_NAMES}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if not 0 <= self.cell < GRID * GRID:
            raise ValueError(f"cell {self.cell} is outside the {GRID}x{GRID} grid")


@dataclass(frozen=True)
class Scene:
    objects: tuple[Shape, ...]

    def __post_init__(self) -> None:
        # A tuple even when built from a list, so scenes stay hashable and comparable.
        object.__setattr__(self, "objects", tuple(self.objects))
        objs = self.objects
        if not 1 <= len(objs) <= len(SHAPES):
            raise ValueError(f"a scene holds 1..{len(SHAPES)} objects, not {len(objs)}")
        # Distinct colours and shapes make "what colour is the circle?" unambiguous.
        for attr in ("colour", "shape", "cell"):
            values = [getattr(o, attr) for o in objs]
            if len(set(values)) != len(values):
                raise ValueError(f"objects of a scene need distinct {attr}s, got {values}")


@dataclass(frozen=True)
class Question:
    prompt: str
    answer: str  # with its leading space: the text that follows the prompt
    kind: str


# --- scenes ---------------------------------------------------------------------------------

def scene_to_dict(scene: Scene) -> dict:
    return {"objects": [{"colour": o.colour, "shape": o.shape, "cell": o.cell}
                        for o in scene.objects]}


def scene_from_dict(d: dict) -> Scene:
    return Scene(tuple(Shape(str(o["colour"]), str(o["shape"]), int(o["cell"]))
                       for o in d["objects"]))


def _check_max_objects(max_objects: int) -> None:
    if not 1 <= max_objects <= len(SHAPES):
        raise ValueError(f"max_objects={max_objects} must be 1..{len(SHAPES)} (the objects of "
                         "a scene have distinct shapes)")


def _pick_others(rng: np.random.Generator, k: int, colours: list[int],
                 shapes: list[int], any_pair: bool = False) -> list[tuple[int, int]] | None:
    """k train-combo (colour, shape) index pairs from the given pools, distinct in both; None
    when the draw hit a held-out combo (the caller redraws: rejection keeps it simple).
    any_pair: every combo is allowed."""
    cs = rng.permutation(colours)[:k]
    ss = rng.permutation(shapes)[:k]
    pairs = [(int(c), int(s)) for c, s in zip(cs, ss)]
    if not any_pair and any((COLOUR_NAMES[c], SHAPES[s]) in HELD_OUT for c, s in pairs):
        return None
    return pairs


def random_scene(rng: np.random.Generator, max_objects: int = 3, heldout: bool = False,
                 any_pair: bool = False) -> Scene:
    """1..max_objects objects, uniformly many; all train combos, or (heldout) exactly one
    held-out combo and the rest train combos, or (any_pair: only for moe/vision/probe.py's
    control, never in a split) any combos. Objects are in reading order (by cell)."""
    _check_max_objects(max_objects)
    k = int(rng.integers(1, max_objects + 1))
    all_c, all_s = list(range(len(COLOUR_NAMES))), list(range(len(SHAPES)))
    while True:
        if heldout:
            ci, si = sorted(HELD_OUT)[int(rng.integers(len(HELD_OUT)))]
            first = (COLOUR_NAMES.index(ci), SHAPES.index(si))
            rest = _pick_others(rng, k - 1, [c for c in all_c if c != first[0]],
                                [s for s in all_s if s != first[1]])
            pairs = None if rest is None else [first, *rest]
        else:
            pairs = _pick_others(rng, k, all_c, all_s, any_pair)
        if pairs is not None:
            break
    cells = rng.choice(GRID * GRID, size=k, replace=False)
    objs = sorted((Shape(COLOUR_NAMES[c], SHAPES[s], int(cell))
                   for (c, s), cell in zip(pairs, cells)), key=lambda o: o.cell)
    return Scene(tuple(objs))


def heldout_objects(scene: Scene) -> list[Shape]:
    return [o for o in scene.objects if (o.colour, o.shape) in HELD_OUT]


# --- rendering ------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    # Pixel centres, so a shape centred on a cell is symmetric in pixels.
    yy, xx = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of a shape of half-extent r at offsets (dx, dy) from its centre."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        # A little smaller than the circle's box, so both cover about the same area.
        h = 0.85 * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":
        # Apex at the top (dy = -r), base at dy = +r; half-width grows from 0 to r.
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) * 0.5)
    if shape == "cross":
        t = 0.35 * r  # thick bars: still a cross after bilinear resizing
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= t) & (ay <= r)) | ((ay <= t) & (ax <= r))
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """The scene as uint8 [size, size, 3]. With rng, each object's size and centre are jittered
    (so images are not pixel-identical); without, every object is centred at the middle size.
    The jitter is bounded so that an object never leaves its cell."""
    if size < GRID * 4:
        raise ValueError(f"size={size} is too small for a {GRID}x{GRID} grid of shapes")
    cell = size / GRID
    yy, xx = _grid(size)
    img = np.zeros((size, size, 3), dtype=np.uint8)
    for o in scene.objects:
        row, col = divmod(o.cell, GRID)
        cy, cx = (row + 0.5) * cell, (col + 0.5) * cell
        if rng is None:
            r = RADIUS_DEFAULT * cell
        else:
            r = float(rng.uniform(*RADIUS_RANGE)) * cell
            j = min(MAX_JITTER_PX, max(0.0, cell / 2 - r))
            cx += float(rng.uniform(-j, j))
            cy += float(rng.uniform(-j, j))
        # Objects sit in distinct cells and stay inside them, so plain assignment is enough.
        img[_mask(o.shape, xx - cx, yy - cy, r)] = COLOURS[o.colour]
    return img


# --- text -----------------------------------------------------------------------------------

def _phrase(o: Shape) -> str:
    return f"a {o.colour} {o.shape} at the {POSITIONS[o.cell]}"


def caption(scene: Scene) -> str:
    """Objects in reading order: "a red circle at the top left and a blue square at the
    bottom." (three: "a ..., a ... and a ...")."""
    parts = [_phrase(o) for o in sorted(scene.objects, key=lambda o: o.cell)]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text + "."


def colour_question(o: Shape) -> Question:
    return Question(f"q: what colour is the {o.shape}? a:", f" {o.colour}", "colour")


def shape_question(o: Shape) -> Question:
    return Question(f"q: what shape is the {o.colour} one? a:", f" {o.shape}", "shape")


def position_question(o: Shape) -> Question:
    return Question(f"q: where is the {o.colour} {o.shape}? a:", f" {POSITIONS[o.cell]}",
                    "position")


def count_question(scene: Scene) -> Question:
    return Question("q: how many shapes? a:", f" {NUMBER_WORDS[len(scene.objects) - 1]}",
                    "count")


def exists_question(colour: str, shape: str, present: bool) -> Question:
    return Question(f"q: is there a {colour} {shape}? a:",
                    " " + ANSWERS_EXISTS[0 if present else 1], "exists")


def questions(scene: Scene) -> list[Question]:
    """Every colour, shape, position and count question about the scene: per object in
    reading order its colour, shape and position question, then the count question (the exists
    questions are ``exists_questions``)."""
    out: list[Question] = []
    for o in sorted(scene.objects, key=lambda o: o.cell):
        out += [colour_question(o), shape_question(o), position_question(o)]
    out.append(count_question(scene))
    return out


def cross_pairs(scene: Scene) -> list[tuple[Shape, Shape]]:
    """(a, b) for every two different objects: the pair (a.colour, b.shape) is not in the
    scene (colours are distinct) although its colour and its shape are."""
    objs = sorted(scene.objects, key=lambda o: o.cell)
    return [(a, b) for a in objs for b in objs if a is not b]


@dataclass(frozen=True)
class _ExistsOption:
    question: Question
    pair: tuple[str, str]
    involved: tuple[Shape, ...]  # the objects carrying its colour or shape


def _exists_options(scene: Scene, distractors: bool = True) -> list[_ExistsOption]:
    """The exists questions a text may ask about the scene, seen pairs only: a positive per
    seen object, then the negatives: the seen distractors (``distractors`` and the scene has
    one), else the seen *one-absent* pairs, one attribute from an object and the other absent
    from the scene."""
    objs = sorted(scene.objects, key=lambda o: o.cell)
    out = [_ExistsOption(exists_question(o.colour, o.shape, True), (o.colour, o.shape), (o,))
           for o in objs if (o.colour, o.shape) not in HELD_OUT]
    negatives = [_ExistsOption(exists_question(a.colour, b.shape, False), (a.colour, b.shape),
                               (a, b))
                 for a, b in cross_pairs(scene) if (a.colour, b.shape) not in HELD_OUT]
    if not negatives or not distractors:
        negatives = []
        colours, shapes = {o.colour for o in objs}, {o.shape for o in objs}
        for o in objs:
            pairs = [(o.colour, s) for s in SHAPES if s not in shapes]
            pairs += [(c, o.shape) for c in COLOUR_NAMES if c not in colours]
            negatives += [_ExistsOption(exists_question(c, s, False), (c, s), (o,))
                          for c, s in pairs if (c, s) not in HELD_OUT]
    return out + negatives


def exists_questions(scene: Scene, distractors: bool = True) -> list[Question]:
    """The exists questions a training text may ask about the scene (``training_text``):
    with distractor negatives where the scene has some, or (``distractors=False``) with
    one-absent negatives."""
    return [opt.question for opt in _exists_options(scene, distractors)]


def _balance_key(pair: tuple[str, str], scene: Scene) -> tuple[str, str, int]:
    return (*pair, len(scene.objects))


def _exists_text(scene: Scene, rng: np.random.Generator, balance: dict) -> list[Question]:
    """One exists question, the one whose answer its (pair, object count) lacks most in
    ``balance`` (ties by rng), with 1-2 questions that do not involve its objects."""
    hard = DISTRACTOR_SHARE >= 1 or bool(rng.random() < DISTRACTOR_SHARE)
    options = _exists_options(scene, distractors=hard)

    def need(opt: _ExistsOption) -> int:  # yes - no so far, signed for the answer it adds
        yes, no = balance.get(_balance_key(opt.pair, scene), (0, 0))
        return no - yes if opt.question.answer == " yes" else yes - no

    needs = [need(o) for o in options]
    best = [o for o, n in zip(options, needs) if n == max(needs)]
    opt = best[int(rng.integers(len(best)))]
    key = _balance_key(opt.pair, scene)
    yes, no = balance.get(key, (0, 0))
    balance[key] = (yes + 1, no) if opt.question.answer == " yes" else (yes, no + 1)
    involved = list(opt.involved)
    rest = [o for o in sorted(scene.objects, key=lambda o: o.cell) if o not in involved]
    if len(involved) == 1 and rest:  # as many objects left to the others as a distractor
        involved.append(rest.pop(int(rng.integers(len(rest)))))
    others = [q for o in rest for q in (colour_question(o), shape_question(o),
                                         position_question(o))]
    others.append(count_question(scene))
    k = int(rng.integers(1, 3))
    picked = [others[i] for i in rng.choice(len(others), size=min(k, len(others)),
                                            replace=False)]
    picked.insert(int(rng.integers(len(picked) + 1)), opt.question)
    return picked


def training_text(scene: Scene, rng: np.random.Generator, balance: dict | None = None) -> str:
    """The caption (``CAPTION_SHARE`` of the images, by rng) or 2 or 3 questions with their
    answers, never both: a question that followed the caption could be answered by copying
    from the text, and the model would learn to read the caption instead of the image (the
    composition tests ask questions with no caption before them). ``EXISTS_SHARE`` of the
    question texts hold one exists question (``_exists_text``); the others 2-3 of
    ``questions``. ``balance``: the split's yes / no counts per (colour, shape, object count),
    updated here; None: a fresh count (the exists question is drawn at random)."""
    if rng.random() < CAPTION_SHARE:
        return caption(scene)
    if rng.random() < EXISTS_SHARE:
        qs = _exists_text(scene, rng, {} if balance is None else balance)
    else:
        pool = questions(scene)
        k = int(rng.integers(2, 4))
        qs = [pool[i] for i in rng.choice(len(pool), size=min(k, len(pool)), replace=False)]
    return " ".join(q.prompt + q.answer + "." for q in qs)


def parse_questions(text: str) -> list[Question]:
    """The questions of a question text, with their kinds (the inverse of ``training_text``
    for question texts); [] for a caption."""
    if not text.startswith("q: "):
        return []
    out = []
    for chunk in text[3:].split(" q: "):
        prompt, answer = ("q: " + chunk).rstrip(".").split(" a:")
        kind = next(k for k, start in (("colour", "q: what colour"), ("shape", "q: what shape"),
                                       ("count", "q: how many"), ("position", "q: where"),
                                       ("exists", "q: is there")) if prompt.startswith(start))
        out.append(Question(prompt + " a:", answer, kind))
    return out


def exists_pair(q: Question) -> tuple[str, str]:
    """(colour, shape) an exists question asks about."""
    colour, shape = q.prompt.removeprefix("q: is there a ").removesuffix("? a:").split(" ")
    return colour, shape


def exists_balance(texts: list[str]) -> dict[tuple[str, str], tuple[int, int]]:
    """(yes, no) counts of the exists questions in ``texts``, per (colour, shape)."""
    out: dict[tuple[str, str], tuple[int, int]] = {}
    for text in texts:
        for q in parse_questions(text):
            if q.kind == "exists":
                yes, no = out.get(exists_pair(q), (0, 0))
                out[exists_pair(q)] = (yes + 1, no) if q.answer == " yes" else (yes, no + 1)
    return out


def candidates(kind: str, max_objects: int = 3) -> tuple[str, ...]:
    """Every possible answer of a kind (with the leading space), to score by likelihood;
    chance accuracy is 1 / len. Counts run to max_objects."""
    if kind == "colour":
        words: tuple[str, ...] = COLOUR_NAMES
    elif kind == "shape":
        words = SHAPES
    elif kind == "position":
        words = POSITIONS
    elif kind == "count":
        _check_max_objects(max_objects)
        words = NUMBER_WORDS[:max_objects]
    elif kind == "exists":
        words = ANSWERS_EXISTS
    else:
        raise ValueError(f"unknown question kind {kind!r}; expected one of {KINDS}")
    return tuple(" " + w for w in words)


# --- splits ---------------------------------------------------------------------------------

@dataclass
class VisionSplit:
    images: np.ndarray  # uint8 [N, size, size, 3]
    scenes: list[Scene]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.scenes)

    def composition_queries(self) -> list[tuple[int, Question]]:
        return composition_queries(self)


def composition_queries(split: VisionSplit) -> list[tuple[int, Question]]:
    """(image index, question) for every held-out object: its colour asked by its shape and its
    shape asked by its colour; 2 per heldout image, none for train and val."""
    out: list[tuple[int, Question]] = []
    for i, scene in enumerate(split.scenes):
        for o in heldout_objects(scene):
            out += [(i, colour_question(o)), (i, shape_question(o))]
    return out


def exists_queries(split: VisionSplit, n_images: int | None = None
                   ) -> list[tuple[int, Question]]:
    """Seen-pair binding queries (the counterpart of ``binding_probe``): for each of the first
    ``n_images`` images that has a seen distractor, "is there <an object's own pair>?" (yes,
    object i % count) and "is there <a seen distractor>?" (no, distractor i % count): one yes
    and one no per image, so neither the image alone nor the answer rate tells the answer."""
    out: list[tuple[int, Question]] = []
    for i, scene in enumerate(split.scenes[:n_images]):
        objs = [o for o in sorted(scene.objects, key=lambda o: o.cell)
                if (o.colour, o.shape) not in HELD_OUT]
        negs = [(a.colour, b.shape) for a, b in cross_pairs(scene)
                if (a.colour, b.shape) not in HELD_OUT]
        if objs and negs:
            o, (c, s) = objs[i % len(objs)], negs[i % len(negs)]
            out += [(i, exists_question(o.colour, o.shape, True)),
                    (i, exists_question(c, s, False))]
    return out


@dataclass
class BindingProbe:
    """The held-out binding test: ``queries`` index ``split``, whose first images are the
    heldout split's (same order) and the rest images drawn for negatives only."""
    split: VisionSplit
    queries: list[tuple[int, Question]]


def heldout_cross_pairs(scene: Scene) -> list[tuple[str, str]]:
    """Held-out pairs whose colour and shape are both in the scene, on different objects."""
    return sorted({(a.colour, b.shape) for a, b in cross_pairs(scene)
                   if (a.colour, b.shape) in HELD_OUT})


def binding_probe(heldout: VisionSplit, seed: int, max_objects: int = 3,
                  max_draws: int | None = None) -> BindingProbe:
    """Is there <held-out pair>? For each heldout image, its own held-out pair (yes). For each
    held-out pair h, as many no's as it has yes's: first heldout images holding h's colour and
    shape apart (reading order), then new scenes of the heldout distribution (one held-out
    object, the rest seen; ``random_scene(heldout=True)``, redrawn until it holds a still
    needed pair apart; generator ``(seed, PROBE_STREAM)``), rendered (jittered) after the
    heldout images; one no per new image. So yes and no are balanced per held-out pair and
    overall (chance 50%), the negatives' images come from the positives' distribution, and a
    model that checks only that the colour and the shape are present scores 50%. Where a pair
    cannot get enough negatives within ``max_draws`` scenes (default 100 per heldout image;
    max_objects=2 leaves only the held-out circles and crosses possible, 1 none), its yes's are
    cut to its no's, the last first. Images are the heldout's size. Deterministic."""
    pos: dict[tuple[str, str], list[int]] = {h: [] for h in sorted(HELD_OUT)}
    neg: dict[tuple[str, str], list[int]] = {h: [] for h in sorted(HELD_OUT)}
    for i, scene in enumerate(heldout.scenes):
        for o in heldout_objects(scene):
            pos[(o.colour, o.shape)].append(i)
    for i, scene in enumerate(heldout.scenes):
        for h in heldout_cross_pairs(scene):
            if len(neg[h]) < len(pos[h]):
                neg[h].append(i)
    rng = np.random.default_rng([seed, PROBE_STREAM])
    scenes: list[Scene] = []
    draws, max_draws = 0, 100 * len(heldout) if max_draws is None else max_draws
    while draws < max_draws and any(len(neg[h]) < len(pos[h]) for h in neg) and max_objects > 1:
        draws += 1
        scene = random_scene(rng, max_objects, heldout=True)
        needed = [h for h in heldout_cross_pairs(scene) if len(neg[h]) < len(pos[h])]
        if needed:
            h = min(needed, key=lambda h: (len(neg[h]) - len(pos[h]), h))  # the most lacking
            neg[h].append(len(heldout) + len(scenes))
            scenes.append(scene)
    images = np.zeros((len(scenes), *heldout.images.shape[1:]), dtype=np.uint8)
    for j, scene in enumerate(scenes):
        images[j] = render(scene, heldout.images.shape[1], rng)
    split = VisionSplit(np.concatenate([heldout.images, images]), heldout.scenes + scenes,
                        heldout.texts + [caption(sc) for sc in scenes])
    queries: list[tuple[int, Question]] = []
    for h in sorted(HELD_OUT):
        m = min(len(pos[h]), len(neg[h]))
        queries += [(i, exists_question(*h, True)) for i in pos[h][:m]]
        queries += [(i, exists_question(*h, False)) for i in neg[h][:m]]
    return BindingProbe(split, sorted(queries, key=lambda q: (q[0], q[1].answer)))


def make_split(kind: str, n: int, seed: int, size: int = 32, max_objects: int = 3) -> VisionSplit:
    """n images of one split, a function of (kind, n, seed, size, max_objects) only. Train, val
    and heldout draw from generators seeded by (seed, split index): independent streams. The
    exists questions are balanced over the split (``training_text``'s ``balance``)."""
    if kind not in SPLITS:
        raise ValueError(f"unknown split {kind!r}; expected one of {SPLITS}")
    if n < 0 or seed < 0:
        raise ValueError(f"n={n} and seed={seed} must be >= 0")
    _check_max_objects(max_objects)
    rng = np.random.default_rng([seed, SPLITS.index(kind)])
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    scenes, texts = [], []
    balance: dict = {}
    for i in range(n):
        scene = random_scene(rng, max_objects, heldout=kind == "heldout")
        images[i] = render(scene, size, rng)
        scenes.append(scene)
        texts.append(training_text(scene, rng, balance))
    return VisionSplit(images, scenes, texts)


# --- image files ----------------------------------------------------------------------------

def _to_pil(image: np.ndarray, scale: int = 1) -> Image.Image:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} "
                         f"{list(image.shape)}")
    if scale != 1:
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)  # nearest: crisp pixels
    return Image.fromarray(image)


def save_image(path: str | Path, image: np.ndarray, scale: int = 1) -> None:
    """Save a uint8 [H, W, 3] image (format from the suffix), upscaled by ``scale`` (nearest)."""
    _to_pil(image, scale).save(path)


def load_image(path: str | Path, size: int = 32) -> np.ndarray:
    """An image file as uint8 [size, size, 3] RGB, resized (bilinear) when it is not square of
    that size. A missing or unreadable file raises ValueError naming it."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.array(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:  # FileNotFoundError is an OSError
        reason = "no such file" if isinstance(e, FileNotFoundError) else "not a readable image"
        raise ValueError(f"cannot load image {path}: {reason} ({type(e).__name__})") from None


# --- cache ----------------------------------------------------------------------------------

@dataclass
class VisionData:
    train: VisionSplit
    val: VisionSplit
    heldout: VisionSplit
    folder: Path


def vision_params(n_train: int, n_val: int, n_heldout: int, seed: int, size: int = 32,
                  max_objects: int = 3) -> dict:
    return {"format_version": FORMAT_VERSION, "n_train": n_train, "n_val": n_val,
            "n_heldout": n_heldout, "seed": seed, "size": size, "max_objects": max_objects}


def vision_fingerprint(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def _write_split(folder: Path, name: str, split: VisionSplit) -> None:
    with atomic_file(folder / f"{name}.npz") as tmp:
        # Through a file object: given a name, savez_compressed would append ".npz" to it.
        with open(tmp, "wb") as f:
            np.savez_compressed(f, images=split.images)
            f.flush()
            os.fsync(f.fileno())
    doc = {"scenes": [scene_to_dict(s) for s in split.scenes], "texts": split.texts}
    with atomic_file(folder / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(doc) + "\n")
    for i in range(min(PREVIEWS, len(split))):
        with atomic_file(folder / f"preview_{name}_{i}.png") as tmp:
            # The temp name has no .png suffix: say the format.
            _to_pil(split.images[i], PREVIEW_SCALE).save(tmp, format="PNG")


def _read_split(folder: Path, name: str, n: int, size: int) -> VisionSplit:
    def bad(what: str) -> ValueError:
        return ValueError(f"vision cache {folder / name}.*: {what}: delete {folder} to rebuild "
                          "the cache")

    try:
        with np.load(folder / f"{name}.npz") as z:
            images = z["images"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise bad(f"cannot read {name}.npz ({type(e).__name__})") from None
    if images.dtype != np.uint8 or images.shape != (n, size, size, 3):
        raise bad(f"{name}.npz holds {images.dtype} {list(images.shape)} but meta.json says "
                  f"uint8 {[n, size, size, 3]}")
    try:
        doc = json.loads((folder / f"{name}.json").read_text())
        scenes = [scene_from_dict(d) for d in doc["scenes"]]
        texts = [str(t) for t in doc["texts"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise bad(f"cannot read {name}.json ({type(e).__name__})") from None
    if len(scenes) != n or len(texts) != n:
        raise bad(f"{name}.json holds {len(scenes)} scenes and {len(texts)} texts, meta.json "
                  f"says {n}")
    return VisionSplit(images, scenes, texts)


def load_or_build(cache_dir: str | Path, n_train: int, n_val: int, n_heldout: int, seed: int,
                  size: int = 32, max_objects: int = 3) -> VisionData:
    """The three splits, generated into ``cache_dir/vision-<fingerprint>`` on first use and read
    back afterwards. One process builds (a file lock); the others wait, then read."""
    params = vision_params(n_train, n_val, n_heldout, seed, size, max_objects)
    fingerprint = vision_fingerprint(params)
    folder = Path(cache_dir) / f"vision-{fingerprint}"
    counts = {"train": n_train, "val": n_val, "heldout": n_heldout}
    meta = read_meta(folder, fingerprint)
    if meta is None:
        with build_lock(folder):
            meta = read_meta(folder, fingerprint)  # another process may have finished it
            if meta is None:
                start = time.perf_counter()
                log(f"building vision data in {folder}: {n_train} train, {n_val} val, "
                    f"{n_heldout} heldout images of {size}x{size} ...")
                splits = {name: make_split(name, n, seed, size, max_objects)
                          for name, n in counts.items()}
                for name, split in splits.items():
                    _write_split(folder, name, split)
                write_meta(folder, {"fingerprint": fingerprint, "params": params,
                                    "splits": {k: {"n": v} for k, v in counts.items()},
                                    "heldout_combos": sorted(map(list, HELD_OUT))})
                log(f"  vision data built in {time.perf_counter() - start:.1f}s")
                return VisionData(splits["train"], splits["val"], splits["heldout"], folder)
    for name, n in counts.items():
        if meta.get("splits", {}).get(name, {}).get("n") != n:
            raise ValueError(f"{folder / 'meta.json'} does not list {n} {name} images: delete "
                             f"{folder} to rebuild the cache")
    splits = {name: _read_split(folder, name, n, size) for name, n in counts.items()}
    return VisionData(splits["train"], splits["val"], splits["heldout"], folder)
