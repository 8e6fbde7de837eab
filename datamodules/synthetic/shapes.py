"""Synthetic "shapes" data: 64×64 images of 1–3 coloured shapes, with captions and VQA questions.

Small enough for a tiny model to learn on CPU in minutes, yet with the real formats: webdataset
shards of captions (several references per image, for CIDEr) and of VQA questions (10 human
answers each, with a little deterministic noise so leave-one-out VQA accuracy is meaningful).

Every image has its own random stream ``(seed, split, index)``, so a sample does not depend on
how many samples are written, and train and val never share an image stream.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from rich.progress import Progress

from datamodules.formats.outputs import prepare_output, write_summary
from datamodules.formats.shards import ShardWriter
from mmlm.tokenizers import train_word_tokenizer

IMAGE_SIZE = 64
BACKGROUND = (235, 235, 235)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 80, 230),
    "yellow": (245, 200, 20),
    "purple": (140, 50, 190),
}
SHAPES = ("circle", "square", "triangle")
RADIUS_RANGE = (9, 14)  # inclusive: half the side of the shape's bounding box, in pixels
MIN_GAP = 2  # pixels between bounding boxes
MIN_DX = 8  # horizontal distance between centres, so "left of" is never ambiguous
SPLITS = ("train", "val")
NUM_HUMANS = 10
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}

VQA_PROMPT = "Question: {question} Answer:"
CAPTION_PROMPT = "a picture of"
VAL_SHARDS = 8
DEFAULT_TRAIN_IMAGES = 6000  # the quickstart's and `mmlm data synth-shapes`' sizes
DEFAULT_VAL_IMAGES = 500
QUESTION_TEMPLATES = {
    "colour": "what colour is the {shape}?",
    "shape": "what shape is the {colour} object?",
    "count": "how many shapes are there?",
    "count_shape": "how many {shape}s are there?",
    "position": "is the {a} {relation} of the {b}?",
}
CAPTION_TEMPLATES = ("{a} left of {b}.", "{b} right of {a}.", "{listing}.", "{total} {shapes}: {listing}.",
                     "a picture of {listing}.")
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": ("0", "1", "2", "3"),
    "position": ("yes", "no"),
}
# Noisy humans sometimes answer with a synonym; number words normalise to the digit.
SYNONYMS = {"0": "zero", "1": "one", "2": "two", "3": "three", "purple": "violet", "yellow": "gold",
            "square": "rectangle", "yes": "yeah"}


@dataclass(frozen=True)
class Shape:
    """One drawn shape: colour and kind, centre ``(x, y)`` and half-size ``radius`` in pixels."""

    colour: str
    shape: str
    x: int
    y: int
    radius: int

    @property
    def name(self) -> str:
        """``"red circle"``."""
        return f"{self.colour} {self.shape}"


Scene = tuple[Shape, ...]  # ordered left to right


@dataclass(frozen=True)
class Question:
    """A VQA question about a scene with its true answer and type (colour/shape/count/position)."""

    question: str
    answer: str
    question_type: str


# ---------------------------------------------------------------------------------------- scenes


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of image ``index`` of ``split`` (independent of every other image)."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    """One element of ``options``, uniformly (cheaper than ``rng.choice`` on a Python sequence)."""
    return options[int(rng.integers(len(options)))]


def _apart(a: Shape, b: Shape) -> bool:
    """True when the bounding boxes do not overlap and the centres are clearly left/right."""
    reach = a.radius + b.radius + MIN_GAP
    dx, dy = abs(a.x - b.x), abs(a.y - b.y)
    return dx >= MIN_DX and (dx >= reach or dy >= reach)


def _try_place(rng: np.random.Generator, count: int, size: int, tries: int = 30) -> list[Shape] | None:
    """Place ``count`` shapes at random without overlap, or None if a shape found no room."""
    placed: list[Shape] = []
    for radius in rng.integers(RADIUS_RANGE[0], RADIUS_RANGE[1] + 1, count):
        colour, shape = _pick(rng, tuple(COLOURS)), _pick(rng, SHAPES)
        for _ in range(tries):
            x, y = rng.integers(radius, size - radius, 2)
            candidate = Shape(colour, shape, int(x), int(y), int(radius))
            if all(_apart(candidate, other) for other in placed):
                placed.append(candidate)
                break
        else:
            return None
    return placed


def sample_scene(rng: np.random.Generator, size: int = IMAGE_SIZE) -> Scene:
    """1–3 shapes with independent uniform colour and kind, ordered left to right."""
    count = int(rng.integers(1, 4))
    while (placed := _try_place(rng, count, size)) is None:
        pass
    return tuple(sorted(placed, key=lambda s: s.x))


def draw_scene(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Render ``scene`` on a plain background as an RGB image."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for s in scene:
        box = (s.x - s.radius, s.y - s.radius, s.x + s.radius, s.y + s.radius)
        fill = COLOURS[s.colour]
        if s.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif s.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(s.x, s.y - s.radius), (s.x - s.radius, s.y + s.radius), (s.x + s.radius, s.y + s.radius)],
                         fill=fill)
    return image


def render_scene(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[Image.Image, Scene]:
    """Draw a random scene of 1–3 non-overlapping shapes; returns the image and the scene."""
    scene = sample_scene(rng, size)
    return draw_scene(scene, size), scene


# -------------------------------------------------------------------------------------- captions


def _groups(scene: Scene) -> list[tuple[str, str, int]]:
    """Identical shapes grouped as ``(colour, shape, count)``, ordered by their leftmost member."""
    counts = Counter((s.colour, s.shape) for s in scene)  # insertion order = left to right
    return [(colour, shape, n) for (colour, shape), n in counts.items()]


def _phrase(colour: str, shape: str, count: int) -> str:
    """``"a red circle"`` or ``"two red circles"``."""
    return f"a {colour} {shape}" if count == 1 else f"{NUMBER_WORDS[count]} {colour} {shape}s"


def _listing(phrases: list[str]) -> str:
    """``"A"``, ``"A and B"``, ``"A, B and C"``."""
    return phrases[0] if len(phrases) == 1 else f"{', '.join(phrases[:-1])} and {phrases[-1]}"


def captions_for(scene: Scene) -> list[str]:
    """Reference captions of ``scene``; the first is the canonical one (the training target).

    Two different shapes: ``"a red circle left of a blue square."`` first; otherwise the
    left-to-right listing, e.g. ``"two green triangles."`` or ``"a red circle, a blue square and a
    yellow circle."``. Further references rephrase the same content.
    """
    phrases = [_phrase(*group) for group in _groups(scene)]
    fields = {"listing": _listing(phrases), "total": NUMBER_WORDS[len(scene)],
              "shapes": "shape" if len(scene) == 1 else "shapes"}
    relational = len(phrases) == 2 and len(scene) == 2
    if relational:
        fields.update(a=phrases[0], b=phrases[1])
    templates = CAPTION_TEMPLATES if relational else CAPTION_TEMPLATES[2:]
    return [template.format(**fields) for template in templates]


# ------------------------------------------------------------------------------------- questions


def _unique(scene: Scene, attribute: str) -> list[Shape]:
    """Shapes whose ``attribute`` value (colour, shape or name) no other shape shares."""
    counts = Counter(getattr(s, attribute) for s in scene)
    return [s for s in scene if counts[getattr(s, attribute)] == 1]


def _colour_question(scene: Scene, rng: np.random.Generator) -> Question | None:
    """"what colour is the circle?" about a shape kind that occurs once."""
    candidates = _unique(scene, "shape")
    if not candidates:
        return None
    target = _pick(rng, candidates)
    return Question(QUESTION_TEMPLATES["colour"].format(shape=target.shape), target.colour, "colour")


def _shape_question(scene: Scene, rng: np.random.Generator) -> Question | None:
    """"what shape is the red object?" about a colour that occurs once."""
    candidates = _unique(scene, "colour")
    if not candidates:
        return None
    target = _pick(rng, candidates)
    return Question(QUESTION_TEMPLATES["shape"].format(colour=target.colour), target.shape, "shape")


def _count_question(scene: Scene, rng: np.random.Generator) -> Question:
    """"how many shapes are there?" or "how many triangles are there?" (the kind may be absent)."""
    if rng.random() < 0.5:
        return Question(QUESTION_TEMPLATES["count"], str(len(scene)), "count")
    kind = _pick(rng, SHAPES)
    count = sum(s.shape == kind for s in scene)
    return Question(QUESTION_TEMPLATES["count_shape"].format(shape=kind), str(count), "count")


def _position_question(scene: Scene, rng: np.random.Generator) -> Question | None:
    """"is the red circle left of the blue square?" about two uniquely named shapes."""
    candidates = _unique(scene, "name")
    if len(candidates) < 2:
        return None
    first, second = rng.choice(len(candidates), 2, replace=False)
    a, b = candidates[int(first)], candidates[int(second)]
    relation = _pick(rng, ("left", "right"))
    holds = (a.x < b.x) == (relation == "left")
    text = QUESTION_TEMPLATES["position"].format(a=a.name, relation=relation, b=b.name)
    return Question(text, "yes" if holds else "no", "position")


def questions_for(scene: Scene, rng: np.random.Generator) -> list[Question]:
    """At most one question of each type, only where the answer is unambiguous."""
    makers = (_colour_question, _shape_question, _count_question, _position_question)
    return [q for make in makers if (q := make(scene, rng)) is not None]


def human_answers(answer: str, question_type: str, rng: np.random.Generator) -> list[str]:
    """Ten "human" answers: the true one, with 0–2 replaced by a synonym or a wrong answer."""
    answers = [answer] * NUM_HUMANS
    noisy = rng.choice(NUM_HUMANS, int(rng.integers(0, 3)), replace=False)
    wrong = [a for a in ANSWERS[question_type] if a != answer]
    for slot in noisy:
        use_synonym = answer in SYNONYMS and rng.random() < 0.5
        answers[int(slot)] = SYNONYMS[answer] if use_synonym else _pick(rng, wrong)
    return answers


# --------------------------------------------------------------------------------------- writing


def _jpeg(image: Image.Image) -> bytes:
    """JPEG bytes, full chroma resolution so colours stay crisp at 64 px."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, subsampling=0)
    return buffer.getvalue()


def _json(obj: dict[str, Any]) -> bytes:
    """UTF-8 JSON with sorted keys (byte-identical across runs)."""
    return json.dumps(obj, sort_keys=True).encode("utf-8")


def vqa_text(question: str, answer: str) -> str:
    """The training text of a VQA sample: prompt followed by `` {answer}``."""
    return f"{VQA_PROMPT.format(question=question)} {answer}"


@dataclass
class _SplitStats:
    """What one split's writer saw; becomes a block of ``summary.json``."""

    images: int = 0
    questions: int = 0
    question_types: Counter = field(default_factory=Counter)
    answers: Counter = field(default_factory=Counter)
    shapes_per_image: Counter = field(default_factory=Counter)


def _write_image(idx: int, split: str, seed: int, shards: tuple[ShardWriter, ShardWriter], stats: _SplitStats,
                 texts: set[str]) -> None:
    """Render image ``idx`` of ``split`` and write its caption sample and its VQA samples."""
    rng = image_rng(seed, split, idx)
    image, scene = render_scene(rng)
    jpg, image_id = _jpeg(image), f"{split}-{idx:09d}"
    captions = captions_for(scene)
    caption_meta = {"caption": captions[0], "captions": captions, "image_id": image_id}
    shards[0].write({"__key__": f"{idx:09d}", "jpg": jpg, "txt": captions[0].encode(), "json": _json(caption_meta)})
    texts.update(captions)
    for q in questions_for(scene, rng):
        qid = stats.questions
        answers = human_answers(q.answer, q.question_type, rng)
        meta = {"question": q.question, "answers": answers, "question_id": f"{split}-{qid:09d}",
                "image_id": image_id, "question_type": q.question_type, "caption": captions[0]}
        shards[1].write({"__key__": f"{qid:09d}", "jpg": jpg, "json": _json(meta)})
        texts.update(vqa_text(q.question, a) for a in set(answers))
        stats.questions += 1
        stats.question_types[q.question_type] += 1
        stats.answers[q.answer] += 1
    stats.images += 1
    stats.shapes_per_image[str(len(scene))] += 1


def _write_split(out: Path, split: str, count: int, seed: int, shard_size: int, texts: set[str],
                 advance: Callable[[], None]) -> dict[str, Any]:
    """Write both shard kinds of one split; returns its ``summary.json`` block."""
    directory = out / split
    directory.mkdir(parents=True, exist_ok=True)
    shards = (ShardWriter(directory, shard_size, "captions-"), ShardWriter(directory, shard_size, "vqa-"))
    stats = _SplitStats()
    try:
        for idx in range(count):
            _write_image(idx, split, seed, shards, stats, texts)
            advance()
    finally:
        for writer in shards:
            writer.close()
    return {
        "images": stats.images, "captions": shards[0].count, "questions": stats.questions,
        "shards": {"captions": shards[0].shards, "vqa": shards[1].shards},
        "urls": {"captions": shards[0].url(), "vqa": shards[1].url()},
        "question_types": dict(sorted(stats.question_types.items())),
        "answers": dict(stats.answers.most_common()),
        "shapes_per_image": dict(sorted(stats.shapes_per_image.items())),
    }


def coverage_texts() -> list[str]:
    """Every word the generator can emit (templates, colours, shapes, answers, synonyms)."""
    templates = [VQA_PROMPT, CAPTION_PROMPT, *QUESTION_TEMPLATES.values(), *CAPTION_TEMPLATES]
    words = [*COLOURS, *SHAPES, *(f"{s}s" for s in SHAPES), *NUMBER_WORDS.values(),
             *(a for answers in ANSWERS.values() for a in answers), *SYNONYMS.values(), "a", "and", ","]
    return [re.sub(r"\{\w+\}\w*", " ", t) for t in templates] + [" ".join(words)]


def split_shard_size(split: str, images: int, shard_size: int) -> int:
    """Samples per shard: ``shard_size``, but validation images spread over at least ``VAL_SHARDS`` shards so
    that up to that many evaluation ranks each get one (evaluation splits shards across ranks)."""
    return shard_size if split == "train" else max(1, min(shard_size, -(-images // VAL_SHARDS)))


def write_shapes(out: str | Path, train: int, val: int, seed: int = 0, shard_size: int = 1000,
                 progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Write the shapes data set (shards, tokenizer, summary) under ``out``; returns the summary.

    Layout: ``out/{train,val}/captions-{i:05d}.tar`` (one sample per image: ``jpg``, ``txt``,
    ``json`` with ``caption``, ``captions``, ``image_id``), ``out/{train,val}/vqa-{i:05d}.tar``
    (one sample per question: ``jpg``, ``json`` with ``question``, ``answers`` (10),
    ``question_id``, ``image_id``, ``question_type``), ``out/tokenizer/`` (word-level, loads with
    ``mmlm.tokenizers.load_tokenizer``) and ``out/summary.json``. Byte-identical for a seed. Validation
    images go ``ceil(val / 8)`` to a shard (at most ``shard_size``), so up to 8 evaluation ranks work.
    ``out`` must be empty unless ``overwrite`` (:func:`datamodules.formats.outputs.prepare_output`: an earlier run's files,
    as listed in its ``summary.json``, are replaced; nothing else is touched).

    Raises:
        ValueError: a count is negative or ``shard_size`` < 1.
        OutputExistsError: ``out`` holds files (see above).
    """
    if train < 0 or val < 0 or shard_size < 1:
        raise ValueError(f"write_shapes: need train, val >= 0 and shard_size >= 1, got {train}, {val}, {shard_size}")
    out = prepare_output(out, overwrite)
    texts: set[str] = set()
    with Progress(disable=not progress) as bar:
        advance = partial(bar.advance, bar.add_task("writing shapes", total=train + val))
        splits = {split: _write_split(out, split, n, seed, split_shard_size(split, n, shard_size), texts, advance)
                  for split, n in zip(SPLITS, (train, val))}
    tokenizer = train_word_tokenizer(sorted(texts) + coverage_texts(), out / "tokenizer")
    summary = {"seed": seed, "image_size": IMAGE_SIZE, "shard_size": shard_size,
               "images": {split: block["images"] for split, block in splits.items()},
               "questions": {split: block["questions"] for split, block in splits.items()}, "splits": splits,
               "tokenizer": str(out / "tokenizer"), "vocab_size": len(tokenizer),
               "prompts": {"vqa": VQA_PROMPT, "caption": CAPTION_PROMPT}}
    return write_summary(out, summary)

