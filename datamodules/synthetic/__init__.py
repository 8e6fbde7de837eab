"""Generators that write synthetic webdataset shards (for tests, tiny recipes and the quickstart). Every name is
imported from its module on first use (:mod:`mmlm.lazy`)."""

from __future__ import annotations

from mmlm.lazy import lazy_exports

#: Exported name → the module that defines it.
_EXPORTS: dict[str, str] = {
    "Block": "datamodules.synthetic.tabletop",
    "captions_for": "datamodules.synthetic.shapes",
    "draw_scene": "datamodules.synthetic.shapes",
    "human_answers": "datamodules.synthetic.shapes",
    "image_rng": "datamodules.synthetic.shapes",
    "Line": "datamodules.synthetic.documents",
    "Question": "datamodules.synthetic.shapes",
    "questions_for": "datamodules.synthetic.shapes",
    "render_scene": "datamodules.synthetic.shapes",
    "Scene": "datamodules.synthetic.shapes",
    "Shape": "datamodules.synthetic.shapes",
    "Style": "datamodules.synthetic.documents",
    "TabletopSample": "datamodules.synthetic.tabletop",
    "write_shapes": "datamodules.synthetic.shapes",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
