"""The Lightning data module over webdataset shards that every datamodule extends (:class:`WebDataModule`).

A subclass says how a raw sample becomes an example and how examples become a batch; this module builds one
:class:`~datamodules.pipeline.shard_pipeline.ShardPipeline` per stage and rank and wraps it in a
:class:`~datamodules.pipeline.loader.SkipCountingLoader`, which feeds the module's skip counter and keeps the training
position that the module stores in every checkpoint. The shard machinery lives beside it:

- :mod:`datamodules.pipeline.skips`: ``SkipSample``, ``SkipCounter``, ``CountedBatch``, per-sample notes of conversions;
- :mod:`datamodules.pipeline.urls`: shard patterns → shard lists, folders and missing shards refused, source names;
- :mod:`datamodules.pipeline.streams`: rank/worker split, weighted mixing, shuffle buffer, worker positions, epoch length;
- :mod:`datamodules.pipeline.shard_pipeline`: ``ShardPipeline`` (decode, skip, batch, collate in the workers);
- :mod:`datamodules.pipeline.loader`: ``SkipCountingLoader`` (counts and positions in the main process), ``EmptyEpochError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import pytorch_lightning as pl
import torch

from datamodules.pipeline.loader import SkipCountingLoader
from datamodules.pipeline.shard_pipeline import CollateFn, ExampleFn, ShardPipeline
from datamodules.pipeline.skips import CONVERTED, SkipCounter
from datamodules.pipeline.streams import Opener, open_shard
from mmlm.data_spec import DataSpec


class ShardSource(Protocol):
    """What the base pipeline needs from a source: shard urls and a mixing weight."""

    urls: str | list[str]
    weight: float


class WebDataModule(pl.LightningDataModule):
    """Lightning data module over webdataset shards; subclasses say how a sample becomes a batch.

    Subclasses implement :meth:`example_fn` (sample → example, raising :class:`SkipSample`) and
    :meth:`collate_fn` (examples → batch); both must return picklable callables (they run in
    worker processes). Rank and world size come from the attached trainer (``global_rank``,
    ``world_size``) — never from ``torch.distributed`` defaults — or from :meth:`build_pipeline`'s
    arguments. Defaults live in the subclass signature; this one takes every value explicitly.

    Args:
        train: training sources, mixed by their ``weight``.
        val: validation sources (one DataLoader each when there are several).
        test: test sources (as ``val``).
        predict: prediction sources (as ``val``).
        batch_size: examples per batch and rank.
        num_workers: DataLoader worker processes per rank.
        epoch_samples: training samples per epoch over all ranks (needed for several ranks and for
            ``resampled``); ``None`` makes one pass over the training shards.
        shuffle_buffer: training shuffle buffer in samples (raw bytes, decoded after shuffling).
        resampled: draw training shards with replacement.
        seed: base seed for shard order, shuffle buffer and mixing (plus the epoch).
    """

    def __init__(
        self,
        *,
        train: Sequence[ShardSource] | None,
        val: Sequence[ShardSource] | None,
        test: Sequence[ShardSource] | None,
        predict: Sequence[ShardSource] | None,
        batch_size: int,
        num_workers: int,
        epoch_samples: int | None,
        shuffle_buffer: int,
        resampled: bool,
        seed: int,
    ) -> None:
        super().__init__()
        self.sources = {"fit": list(train or []), "validate": list(val or []),
                        "test": list(test or []), "predict": list(predict or [])}
        self.batch_size, self.num_workers = batch_size, num_workers
        self.epoch_samples, self.shuffle_buffer = epoch_samples, shuffle_buffer
        self.resampled, self.seed = resampled, seed
        self.skips = SkipCounter()
        self._epoch = 0
        self._train_loader: SkipCountingLoader | None = None
        self._train_position: dict[str, Any] | None = None

    # -- subclass hooks -------------------------------------------------------------------------
    def example_fn(self, stage: str, sources: Sequence[ShardSource]) -> ExampleFn:
        """A picklable ``(sample, index into sources) -> example`` for ``stage``."""
        raise NotImplementedError

    def collate_fn(self, stage: str) -> CollateFn:
        """A picklable ``list[example] -> batch`` for ``stage``."""
        raise NotImplementedError

    def opener(self) -> Opener:
        """How the pipelines open shard urls (picklable); datamodules that read raw files return
        :func:`datamodules.formats.raw.open_url`, which also serves ``mmlm-raw://`` chunks."""
        return open_shard

    # -- the model's side ----------------------------------------------------------------------
    def model_spec(self) -> DataSpec:
        """The attached trainer's model's :class:`~mmlm.data_spec.DataSpec` (``model.data_spec()``), or an empty spec
        without a trainer or model: the only thing a datamodule reads from the model. Its own arguments win."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        data_spec = getattr(module, "data_spec", None)
        return data_spec() if callable(data_spec) else DataSpec()

    def from_model(self, name: str, argument: str) -> Any:
        """Field ``name`` of the model's spec, for the datamodule ``argument`` that was not given; raises
        ``ValueError`` naming this datamodule and that argument when the model gives none either."""
        return self.model_spec().require(name, type(self).__name__, argument)

    # -- skip counts ----------------------------------------------------------------------------
    @property
    def skipped(self) -> dict[str, int]:
        """Skipped samples by reason, over all stages, as counted in this process so far."""
        return self.skips.skipped

    def skip_counts(self) -> dict[str, int]:
        """Skipped samples by reason (for logging); conversions are in :meth:`conversion_counts`."""
        return {r: n for r, n in self.skips.skipped.items() if not r.startswith(CONVERTED)}

    def conversion_counts(self) -> dict[str, int]:
        """Samples used after a conversion (``converted_cmyk``, ``converted_16bit``…) by kind."""
        return {r: n for r, n in self.skips.skipped.items() if r.startswith(CONVERTED)}

    # -- exact resume -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"train_position": …}``: the training loader's data position, saved in every checkpoint.

        Kept here as well as in Lightning's fit-loop state because Lightning 2.6 does not hand a
        loader its state when ``configure_optimizers`` already built it (``estimated_stepping_batches``).
        """
        if self._train_loader is None:
            return {}
        return {"train_position": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the (current or next) training loader continue after the saved position."""
        position = state_dict.get("train_position")
        if position is None:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(position)
        else:
            self._train_position = position

    # -- epochs and ranks -----------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Epoch used for reshuffling when no trainer is attached (the trainer's epoch wins)."""
        self._epoch = epoch

    def current_epoch(self) -> int:
        """The attached trainer's ``current_epoch``, else the value given to :meth:`set_epoch`."""
        return self.trainer.current_epoch if self.trainer is not None else self._epoch

    def consumed_batches(self) -> int:
        """Training batches the attached trainer has run in the current epoch (``-1``: no trainer)."""
        if self.trainer is None:
            return -1
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def rank_and_world(self) -> tuple[int, int]:
        """``(global_rank, world_size)`` from the attached trainer, ``(0, 1)`` without one."""
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    # -- pipelines and loaders ------------------------------------------------------------------
    def build_pipeline(self, stage: str, sources: Sequence[ShardSource], *,
                       rank: int | None = None, world_size: int | None = None) -> ShardPipeline:
        """The :class:`ShardPipeline` of ``sources`` for ``stage`` (``"fit"`` trains) on one rank."""
        if rank is None or world_size is None:
            rank, world_size = self.rank_and_world()
        train = stage == "fit"
        return ShardPipeline(
            [s.urls for s in sources], [s.weight for s in sources],
            self.example_fn(stage, sources), self.collate_fn(stage),
            batch_size=self.batch_size, train=train, resampled=self.resampled,
            shuffle_buffer=self.shuffle_buffer, seed=self.seed, epoch_samples=self.epoch_samples,
            rank=rank, world_size=world_size, num_workers=self.num_workers, opener=self.opener(),
        )

    def make_loader(self, pipeline: ShardPipeline) -> SkipCountingLoader:
        """Wrap a pipeline in a :class:`SkipCountingLoader` feeding this module's counter."""
        epoch_fn = self.current_epoch if pipeline.train else None
        workers = self.num_workers
        if not pipeline.train:  # no more workers than this rank has shards of its smallest source
            workers = min(workers, min(len(urls) for urls in pipeline.urls) // pipeline.world_size)
        consumed_fn = self.consumed_batches if pipeline.train and self.trainer is not None else None
        return SkipCountingLoader(pipeline, self.skips, epoch_fn, consumed_fn, num_workers=workers,
                                  pin_memory=torch.cuda.is_available())

    def _eval_loaders(self, stage: str) -> SkipCountingLoader | list[SkipCountingLoader]:
        """One loader per source of ``stage``; a single loader when there is one source; ``[]`` for
        validation without sources (Lightning then skips validation)."""
        sources = self.sources[stage]
        if not sources and stage == "validate":
            return []  # fit without validation
        if not sources:
            raise ValueError(f"no {stage} sources were given to {type(self).__name__}")
        loaders = [self.make_loader(self.build_pipeline(stage, [s])) for s in sources]
        return loaders[0] if len(loaders) == 1 else loaders

    def train_dataloader(self) -> SkipCountingLoader:
        if not self.sources["fit"]:
            raise ValueError(f"no train sources were given to {type(self).__name__}")
        self._train_loader = self.make_loader(self.build_pipeline("fit", self.sources["fit"]))
        if self._train_position is not None:
            self._train_loader.load_state_dict(self._train_position)
            self._train_position = None
        return self._train_loader

    def val_dataloader(self) -> SkipCountingLoader | list[SkipCountingLoader]:
        return self._eval_loaders("validate")

    def test_dataloader(self) -> SkipCountingLoader | list[SkipCountingLoader]:
        return self._eval_loaders("test")

    def predict_dataloader(self) -> SkipCountingLoader | list[SkipCountingLoader]:
        return self._eval_loaders("predict")
