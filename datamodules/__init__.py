"""Data pipelines that turn webdataset shards, or raw data sets read directly (:mod:`datamodules.raw`), into typed
batches (:mod:`mmlm.batch`).

Every public class is exported here (``datamodules.DocumentDataModule``), imported from its module on first use so
that a data tool pays only for what it reads.
"""

from __future__ import annotations

from mmlm.lazy import lazy_exports

#: Exported name → the module that defines it.
_EXPORTS: dict[str, str] = {
    "CaptionsDataModule": "datamodules.image_text",
    "Chunked": "datamodules.raw",
    "collate_examples": "datamodules.collate",
    "Collator": "datamodules.collate",
    "ContinuingCollator": "datamodules.interleaved",
    "CountedBatch": "datamodules.skips",
    "Demo": "datamodules.interleaved",
    "DocumentCollator": "datamodules.documents",
    "DocumentDataModule": "datamodules.documents",
    "DocumentExampleBuilder": "datamodules.documents",
    "DocumentSource": "datamodules.documents",
    "DocumentTransform": "datamodules.document_transforms",
    "DonutIndex": "datamodules.raw",
    "DonutWriter": "datamodules.document_tools",
    "EmbodiedDataModule": "datamodules.embodied",
    "EmbodiedExampleBuilder": "datamodules.embodied",
    "EmptyEpochError": "datamodules.loader",
    "Encoded": "datamodules.tools",
    "Example": "datamodules.collate",
    "ExampleBuilder": "datamodules.image_text",
    "FeatureCollator": "datamodules.image_text",
    "FolderAsShardError": "datamodules.urls",
    "ImageExample": "datamodules.caption_views",
    "ImageFinder": "datamodules.interleaved_tools",
    "ImageFolderIndex": "datamodules.raw",
    "ImageLocation": "datamodules.downloads",
    "ImageOnlyDataModule": "datamodules.caption_views",
    "ImageTextDataModule": "datamodules.image_text",
    "ImageTransform": "datamodules.transforms",
    "InputError": "datamodules.outputs",
    "InterleavedDataModule": "datamodules.interleaved",
    "InterleavedExampleBuilder": "datamodules.interleaved",
    "Item": "datamodules.converters",
    "ItemIndex": "datamodules.raw",
    "load_index": "datamodules.raw",
    "MetadataLine": "datamodules.document_tools",
    "MixSource": "datamodules.interleaved",
    "Normalize": "datamodules.transforms",
    "OutputExistsError": "datamodules.outputs",
    "PairCollator": "datamodules.pairs",
    "PairExample": "datamodules.pairs",
    "PairsDataModule": "datamodules.pairs",
    "PrefixSentences": "datamodules.prefix_sentences",
    "RawIndex": "datamodules.raw",
    "RawSpec": "datamodules.raw",
    "Record": "datamodules.tools",
    "RecordIndex": "datamodules.raw",
    "SentenceCollator": "datamodules.packing",
    "SentenceSample": "datamodules.packing",
    "ShardPipeline": "datamodules.pipeline",
    "ShardSource": "datamodules.base",
    "ShardWriter": "datamodules.shards",
    "SingleKindDataModule": "datamodules.image_text",
    "SkipCounter": "datamodules.skips",
    "SkipCountingLoader": "datamodules.loader",
    "SkipSample": "datamodules.skips",
    "Source": "datamodules.image_text",
    "SourceStream": "datamodules.streams",
    "TextCollator": "datamodules.caption_views",
    "TextDataModule": "datamodules.text_corpora",
    "TextExampleBuilder": "datamodules.text_corpora",
    "TextOnlyDataModule": "datamodules.caption_views",
    "UrlImages": "datamodules.downloads",
    "UrlSource": "datamodules.embodied",
    "VQADataModule": "datamodules.image_text",
    "WebDataModule": "datamodules.base",
    "WorkerStream": "datamodules.streams",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
