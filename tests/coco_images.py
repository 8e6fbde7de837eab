"""Test helper: non-square random JPEGs named as COCO val2014 images (``COCO_val2014_{id:012d}.jpg``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

#: (width, height) of the images: non-square, so resizing and cropping differ.
SIZES = [(50, 30), (30, 70), (64, 40), (45, 45), (90, 33), (20, 60)]


def write_coco_val_images(folder: Path, sizes: list[tuple[int, int]] = SIZES, seed: int = 0) -> list[int]:
    """Write one random JPEG (quality 90) per size into ``folder`` (created); returns their COCO image ids."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = [391895 + 7 * i for i in range(len(sizes))]
    for image_id, (width, height) in zip(ids, sizes):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"COCO_val2014_{image_id:012d}.jpg", quality=90)
    return ids
