"""Generators that write synthetic webdataset shards (for tests, tiny recipes and the quickstart)."""

from datamodules.synthetic.documents import Line, Style
from datamodules.synthetic.shapes import (
    Question,
    Scene,
    Shape,
    captions_for,
    draw_scene,
    human_answers,
    image_rng,
    questions_for,
    render_scene,
    write_shapes,
)
from datamodules.synthetic.tabletop import Block, TabletopSample

__all__ = [
    "Block",
    "Line",
    "Style",
    "TabletopSample",
    "Question",
    "Scene",
    "Shape",
    "captions_for",
    "draw_scene",
    "human_answers",
    "image_rng",
    "questions_for",
    "render_scene",
    "write_shapes",
]
