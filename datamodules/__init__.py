"""Shard pipelines that turn webdataset shards into typed :class:`mmlm.batch.Batch` objects."""

from datamodules.base import SkipCounter, SkipSample, WebDataModule
from datamodules.collate import Example, collate_examples
from datamodules.image_text import CaptionsDataModule, ImageTextDataModule, Source, VQADataModule

__all__ = [
    "CaptionsDataModule",
    "Example",
    "ImageTextDataModule",
    "SkipCounter",
    "SkipSample",
    "Source",
    "VQADataModule",
    "WebDataModule",
    "collate_examples",
]
