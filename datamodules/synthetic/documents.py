"""Synthetic documents with known ground truth (Donut): SynthDoG-style pages and CORD-like receipts.

``docs``: a sheet of paper (light random colour) with 1–N lines of words in one of the system's
TrueType fonts (or Pillow's built-in one) at several sizes, mildly rotated, on a textured
background, with pixel noise; ground truth ``{"gt_parse": {"text_sequence": "<the lines joined by
spaces>"}}`` (the reading task). ``receipts``: menu lines ``"{cnt} {nm}"`` with the price right-
aligned, then ``SUBTOTAL``, ``TAX`` and ``TOTAL``; ground truth in a CORD-like schema::

    {"menu": [{"nm": "COFFEE", "cnt": "2", "price": "7.00"}, …],
     "sub_total": {"subtotal_price": "9.50", "tax_price": "0.95"}, "total": {"total_price": "10.45"}}

(``price`` = ``cnt`` × unit price, ``subtotal_price`` = Σ ``price``, ``tax_price`` = 10 % rounded to
the cent, ``total_price`` = subtotal + tax; all computed in integer cents.)

Every line is laid out to fit inside the paper, so the ground truth is exactly what was drawn.
Every document has its own random stream ``(seed, kind, split, index)``: deterministic for a seed
and independent of how many documents are written.
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from datamodules.formats.donut_folder import LAYOUTS
from datamodules.formats.outputs import prepare_output, write_summary
from datamodules.tools.documents import DonutWriter
from mmlm.json_tokens import json_to_tokens
from mmlm.piece_tokenizer import train_piece_tokenizer

KINDS = ("docs", "receipts")
SPLITS = ("train", "validation")
FONT_SIZES = (9, 10, 11, 12)
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts")
MAX_ANGLE = 2.5  # degrees of page rotation
PAPER_FRACTION = (0.8, 0.94)  # paper side / image side
MARGIN = 3  # pixels between the paper edge and text
TAX_RATE_PERCENT = 10
TOKENIZER_VOCAB = 400
WORDS = tuple("""
the of and to in is was for on as with by at from his an were are which this be has had one not but
first new after also two their who its they have more her been other into all time than some city year
can when state part three most these over may about up between under world used such called world over
only during people where work early known name high water number later since long small house river
line book paper page form note data order total price date table model light day week month office
""".split())
MENU = (("COFFEE", 350), ("TEA", 250), ("BAGEL", 300), ("MUFFIN", 275), ("JUICE", 400), ("SALAD", 850),
        ("SOUP", 600), ("BURGER", 990), ("FRIES", 320), ("WATER", 150), ("CAKE", 450), ("PASTA", 1100),
        ("PIZZA", 1250), ("TOAST", 220), ("COLA", 200), ("NOODLE", 780))


@dataclass(frozen=True)
class Style:
    """How a document looks: font file (``None``: Pillow's default font), size and colours."""

    font: str | None
    size: int
    paper: tuple[int, int, int]
    ink: tuple[int, int, int]
    background: tuple[int, int, int]
    angle: float
    noise: float


@dataclass(frozen=True)
class Line:
    """A line of text at ``(x, y)`` on the paper; ``right`` is right-aligned text on the same line."""

    text: str
    x: int
    y: int
    right: str = ""


@functools.cache
def system_fonts() -> tuple[str, ...]:
    """TrueType fonts found on this machine that render Latin text (sorted paths; may be empty)."""
    found = [p for d in FONT_DIRS if Path(d).is_dir() for p in Path(d).rglob("*.ttf")]
    usable = [str(p) for p in found if not any(bad in p.name for bad in ("Math", "Symbol", "Emoji", "ExtraLight"))]
    return tuple(sorted(usable))


@functools.cache
def load_font(path: str | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A font at ``size`` pixels (Pillow's built-in one when ``path`` is ``None``)."""
    return ImageFont.load_default(size=size) if path is None else ImageFont.truetype(path, size)


def document_rng(seed: int, kind: str, split: str, index: int) -> np.random.Generator:
    """The random stream of one document."""
    return np.random.default_rng([seed, KINDS.index(kind), SPLITS.index(split), index])


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def sample_style(rng: np.random.Generator, sizes: Sequence[int] = FONT_SIZES) -> Style:
    """Random font, size, paper/ink/background colours, rotation and noise level."""
    paper = tuple(int(v) for v in rng.integers(225, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    background = tuple(int(v) for v in rng.integers(40, 200, 3))
    return Style(font=_pick(rng, (None, *system_fonts())), size=int(_pick(rng, sizes)), paper=paper, ink=ink,
                 background=background, angle=float(rng.uniform(-MAX_ANGLE, MAX_ANGLE)), noise=float(rng.uniform(0, 6)))


def text_width(font: Any, text: str) -> int:
    """Rendered width of ``text`` in pixels."""
    return int(np.ceil(font.getlength(text)))


def line_height(font: Any) -> int:
    """Pixels from one baseline to the next (the font's full ascent + descent, plus 1)."""
    ascent, descent = font.getmetrics()
    return ascent + descent + 1


def rotated_size(size: tuple[int, int], degrees: float = MAX_ANGLE) -> tuple[int, int]:
    """Bounding box ``(w, h)`` of a ``size`` rectangle rotated by ``degrees`` (rounded up, + 1 for resampling)."""
    cos, sin = abs(np.cos(np.radians(degrees))), abs(np.sin(np.radians(degrees)))
    w, h = size
    return int(np.ceil(w * cos + h * sin)) + 1, int(np.ceil(h * cos + w * sin)) + 1


def paper_size(rng: np.random.Generator, width: int, height: int) -> tuple[int, int]:
    """A random paper size that stays inside the image after a rotation of up to ``MAX_ANGLE``."""
    fw, fh = rng.uniform(*PAPER_FRACTION, 2)
    size = int(width * fw), int(height * fh)
    while (grown := rotated_size(size)) and (grown[0] > width or grown[1] > height):
        size = int(size[0] * 0.97), int(size[1] * 0.97)
    return size


def layout_words(rng: np.random.Generator, font: Any, paper: tuple[int, int], max_lines: int) -> list[Line]:
    """1–``max_lines`` left-aligned lines of random words, each fitting the paper width."""
    room = paper[0] - 2 * MARGIN
    step = line_height(font)
    count = min(max_lines, (paper[1] - 2 * MARGIN) // step)
    lines = []
    for row in range(int(rng.integers(1, count + 1)) if count > 0 else 0):
        words: list[str] = []
        for _ in range(int(rng.integers(1, 6))):
            word = _pick(rng, WORDS)
            if text_width(font, " ".join([*words, word])) > room:
                break
            words.append(word)
        if words:
            lines.append(Line(" ".join(words), MARGIN, MARGIN + row * step))
    return lines


def draw_paper(style: Style, size: tuple[int, int], lines: Sequence[Line]) -> Image.Image:
    """The paper (RGBA, opaque) with its lines drawn; right-hand texts end at the right margin."""
    font = load_font(style.font, style.size)
    paper = Image.new("RGBA", size, (*style.paper, 255))
    draw = ImageDraw.Draw(paper)
    for line in lines:
        draw.text((line.x, line.y), line.text, fill=style.ink, font=font)
        if line.right:
            draw.text((size[0] - MARGIN - text_width(font, line.right), line.y), line.right, fill=style.ink, font=font)
    return paper


def background(rng: np.random.Generator, style: Style, width: int, height: int) -> Image.Image:
    """A smooth random texture around the background colour."""
    coarse = rng.normal(0, 25, (4, 4, 3)) + np.array(style.background)
    image = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8), "RGB")
    return image.resize((width, height), Image.Resampling.BICUBIC)


def compose(rng: np.random.Generator, style: Style, paper: Image.Image, width: int, height: int) -> Image.Image:
    """Rotate the paper, paste it at a random position on the background, add pixel noise."""
    rotated = paper.rotate(style.angle, resample=Image.Resampling.BILINEAR, expand=True)
    slack_x, slack_y = max(0, width - rotated.width), max(0, height - rotated.height)
    offset = (int(rng.integers(0, slack_x + 1)), int(rng.integers(0, slack_y + 1)))
    image = background(rng, style, width, height)
    image.paste(rotated, offset, rotated)
    pixels = np.asarray(image, dtype=np.float32) + style.noise * rng.standard_normal((height, width, 3), np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


def render_document(rng: np.random.Generator, width: int, height: int,
                    max_lines: int = 4) -> tuple[Image.Image, dict[str, Any], list[Line]]:
    """One SynthDoG-style page: ``(image, gt_parse, lines)``; ``gt_parse = {"text_sequence": …}``."""
    style = sample_style(rng)
    size = paper_size(rng, width, height)
    lines = layout_words(rng, load_font(style.font, style.size), size, max_lines)
    image = compose(rng, style, draw_paper(style, size, lines), width, height)
    return image, {"text_sequence": " ".join(line.text for line in lines)}, lines


def money(cents: int) -> str:
    """``1045`` → ``"10.45"``."""
    return f"{cents // 100}.{cents % 100:02d}"


def receipt_items(rng: np.random.Generator, items: int) -> list[tuple[str, int, int]]:
    """``items`` distinct menu items as ``(name, unit price in cents, count)``."""
    chosen = rng.choice(len(MENU), size=items, replace=False)
    return [(MENU[i][0], MENU[i][1], int(c)) for i, c in zip(chosen, rng.integers(1, 4, items))]


def receipt_parse(items: Sequence[tuple[str, int, int]]) -> dict[str, Any]:
    """The CORD-like ground truth of ``(name, unit cents, count)`` items (arithmetic in integer cents)."""
    menu = [{"nm": name, "cnt": str(count), "price": money(unit * count)} for name, unit, count in items]
    subtotal = sum(unit * count for _, unit, count in items)
    tax = (subtotal * TAX_RATE_PERCENT + 50) // 100
    return {"menu": menu, "sub_total": {"subtotal_price": money(subtotal), "tax_price": money(tax)},
            "total": {"total_price": money(subtotal + tax)}}


def receipt_lines(parse: dict[str, Any], step: int) -> list[Line]:
    """The drawn lines of a receipt: one per item, then subtotal, tax and total."""
    rows = [(f"{item['cnt']} {item['nm']}", item["price"]) for item in parse["menu"]]
    rows += [("SUBTOTAL", parse["sub_total"]["subtotal_price"]), ("TAX", parse["sub_total"]["tax_price"]),
             ("TOTAL", parse["total"]["total_price"])]
    return [Line(left, MARGIN, MARGIN + row * step, right) for row, (left, right) in enumerate(rows)]


def receipt_fits(font: Any, lines: Sequence[Line], paper: tuple[int, int]) -> bool:
    """Whether every line (left text, a gap, right text) fits inside the paper's margins."""
    bottom = lines[-1].y + line_height(font) + MARGIN
    widest = max(text_width(font, f"{line.text}  {line.right}") for line in lines)
    return bottom <= paper[1] and widest <= paper[0] - 2 * MARGIN


def render_receipt(rng: np.random.Generator, width: int, height: int,
                   max_items: int = 4) -> tuple[Image.Image, dict[str, Any], list[Line]]:
    """One receipt: ``(image, gt_parse, lines)``; fewer items and smaller fonts are tried until it fits.

    Raises:
        ValueError: not even one item fits at the smallest font size (the image is too small).
    """
    style = sample_style(rng, sizes=FONT_SIZES[:2])
    size = paper_size(rng, width, height)
    items = receipt_items(rng, int(rng.integers(1, max_items + 1)))
    for font_size in sorted({style.size, *FONT_SIZES[:2]}, reverse=True):
        font = load_font(style.font, font_size)
        for keep in range(len(items), 0, -1):
            parse = receipt_parse(items[:keep])
            lines = receipt_lines(parse, line_height(font))
            if receipt_fits(font, lines, size):
                style = Style(**{**style.__dict__, "size": font_size})
                return compose(rng, style, draw_paper(style, size, lines), width, height), parse, lines
    raise ValueError(f"a {width}×{height} image is too small for a one-item receipt")


RENDERERS = {"docs": render_document, "receipts": render_receipt}


def jpeg(image: Image.Image, quality: int = 92) -> bytes:
    """JPEG bytes (full chroma resolution, so thin strokes keep their colour)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def write_split(out: Path, kind: str, split: str, count: int, seed: int, size: tuple[int, int],
                shard_size: int, layouts: Sequence[str], progress: bool = True) -> tuple[dict[str, Any], list[str]]:
    """Render ``count`` documents of one split into ``out/shards/<split>`` and/or ``out/donut/<split>`` (a progress
    bar on stderr unless ``progress`` is false); returns the split's summary and its target sequences."""
    from rich.console import Console
    from rich.progress import track

    writer = DonutWriter(out / "shards" / split if "shards" in layouts else None,
                         out / "donut" / split if "folder" in layouts else None, shard_size, prefix=f"{kind}-")
    sequences = []
    for index in track(range(count), description=f"rendering {split} {kind}", disable=not progress,
                       console=Console(stderr=True)):
        image, parse, _ = RENDERERS[kind](document_rng(seed, kind, split, index), *size)
        writer.write(f"{kind}_{split}_{index:06d}.jpg", jpeg(image), {"gt_parse": parse})
        sequences.append(json_to_tokens(parse))
    return writer.close(), sequences


def write_documents(out: str | Path, kind: str = "docs", train: int = 2000, val: int = 200, seed: int = 0,
                    width: int = 128, height: int = 96, shard_size: int = 500,
                    layouts: Sequence[str] = LAYOUTS, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write synthetic ``docs`` or ``receipts`` for the train and validation splits (a progress bar per split on
    stderr unless ``progress`` is false); returns the summary.

    Layout: ``out/shards/{train,validation}/{kind}-{i:05d}.tar`` + ``special_tokens.json`` and/or the
    Donut folders ``out/donut/{train,validation}/`` (images + ``metadata.jsonl``), a small tokenizer
    ``out/tokenizer/`` (:func:`mmlm.piece_tokenizer.train_piece_tokenizer` on the texts; the JSON tags are
    added later as special tokens by the model's ``add_tokens``) and ``out/summary.json``. Byte-identical for a seed. Use one ``out`` per kind (the folders and
    ``special_tokens.json`` of a second kind would replace the first one's): ``out`` must be empty unless
    ``overwrite`` (:func:`datamodules.formats.outputs.prepare_output`).

    Raises:
        ValueError: unknown ``kind`` or layout, negative counts, or ``shard_size`` < 1.
    """
    if kind not in KINDS or not set(layouts) <= set(LAYOUTS) or min(train, val) < 0 or shard_size < 1:
        raise ValueError(f"write_documents: kind in {KINDS}, layouts in {LAYOUTS}, counts ≥ 0, shard_size ≥ 1; "
                         f"got {kind!r}, {layouts}, {train}, {val}, {shard_size}")
    out = prepare_output(out, overwrite)
    written = {split: write_split(out, kind, split, n, seed, (width, height), shard_size, layouts, progress)
               for split, n in zip(SPLITS, (train, val))}
    texts = [re.sub(r"<[^<>]+>", " ", t) for t in written["train"][1]] + [" ".join(WORDS), " ".join(m[0] for m in MENU),
                                                                          "0 1 2 3 4 5 6 7 8 9 . , : ; ? ! $ % - / ( )"]
    tokenizer = train_piece_tokenizer(texts, out / "tokenizer", vocab_size=TOKENIZER_VOCAB)
    summary = {"kind": kind, "seed": seed, "width": width, "height": height, "fonts": len(system_fonts()) + 1,
               "tokenizer": str(out / "tokenizer"), "vocab_size": len(tokenizer),
               "splits": {split: block for split, (block, _) in written.items()}}
    return write_summary(out, summary, indent=1)
