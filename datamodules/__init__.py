"""Data pipelines that turn webdataset shards, or raw data sets read directly (:mod:`datamodules.formats.raw`), into typed
batches (:mod:`mmlm.batch`).

Every public class is exported here (``datamodules.DocumentDataModule``), imported from its module on first use so
that a data tool pays only for what it reads.
"""

from __future__ import annotations

from mmlm.lazy import lazy_exports

#: Exported name → the module that defines it.
_EXPORTS: dict[str, str] = {
    "CaptionsDataModule": "datamodules.image_text",
    "Chunked": "datamodules.formats.raw",
    "collate_examples": "datamodules.pipeline.collate",
    "Collator": "datamodules.pipeline.collate",
    "ContinuingCollator": "datamodules.interleaved",
    "CountedBatch": "datamodules.pipeline.skips",
    "Demo": "datamodules.interleaved",
    "DocumentCollator": "datamodules.documents",
    "DocumentDataModule": "datamodules.documents",
    "DocumentExampleBuilder": "datamodules.documents",
    "DocumentSource": "datamodules.documents",
    "DocumentTransform": "datamodules.pipeline.document_transforms",
    "DonutIndex": "datamodules.formats.raw",
    "DonutWriter": "datamodules.tools.documents",
    "EmbodiedDataModule": "datamodules.embodied",
    "EmbodiedExampleBuilder": "datamodules.embodied",
    "EmptyEpochError": "datamodules.pipeline.loader",
    "Encoded": "datamodules.formats.captions",
    "Example": "datamodules.pipeline.collate",
    "ExampleBuilder": "datamodules.image_text",
    "FeatureCollator": "datamodules.image_text",
    "FolderAsShardError": "datamodules.pipeline.urls",
    "ImageExample": "datamodules.caption_views",
    "ImageFinder": "datamodules.tools.interleaved",
    "ImageFolderIndex": "datamodules.formats.raw",
    "ImageLocation": "datamodules.formats.downloads",
    "ImageOnlyDataModule": "datamodules.caption_views",
    "ImageTextDataModule": "datamodules.image_text",
    "ImageTransform": "datamodules.pipeline.transforms",
    "InputError": "datamodules.formats.outputs",
    "InterleavedDataModule": "datamodules.interleaved",
    "InterleavedExampleBuilder": "datamodules.interleaved",
    "Item": "datamodules.formats.converters",
    "ItemIndex": "datamodules.formats.raw",
    "load_index": "datamodules.formats.raw",
    "MetadataLine": "datamodules.formats.donut_folder",
    "MixSource": "datamodules.interleaved",
    "Normalize": "datamodules.pipeline.transforms",
    "OutputExistsError": "datamodules.formats.outputs",
    "PairCollator": "datamodules.pairs",
    "PairExample": "datamodules.pairs",
    "PairsDataModule": "datamodules.pairs",
    "PrefixSentences": "datamodules.pipeline.prefix_sentences",
    "RawIndex": "datamodules.formats.raw",
    "RawSpec": "datamodules.formats.raw",
    "Record": "datamodules.formats.captions",
    "RecordIndex": "datamodules.formats.raw",
    "SentenceCollator": "datamodules.pipeline.packing",
    "SentenceSample": "datamodules.pipeline.packing",
    "ShardPipeline": "datamodules.pipeline.shard_pipeline",
    "ShardSource": "datamodules.base",
    "ShardWriter": "datamodules.formats.shards",
    "SingleKindDataModule": "datamodules.image_text",
    "SkipCounter": "datamodules.pipeline.skips",
    "SkipCountingLoader": "datamodules.pipeline.loader",
    "SkipSample": "datamodules.pipeline.skips",
    "Source": "datamodules.image_text",
    "SourceStream": "datamodules.pipeline.streams",
    "TextCollator": "datamodules.caption_views",
    "TextDataModule": "datamodules.text_corpora",
    "TextExampleBuilder": "datamodules.text_corpora",
    "TextOnlyDataModule": "datamodules.caption_views",
    "UrlImages": "datamodules.formats.downloads",
    "UrlSource": "datamodules.embodied",
    "VQADataModule": "datamodules.image_text",
    "WebDataModule": "datamodules.base",
    "WorkerStream": "datamodules.pipeline.streams",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
