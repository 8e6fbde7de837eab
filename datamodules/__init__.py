"""Data pipelines that turn webdataset shards, or raw data sets read directly (:mod:`datamodules.raw`), into typed
:class:`mmlm.batch.Batch` objects."""

from datamodules.base import SkipCounter, SkipSample, WebDataModule
from datamodules.collate import Example, collate_examples
from datamodules.image_text import CaptionsDataModule, ImageTextDataModule, Source, VQADataModule
from datamodules.raw import RawSpec, load_index

__all__ = [
    "CaptionsDataModule",
    "Example",
    "ImageTextDataModule",
    "RawSpec",
    "SkipCounter",
    "SkipSample",
    "Source",
    "VQADataModule",
    "WebDataModule",
    "collate_examples",
    "load_index",
]
