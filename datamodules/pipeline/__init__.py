"""The data pipeline, shards → batches: shard urls (:mod:`.urls`), worker streams and their positions (:mod:`.streams`),
the per-rank ``IterableDataset`` (:mod:`.shard_pipeline`), skip accounting (:mod:`.skips`), the loader (:mod:`.loader`),
image transforms (:mod:`.transforms`, :mod:`.document_transforms`) and collation into typed batches (:mod:`.collate`,
:mod:`.packing`, :mod:`.prefix_sentences`). Nothing here knows a data set's layout: that is :mod:`datamodules.formats`.
"""
