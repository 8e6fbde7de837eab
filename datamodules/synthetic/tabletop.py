"""Synthetic embodied data for PaLM-E: a tabletop of coloured blocks, its state, questions and plans.

A scene is 3–4 blocks of distinct colours in 4 table columns, stacked up to 3 high, drawn from the
side at 64×64. Each sample is a *multimodal sentence* whose named markers (``<img1>``, ``<img2>``,
``<state>``, ``<obj>``) the model fills with image tokens, state tokens and object tokens:

- ``vqa``: a question about one scene ("what colour is the block on the red block?", "is the red
  block on the blue block?", "how many blocks are on the table?", "what colour is the block left
  of the red block?"), the answer in one word;
- ``vqa`` (``question_type`` ``moved``): two scenes before/after one move, "which block moved
  between <img1> and <img2>?";
- ``plan``: "stack red on blue." → "1. pick green block 2. place on table 3. pick red block 4.
  place on blue block" (clear the block, clear the target, then move it).

Every answer and plan depends on the scene, so only a model that reads the image or the state can
beat the text-only prior. Ground truth travels with each sample: the blocks, the scene state
vector (``state``, :data:`STATE_DIM` floats) and one vector per block (``objects``,
:data:`OBJECT_DIM` floats each). Each sample has its own random stream ``(seed, split, index)``.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
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
BACKGROUND = (225, 230, 235)
TABLE = (140, 100, 60)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 80, 230),
    "yellow": (245, 200, 20), "purple": (140, 50, 190), "orange": (245, 130, 20),
}
COLUMNS = 4
MAX_HEIGHT = 3
BLOCK = 12  # pixels per block side
TABLE_TOP = 56  # y of the table surface
SPLITS = ("train", "val")
TASKS = ("vqa", "moved", "plan")
#: Reference answers per question: VQAv2 has ten annotators per question.
HUMAN_ANSWERS = 10
TASK_WEIGHTS = (0.5, 0.15, 0.35)
NOTHING = "nothing"
OBJECT_DIM = 2 + len(COLOURS)  # column, level, colour one-hot
STATE_DIM = 3 * len(COLOURS)  # per colour: present, column, level
PROMPTS = {
    "vqa": ("<img1> State: <state> Q: {question} A:", "Q: {question} Image: <img1> Objects: <obj> A:"),
    "moved": ("Q: {question} State: <state> A:",),
    "plan": ("Image: <img1> State: <state> Task: {goal} Plan:", "Objects: <obj> Image: <img1> Task: {goal} Plan:"),
}
QUESTIONS = {
    "on": "what colour is the block on the {c} block?",
    "under": "what colour is the block under the {c} block?",
    "is_on": "is the {a} block on the {b} block?",
    "count": "how many blocks are on the table?",
    "left": "what colour is the block left of the {c} block?",
    "moved": "which block moved between <img1> and <img2>?",
}
GOAL = "stack {a} on {b}."
VAL_SHARDS = 8


@dataclass(frozen=True)
class Block:
    """One block: its colour, table ``column`` (0 = leftmost) and ``level`` (0 = on the table)."""

    colour: str
    column: int
    level: int


Scene = tuple[Block, ...]  # ordered by colour (COLOURS order)


# ---------------------------------------------------------------------------------------- scenes


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of sample ``index`` of ``split`` (independent of every other sample)."""
    return np.random.default_rng([seed, SPLITS.index(split), index, 7])


def sample_scene(rng: np.random.Generator) -> Scene:
    """3–4 blocks of distinct colours dropped one by one on random columns with room (≤ 3 high)."""
    count = int(rng.integers(3, 5))
    colours = [list(COLOURS)[i] for i in rng.choice(len(COLOURS), count, replace=False)]
    heights = [0] * COLUMNS
    # 2–3 columns in use: stacks (and plans that must clear a block) are common, and a column stays free
    columns = [int(c) for c in rng.choice(COLUMNS, int(rng.integers(2, COLUMNS)), replace=False)]
    blocks = []
    for colour in colours:
        free = [c for c in columns if heights[c] < MAX_HEIGHT]
        column = free[int(rng.integers(len(free)))]
        blocks.append(Block(colour, column, heights[column]))
        heights[column] += 1
    return canonical(blocks)


def canonical(blocks: list[Block] | Scene) -> Scene:
    """Blocks in COLOURS order (one canonical tuple per scene)."""
    order = list(COLOURS)
    return tuple(sorted(blocks, key=lambda b: order.index(b.colour)))


def draw_scene(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Side view: a table strip at the bottom and one square per block, columns 16 px apart."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, TABLE_TOP, size, size), fill=TABLE)
    pitch = size // COLUMNS
    for b in scene:
        left = b.column * pitch + (pitch - BLOCK) // 2
        bottom = TABLE_TOP - 1 - b.level * BLOCK
        draw.rectangle((left, bottom - BLOCK + 1, left + BLOCK - 1, bottom), fill=COLOURS[b.colour],
                       outline=(40, 40, 40))
    return image


def find(scene: Scene, colour: str) -> Block:
    """The block of ``colour`` (``KeyError`` when absent)."""
    for b in scene:
        if b.colour == colour:
            return b
    raise KeyError(colour)


def at(scene: Scene, column: int, level: int) -> Block | None:
    """The block at ``(column, level)`` or ``None``."""
    return next((b for b in scene if b.column == column and b.level == level), None)


# ------------------------------------------------------------------------------------ state vectors


def object_vector(block: Block) -> list[float]:
    """``[column / 3, level / 2, one-hot colour]``: :data:`OBJECT_DIM` floats."""
    onehot = [float(c == block.colour) for c in COLOURS]
    return [block.column / (COLUMNS - 1), block.level / (MAX_HEIGHT - 1), *onehot]


def state_vector(scene: Scene) -> list[float]:
    """Per colour in COLOURS order ``[present, column / 3, level / 2]`` (zeros when absent): :data:`STATE_DIM`."""
    out: list[float] = []
    for colour in COLOURS:
        block = next((b for b in scene if b.colour == colour), None)
        out += [0.0, 0.0, 0.0] if block is None else [1.0, *object_vector(block)[:2]]
    return out


# ---------------------------------------------------------------------------------------- questions


def _on_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """"what colour is the block on the red block?" → a colour or "nothing"."""
    b = scene[int(rng.integers(len(scene)))]
    above = at(scene, b.column, b.level + 1)
    return QUESTIONS["on"].format(c=b.colour), above.colour if above else NOTHING


def _under_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """"what colour is the block under the red block?" → a colour or "table"."""
    b = scene[int(rng.integers(len(scene)))]
    below = at(scene, b.column, b.level - 1)
    return QUESTIONS["under"].format(c=b.colour), below.colour if below else "table"


def _is_on_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """"is the red block on the blue block?" → yes/no, asked about a true pair half of the time when one exists."""
    pairs = [(a, b) for a in scene for b in scene if a.column == b.column and a.level == b.level + 1]
    if pairs and rng.random() < 0.5:
        a, b = pairs[int(rng.integers(len(pairs)))]
    else:
        i, j = rng.choice(len(scene), 2, replace=False)
        a, b = scene[int(i)], scene[int(j)]
    holds = a.column == b.column and a.level == b.level + 1
    return QUESTIONS["is_on"].format(a=a.colour, b=b.colour), "yes" if holds else "no"


def _count_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """"how many blocks are on the table?" → the number of stacks."""
    return QUESTIONS["count"], str(sum(b.level == 0 for b in scene))


def _left_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """"what colour is the block left of the red block?" about a block on the table → the nearest block on the
    table to its left, or "nothing"."""
    bottoms = [b for b in scene if b.level == 0]
    b = bottoms[int(rng.integers(len(bottoms)))]
    left = [x for x in bottoms if x.column < b.column]
    return QUESTIONS["left"].format(c=b.colour), max(left, key=lambda x: x.column).colour if left else NOTHING


QUESTION_MAKERS: dict[str, Callable[[Scene, np.random.Generator], tuple[str, str]]] = {
    "on": _on_question, "under": _under_question, "is_on": _is_on_question, "count": _count_question,
    "left": _left_question,
}


# -------------------------------------------------------------------------------------------- plans


def move(scene: Scene, colour: str, column: int | None, onto: str | None) -> Scene:
    """The scene after moving the (clear) block ``colour`` onto block ``onto`` or to the free ``column``."""
    if onto is not None:
        target = find(scene, onto)
        column, level = target.column, target.level + 1
    else:
        level = 0
    moved = Block(colour, int(column), level)
    return canonical([moved if b.colour == colour else b for b in scene])


def _free_column(scene: Scene) -> int | None:
    """The leftmost empty column, or ``None``."""
    used = {b.column for b in scene}
    return next((c for c in range(COLUMNS) if c not in used), None)


def _clear(scene: Scene, colour: str, steps: list[str]) -> Scene:
    """Move every block above ``colour`` to the table (top first), appending the steps."""
    block = find(scene, colour)
    above = sorted((b for b in scene if b.column == block.column and b.level > block.level), key=lambda b: -b.level)
    for b in above:
        column = _free_column(scene)
        if column is None:  # a 4-block scene fills at most 3 columns when stacked; kept for safety
            raise ValueError(f"no free column to unstack {b.colour} in {scene}")
        steps += [f"pick {b.colour} block", "place on table"]
        scene = move(scene, b.colour, column, None)
    return scene


def plan(scene: Scene, a: str, b: str) -> tuple[list[str], Scene]:
    """Steps that stack ``a`` on ``b`` (clear ``a``, clear ``b``, move ``a``) and the final scene."""
    steps: list[str] = []
    scene = _clear(scene, a, steps)
    scene = _clear(scene, b, steps)
    steps += [f"pick {a} block", f"place on {b} block"]
    return steps, move(scene, a, None, b)


def format_plan(steps: list[str]) -> str:
    """``"1. pick red block 2. place on blue block"``."""
    return " ".join(f"{i}. {step}" for i, step in enumerate(steps, 1))


def random_move(scene: Scene, rng: np.random.Generator) -> tuple[Scene, str]:
    """One random legal move: a clear block onto another clear block (below :data:`MAX_HEIGHT`) or to a free
    column → (new scene, colour)."""
    clear = [b for b in scene if at(scene, b.column, b.level + 1) is None]
    block = clear[int(rng.integers(len(clear)))]
    free = _free_column(scene)
    targets = [b.colour for b in clear if b.colour != block.colour and b.level < MAX_HEIGHT - 1] + ([None] if free is not None else [])
    onto = targets[int(rng.integers(len(targets)))]
    return move(scene, block.colour, free, onto), block.colour


def _goal(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """Two colours ``(a, b)`` with ``a`` not already on ``b``."""
    while True:
        i, j = rng.choice(len(scene), 2, replace=False)
        a, b = scene[int(i)], scene[int(j)]
        if not (a.column == b.column and a.level == b.level + 1):
            return a.colour, b.colour


# ------------------------------------------------------------------------------------------ samples


@dataclass
class TabletopSample:
    """One multimodal sentence with its ground truth (becomes a shard sample)."""

    task: str
    prompt: str
    target: str
    question_type: str
    scenes: list[Scene]
    question: str = ""


def _fill(template: str, **fields: str) -> str:
    return template.format(**fields)


def make_sample(rng: np.random.Generator) -> TabletopSample:
    """Draw a scene and one task about it (see the module docstring)."""
    task = TASKS[int(rng.choice(len(TASKS), p=TASK_WEIGHTS))]
    scene = sample_scene(rng)
    if task == "plan":
        a, b = _goal(scene, rng)
        steps, _ = plan(scene, a, b)
        template = PROMPTS["plan"][int(rng.integers(len(PROMPTS["plan"])))]
        kind = "clear" if len(steps) > 2 else "direct"
        return TabletopSample("plan", _fill(template, goal=GOAL.format(a=a, b=b)), format_plan(steps), kind, [scene])
    if task == "moved":
        after, colour = random_move(scene, rng)
        question = QUESTIONS["moved"]
        return TabletopSample("vqa", _fill(PROMPTS["moved"][0], question=question), colour, "moved", [scene, after], question)
    qtype = list(QUESTION_MAKERS)[int(rng.integers(len(QUESTION_MAKERS)))]
    question, answer = QUESTION_MAKERS[qtype](scene, rng)
    template = PROMPTS["vqa"][int(rng.integers(len(PROMPTS["vqa"])))]
    return TabletopSample("vqa", _fill(template, question=question), answer, qtype, [scene], question)


def _png(image: Image.Image) -> bytes:
    """Lossless PNG bytes (flat colours compress well)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def answers_of(sample: TabletopSample) -> list[str]:
    """The reference answers: a question's answer ten times, as ten agreeing VQAv2 annotators (the official scorer's
    leave-one-out gives a question with one answer 0 whatever is predicted); a plan's one plan."""
    return [sample.target] * (HUMAN_ANSWERS if sample.task == "vqa" else 1)


def shard_sample(sample: TabletopSample, split: str, index: int) -> dict[str, Any]:
    """The shard members of ``sample``: ``img1.png`` (and ``img2.png``) and ``json`` (text and ground truth)."""
    first = sample.scenes[0]
    meta = {
        "task": sample.task, "prompt": sample.prompt, "target": sample.target, "answers": answers_of(sample),
        "question": sample.question, "question_type": sample.question_type, "id": f"{split}-{index:09d}",
        "blocks": [[b.colour, b.column, b.level] for b in first],
        "state": state_vector(first), "objects": [object_vector(b) for b in first],
    }
    members = {"__key__": f"{index:09d}", "json": json.dumps(meta, sort_keys=True).encode()}
    for i, scene in enumerate(sample.scenes, 1):
        members[f"img{i}.png"] = _png(draw_scene(scene))
    return members


# ------------------------------------------------------------------------------------------ writing


def coverage_texts() -> list[str]:
    """Every word the generator can emit (templates, colours, answers, plan words)."""
    templates = [t for group in PROMPTS.values() for t in group] + list(QUESTIONS.values()) + [GOAL]
    words = [*COLOURS, NOTHING, "table", "yes", "no", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10",
             "pick", "place", "on", "block", "."]
    return [re.sub(r"\{\w+\}|<\w+>", " ", t) for t in templates] + [" ".join(words)]


def _write_split(out: Path, split: str, count: int, seed: int, shard_size: int,
                 advance: Callable[[], None]) -> dict[str, Any]:
    """Write one split's shards; returns its ``summary.json`` block."""
    directory = out / split
    directory.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(directory, shard_size, "tabletop-")
    kinds: Counter = Counter()
    answers: Counter = Counter()
    try:
        for idx in range(count):
            sample = make_sample(sample_rng(seed, split, idx))
            writer.write(shard_sample(sample, split, idx))
            kinds[f"{sample.task}/{sample.question_type}"] += 1
            answers[sample.target if sample.task == "vqa" else "plan"] += 1
            advance()
    finally:
        writer.close()
    return {"samples": writer.count, "shards": writer.shards, "urls": writer.url(),
            "kinds": dict(sorted(kinds.items())), "answers": dict(answers.most_common())}


def write_tabletop(out: str | Path, train: int, val: int, seed: int = 0,
                   shard_size: int = 1000, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Write the tabletop data set under ``out``; returns the summary (also ``out/summary.json``).

    Layout: ``out/{train,val}/tabletop-{i:05d}.tar`` (one sample per sentence: ``img1.png``, ``img2.png``
    for before/after samples, ``json`` with ``task``, ``prompt`` (with markers), ``target``, ``answers``,
    ``question``, ``question_type``, ``id``, ``blocks``, ``state``, ``objects``), ``out/tokenizer/``
    (word-level) and ``out/summary.json``. Byte-identical for a seed; validation spread over ≥ 8 shards. ``out`` must
    be empty unless ``overwrite`` (:func:`datamodules.formats.outputs.prepare_output`).

    Raises:
        ValueError: a count is negative or ``shard_size`` < 1.
        OutputExistsError: ``out`` holds files (see above).
    """
    if train < 0 or val < 0 or shard_size < 1:
        raise ValueError(f"write_tabletop: need train, val >= 0 and shard_size >= 1, got {train}, {val}, {shard_size}")
    out = prepare_output(out, overwrite)
    with Progress(disable=not progress) as bar:
        advance = partial(bar.advance, bar.add_task("writing tabletop", total=train + val))
        splits = {split: _write_split(out, split, n, seed, _shard_size(split, n, shard_size), advance)
                  for split, n in zip(SPLITS, (train, val))}
    tokenizer = train_word_tokenizer(coverage_texts(), out / "tokenizer")
    summary = {"seed": seed, "image_size": IMAGE_SIZE, "state_dim": STATE_DIM, "object_dim": OBJECT_DIM,
               "splits": splits, "tokenizer": str(out / "tokenizer"), "vocab_size": len(tokenizer)}
    return write_summary(out, summary)


def _shard_size(split: str, count: int, shard_size: int) -> int:
    """``shard_size``, but validation spread over at least :data:`VAL_SHARDS` shards (one per evaluation rank)."""
    return shard_size if split == "train" else max(1, min(shard_size, -(-count // VAL_SHARDS)))
