"""The LightningModule every family builds on: optimisation, schedule, non-finite guard, compile, logging.

A family implements :meth:`MultimodalModule.training_loss` (and, when it generates, ``generate_text``), sets
``self.tokenizer`` and composes its evaluation in ``self.evaluation`` (:mod:`mmlm.evaluation`: evaluators for
generated text, retrieval, classification, documents; the default logs the loss only). This class does the rest:
optimisation, skipping of non-finite losses, optional ``torch.compile`` of the encoder and language model, cached
frozen-encoder features and logging; its validation/test/predict hooks only forward to ``self.evaluation``.
Shape legend: B batch, N image tokens, D width, T text tokens.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Literal, TypedDict

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.data import AttributeDict
from torch import nn

from mmlm.batch import Batch
from mmlm.checkpoint_state import BUILDER_KEY, FROZEN_WEIGHTS, leave_out_frozen, plain_hparams, restore_frozen
from mmlm.checkpointing import load_checkpoint_file
from mmlm.data_spec import DataSpec
from mmlm.encoders.base import ImagePreprocess, VisionEncoder
from mmlm.evaluation import Evaluation, LossEvaluator
from mmlm.language.base import GenerationConfig, LanguageModel

log = logging.getLogger(__name__)

NO_DECAY_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.BatchNorm1d, nn.BatchNorm2d)


def param_groups(module: nn.Module, weight_decay: float, declared: bool = True) -> list[dict[str, Any]]:
    """Split trainable parameters into decay / no-decay groups.

    Biases, 1-d parameters (norm scales, learned scalars) and embedding tables get no weight decay; with ``declared``
    neither do the parameters a submodule lists in ``no_weight_decay()`` (timm ViTs: ``pos_embed``, ``cls_token``).
    """
    decay, no_decay, seen = [], [], set()
    named = declared_no_decay(module) if declared else set()
    for sub in module.modules():
        for name, param in sub.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            exempt = (isinstance(sub, NO_DECAY_TYPES) or param.ndim < 2 or name.endswith("bias")
                      or id(param) in named)
            (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def declared_no_decay(module: nn.Module) -> set[int]:
    """Ids of parameters that a submodule lists in its ``no_weight_decay()`` (timm: pos_embed, cls_token)."""
    ids: set[int] = set()
    for sub in module.modules():
        names = sub.no_weight_decay() if callable(getattr(sub, "no_weight_decay", None)) else ()
        params = dict(sub.named_parameters())
        ids |= {id(params[n]) for n in names if n in params}
    return ids


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def warmup_linear(warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """LR multiplier: linear warmup to 1, then linear decay to ``min_lr_ratio`` at ``total_steps`` (KOSMOS-1's
    schedule; fairseq's ``polynomial_decay`` with power 1)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1 - (1 - min_lr_ratio) * progress

    return factor


#: ``schedule`` values of :class:`MultimodalModule` and the LR multipliers they use.
SCHEDULES = {"cosine": warmup_cosine, "linear": warmup_linear}


class NonFiniteLossError(RuntimeError):
    """Raised when ``max_nonfinite_steps`` training steps in a row had a NaN or infinite loss."""


def running_stats(module: nn.Module) -> list[torch.Tensor]:
    """Buffers a training-mode forward updates: running mean/var/count of BatchNorm layers in training mode."""
    norms = [m for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    return [buf for m in norms for buf in m.buffers(recurse=False) if buf is not None]


def shown_keys(keys: list[str], limit: int = 16) -> str:
    """``keys`` as a short list for an error message (the first ``limit``, then how many more)."""
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{list(keys[:limit])}{more}"


def check_features(encoder: nn.Module, features: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``features`` is ``[B, N, D]`` with the encoder's ``width`` (and ``num_tokens``)."""
    width, tokens = getattr(encoder, "width", None), getattr(encoder, "num_tokens", None)
    if features.ndim != 3 or (width is not None and features.shape[2] != width) or (
            tokens is not None and features.shape[1] != tokens):
        raise ValueError(f"cached features have shape {tuple(features.shape)} but {type(encoder).__name__} gives "
                         f"[B, {tokens}, {width}]: were they cached with another encoder or layer?")


def packing_arguments(batch: Any, language_model: LanguageModel) -> dict[str, torch.Tensor]:
    """The LM's extra ``forward`` arguments for a packed :class:`~mmlm.batch.SentenceBatch` (``segment_ids``,
    ``position_ids``); none for a padded one.

    Raises:
        ValueError: packed rows for a language model that cannot keep attention inside each sentence.
    """
    if not getattr(batch, "packed", False):
        return {}
    if not getattr(language_model, "supports_packing", False):
        raise ValueError(f"{type(language_model).__name__} cannot attend within packed sentences: use a decoder-only "
                         "LM (HFCausalLM, SubLNDecoder) or set the datamodule's packing off (pack=false, "
                         "pack_tokens=0)")
    return {"position_ids": batch.position_ids, "segment_ids": batch.segment_ids}


class ModuleSettings(TypedDict, total=False):
    """Every argument of :class:`MultimodalModule` (optimisation, schedule, evaluation output, non-finite guard,
    compilation, checkpoint contents), for constructors that forward them: ``**settings: Unpack[ModuleSettings]``
    lets LightningCLI see, type-check and document each key of a ``from_hf``-style classmethod from YAML. A test
    keeps the keys equal to ``MultimodalModule.__init__``'s parameters."""

    lr: float
    weight_decay: float
    warmup_steps: int
    min_lr_ratio: float
    schedule: Literal["cosine", "linear"]
    betas: tuple[float, float]
    generation: GenerationConfig | None
    predictions_dir: str | None
    max_nonfinite_steps: int
    torch_compile: bool
    compile_options: dict[str, Any] | None
    frozen_weights: str


class MultimodalModule(pl.LightningModule):
    """Shared training logic; evaluation is composed (``self.evaluation``).

    Args:
        lr: peak learning rate of AdamW.
        weight_decay: decoupled weight decay (not applied to norms, biases, embeddings).
        warmup_steps: linear warmup steps.
        min_lr_ratio: the schedule ends at ``lr * min_lr_ratio``.
        schedule: the decay after warmup: ``"cosine"`` (:func:`warmup_cosine`) or ``"linear"``
            (:func:`warmup_linear`, KOSMOS-1's).
        betas: AdamW betas.
        generation: decoding settings used by validation, test and predict (recorded beside predictions).
        predictions_dir: where evaluation writes its result files (default: the trainer's log dir).
        max_nonfinite_steps: a training step whose loss is NaN/inf (on any rank) is skipped: its gradients are
            dropped before the optimizer step (no weight or optimizer-state update; with gradient accumulation the
            whole window is skipped), BatchNorm running statistics are restored; counted as
            ``train/skipped_nonfinite_loss``. This many in a row stop the run with :class:`NonFiniteLossError`.
        torch_compile: compile the ``encoder`` and ``language_model`` forwards (every direct child that is a
            :class:`~mmlm.encoders.base.VisionEncoder` or :class:`~mmlm.language.base.LanguageModel`) with
            ``torch.compile`` in ``configure_model``; parameter names and checkpoints are unchanged.
        compile_options: keyword arguments of ``torch.compile`` (e.g. ``{"mode": "max-autotune"}``).
        frozen_weights: whether checkpoints hold the frozen parts whose weights come from a source (a hub id, a
            directory, a weights file): ``"auto"`` leaves them out when they hold more parameters than the trainable
            parts (a frozen LM beside a small connector), ``"save"`` always keeps them, ``"source"`` always leaves
            them out. Left-out parts are re-read from their source when the module is built and checked against
            fingerprints on load (:mod:`mmlm.checkpoint_state`); resuming stays exact.
    """

    tokenizer: Any

    def __init__(self, lr: float = 1e-4, weight_decay: float = 0.05, warmup_steps: int = 100,
                 min_lr_ratio: float = 0.1, schedule: Literal["cosine", "linear"] = "cosine",
                 betas: tuple[float, float] = (0.9, 0.98),
                 generation: GenerationConfig | None = None, predictions_dir: str | None = None,
                 max_nonfinite_steps: int = 10, torch_compile: bool = False,
                 compile_options: dict[str, Any] | None = None, frozen_weights: str = "auto") -> None:
        super().__init__()
        if max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}")
        if frozen_weights not in FROZEN_WEIGHTS:
            raise ValueError(f"frozen_weights={frozen_weights!r} is not one of {FROZEN_WEIGHTS}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not one of {tuple(SCHEDULES)}")
        self.schedule = schedule
        self.frozen_weights = frozen_weights
        self.builder: str | None = None  # the classmethod that built the module (record_builder), if not __init__
        self.lr, self.weight_decay, self.betas = lr, weight_decay, betas
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.generation = generation or GenerationConfig()
        self.predictions_dir = predictions_dir
        self.max_nonfinite_steps = max_nonfinite_steps
        self.torch_compile, self.compile_options = torch_compile, dict(compile_options or {})
        self.evaluation = Evaluation(LossEvaluator())  # a family composes its own evaluators
        self._step_start = 0.0
        self.nonfinite_skipped = 0  # training steps skipped for a non-finite loss, over the run
        self.weights_step: int | None = None  # training step of loaded weights (checkpoint or export)
        self._nonfinite_in_a_row = 0
        self._skipped_step = False  # this micro-batch's loss was not finite on some rank
        self._nonfinite_window = False  # some micro-batch since the last optimizer step was not finite
        self._stats_snapshot: list[torch.Tensor] = []

    # --- what a family provides -------------------------------------------------------------
    def training_loss(self, batch: Batch) -> torch.Tensor:
        """Scalar training loss for ``batch``."""
        raise NotImplementedError

    def generate_text(self, batch: Batch) -> list[str]:
        """One generated string per example of ``batch`` (from ``batch.prompt_ids``)."""
        raise NotImplementedError

    @property
    def image_preprocess(self) -> ImagePreprocess | None:
        """Image size, mean and std the datamodule must produce: the family's ``encoder``'s (``None`` without one)."""
        return self.encoder.preprocess if hasattr(self, "encoder") else None

    def data_spec(self) -> DataSpec:
        """What the datamodule reads from this model (:class:`~mmlm.data_spec.DataSpec`): its tokenizer and image
        preprocessing; a family with more to say extends it with ``dataclasses.replace(super().data_spec(), …)``."""
        return DataSpec(tokenizer=getattr(self, "tokenizer", None), image_preprocess=self.image_preprocess)

    # --- compilation and cached encoder features ---------------------------------------------------
    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy`` (a device mesh is set): shard with FSDP2 (:func:`mmlm.sharding.shard_`,
        once). With ``torch_compile``: compile each :meth:`compile_targets` part's forward in place (once)."""
        mesh = self.device_mesh
        if mesh is not None:
            from mmlm.sharding import shard_

            shard_(self, mesh)
        if not self.torch_compile:
            return
        for part in self.compile_targets():
            if getattr(part, "_compiled_call_impl", None) is None:
                part.compile(**self.compile_options)

    def gathered_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP2, the whole state dict gathered on global rank 0 (:func:`mmlm.sharding.full_state_dict`; a
        collective: every rank calls it, for an export at the end of ``fit``); ``None`` when not sharded."""
        from mmlm.sharding import full_state_dict

        return full_state_dict(self)

    def compile_targets(self) -> list[nn.Module]:
        """The parts ``torch_compile`` compiles: direct children that are vision encoders or language models."""
        return [m for m in self.children() if isinstance(m, (VisionEncoder, LanguageModel))]

    def encoder_tokens(self, pixels: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``self.encoder(pixels)`` → ``[B, N, Dv]``; with a batch's cached ``features [B, N, Dv]`` (``mmlm data
        cache-features``, checked when the batch arrived) those instead, in the encoder's dtype, and the encoder
        does not run."""
        if features is None:
            return self.encoder(pixels)
        return features.to(next(self.encoder.parameters(), features).dtype)

    def _check_cached_features(self, batch: Any) -> None:
        """When ``batch.features`` is set: this family reads cached features only in place of a frozen ``encoder``
        of the same output shape.

        Raises:
            ValueError: the module has no ``encoder``, the encoder is trainable, or the features' width
                (or token count) is not the encoder's.
        """
        features = getattr(batch, "features", None)
        if features is None:
            return
        encoder = getattr(self, "encoder", None)
        if not isinstance(encoder, nn.Module):
            raise ValueError(f"the batch carries cached features but {type(self).__name__} has no .encoder")
        trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"the batch carries cached features but {type(self).__name__}.encoder is trainable "
                             f"({len(trainable)} tensors, e.g. {trainable[0]!r}): features can stand in for a frozen "
                             "encoder only (set the encoder's freeze: true and trainable_blocks: 0, or turn cached "
                             "features off)")
        check_features(encoder, features)

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Generated ids ``[B, T_new]`` → stripped strings without special tokens (pad, eos)."""
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # --- training ------------------------------------------------------------------------------
    def optimizer_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups, the decayed one first (:func:`param_groups`)."""
        return param_groups(self, self.weight_decay)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over decay/no-decay groups with warmup + ``schedule`` (cosine or linear decay), stepped every
        optimizer step."""
        optimizer = torch.optim.AdamW(self.optimizer_groups(), lr=self.lr, betas=self.betas)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        if not (0 < total < float("inf")):
            raise ValueError(
                f"the {self.schedule} schedule needs a known number of steps, but the trainer estimates {total}: "
                "set trainer.max_steps, or data.init_args.epoch_samples with trainer.max_epochs")
        factor = SCHEDULES[self.schedule](self.warmup_steps, int(total), self.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        self._step_start = time.perf_counter()
        self._skipped_step = False
        self._stats_snapshot = [buf.clone() for buf in running_stats(self)]
        self._check_cached_features(batch)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """``training_loss``. When it is not finite on some rank, the step is marked skipped on every rank: the
        loss still goes through backward (Lightning refuses a ``None`` under DDP, and every rank must join the
        gradient all-reduce), and :meth:`on_before_optimizer_step` drops the gradients."""
        loss = self.training_loss(batch)
        if not self._finite_everywhere(loss):
            self._skip_nonfinite(batch, batch_idx, loss)
            return loss
        self._nonfinite_in_a_row = 0
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        """Whether ``loss`` is finite on every rank (one all-reduce per step: the ranks must skip the same steps,
        or their replicas would diverge)."""
        finite = bool(torch.isfinite(loss.detach()).all())
        strategy = self._trainer.strategy if self._trainer is not None else None
        return strategy.reduce_boolean_decision(finite, all=True) if strategy is not None else finite

    def _skip_nonfinite(self, batch: Batch, batch_idx: int, loss: torch.Tensor) -> None:
        """Count a skipped step (its BatchNorm statistics are put back after backward); raise after too many in
        a row."""
        self._skipped_step = self._nonfinite_window = True
        self.nonfinite_skipped += 1
        self._nonfinite_in_a_row += 1
        keys = list(getattr(batch, "keys", None) or getattr(batch, "ids", None) or [])
        value = float(loss.detach().float().reshape(-1)[0]) if loss.numel() else float("nan")
        where = (f"global step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx}, rank "
                 f"{self.global_rank}): loss {value} on this rank, batch keys {shown_keys(keys)}")
        log.warning("skipping training step with a non-finite loss (%d in a row) at %s",
                    self._nonfinite_in_a_row, where)
        strategy = type(self._trainer.strategy).__name__ if self._trainer is not None else ""
        if self._nonfinite_in_a_row >= self.max_nonfinite_steps or strategy.startswith("DeepSpeed"):
            reason = ("DeepSpeed steps on its own gradient buffers, which mmlm cannot drop"
                      if strategy.startswith("DeepSpeed") else f"max_nonfinite_steps={self.max_nonfinite_steps}")
            raise NonFiniteLossError(
                f"{self._nonfinite_in_a_row} training step(s) in a row had a NaN/inf loss ({reason}); the last at "
                f"{where}. {self.nonfinite_skipped} step(s) skipped in this run so far.")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """When a micro-batch since the last optimizer step had a non-finite loss, drop every gradient: the
        optimizer then updates nothing (parameters without a gradient are skipped, their state untouched)."""
        skip, self._nonfinite_window = self._nonfinite_window, False
        if skip:
            optimizer.zero_grad(set_to_none=True)

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        """Every ``log_every_n_steps`` (and on a skipped step): samples/s and tokens/s of this step, lr and skipped
        steps (skipped samples: :class:`mmlm.app.reliability.DataReport`)."""
        if self._skipped_step:
            self._log_nonfinite(len(batch))
        if (batch_idx + 1) % self.trainer.log_every_n_steps != 0:
            return
        seconds = max(time.perf_counter() - self._step_start, 1e-9)
        self.log("train/samples_per_s", len(batch) / seconds, batch_size=len(batch))
        self.log("train/tokens_per_s", float(batch.attention_mask.sum()) / seconds, batch_size=len(batch))
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=len(batch))
        if not self._skipped_step:
            self._log_nonfinite(len(batch))

    def on_after_backward(self) -> None:
        """After a skipped step's backward (not earlier: backward reads them), BatchNorm running statistics go
        back to what they were before the step."""
        if self._skipped_step:
            with torch.no_grad():
                for buf, saved in zip(running_stats(self), self._stats_snapshot):
                    buf.copy_(saved)

    def _log_nonfinite(self, batch_size: int) -> None:
        """Log the run's count of steps skipped for a non-finite loss (the same on every rank)."""
        self.log("train/skipped_nonfinite_loss", float(self.nonfinite_skipped), batch_size=batch_size,
                 rank_zero_only=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record skipped steps and the builder; leave out frozen parts that can be re-read from their source."""
        checkpoint["nonfinite_skipped"] = self.nonfinite_skipped
        if self.builder is not None:
            checkpoint[BUILDER_KEY] = self.builder
        leave_out_frozen(self, checkpoint, self.frozen_weights)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore skipped steps; put back left-out frozen parts after checking their fingerprints."""
        self.nonfinite_skipped = int(checkpoint.get("nonfinite_skipped", 0))
        self.weights_step = int(checkpoint.get("global_step", 0))
        restore_frozen(self, checkpoint)

    # --- hyperparameters and checkpoints --------------------------------------------------------
    def save_hyperparameters(self, *args: Any, ignore: Any = None, frame: Any = None, logger: bool = True) -> None:
        """Lightning's, keeping plain values only (:func:`mmlm.checkpoint_state.plain`): a module built by LightningCLI
        records its whole config (parts as ``class_path``/``init_args``), so ``load_from_checkpoint`` rebuilds it;
        dataclasses become dicts, part objects of a module built in Python are not recorded; checkpoints then load
        with ``weights_only=True`` and ``hparams.yaml`` with ``yaml.safe_load``."""
        frame = frame or inspect.currentframe().f_back
        with warnings.catch_warnings():  # part objects are dropped below; Lightning's advice to ignore them is noise
            warnings.filterwarnings("ignore", message=r"Attribute '.*' is an instance of `nn.Module`")
            super().save_hyperparameters(*args, ignore=ignore, frame=frame, logger=logger)
        self._set_plain_hparams(self._hparams)

    def _set_plain_hparams(self, hparams: Any) -> None:
        self._hparams = AttributeDict(plain_hparams(hparams))
        self._hparams_initial = copy.deepcopy(self._hparams)

    def record_builder(self, builder: str, arguments: dict[str, Any]) -> None:
        """Record that the classmethod ``builder`` (e.g. ``"from_hf"``) made this module with ``arguments``: they
        become the hyperparameters (so LightningCLI's ``--ckpt_path`` merge gives the builder its own arguments back)
        and ``load_from_checkpoint`` calls the builder."""
        self.builder = builder
        owner = type(self)
        self._set_plain_hparams({"_class_path": f"{owner.__module__}.{owner.__qualname__}.{builder}", **arguments})

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> MultimodalModule:
        """A module exported with ``mmlm export``: the self-contained mmlm format (``model.yaml`` + weights), or — for a
        family with a Hugging Face importer (``from_hf``: BLIP-2, Donut) — a Hugging Face directory.

        Raises:
            TypeError: the directory holds another family's model.
        """
        from mmlm.models.exported import MODEL_FILE, load_exported

        directory = Path(directory)
        if not (directory / MODEL_FILE).is_file() and hasattr(cls, "from_hf"):
            return cls.from_hf(str(directory))
        model = load_exported(directory)
        if not isinstance(model, cls):
            raise TypeError(f"{directory} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, map_location: Any = None, hparams_file: Any = None,
                             strict: bool | None = None, **kwargs: Any) -> MultimodalModule:
        """Lightning's ``load_from_checkpoint`` (``weights_only`` loading); a module made by a builder classmethod
        (``Blip2.from_hf``…) is rebuilt by that builder from its recorded arguments (``kwargs`` override them)."""
        checkpoint = load_checkpoint_file(checkpoint_path)
        builder = checkpoint.get(BUILDER_KEY)
        if builder is None:
            model = super().load_from_checkpoint(checkpoint_path, map_location=map_location,
                                                 hparams_file=hparams_file, strict=strict, **kwargs)
            model._set_plain_hparams({**checkpoint.get("hyper_parameters", {}), **kwargs})  # the config, as recorded
            return model
        recorded = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if k != "_class_path"}
        model = getattr(cls, builder)(**{**recorded, **kwargs})
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"], strict=True if strict is None else strict)
        return model.to(map_location) if isinstance(map_location, (str, torch.device)) else model

    # --- evaluation: forwarded to the composed evaluators (mmlm.evaluation) -------------------------
    def on_validation_batch_start(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_cached_features(batch)

    def on_test_batch_start(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_cached_features(batch)

    def on_predict_batch_start(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_cached_features(batch)

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluation.step(self, batch, "val")

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluation.step(self, batch, "test")

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """The evaluators' prediction rows of ``batch`` (generative families: ``{"id", "task", "prediction"}``);
        the result files are written at the end of the epoch."""
        return self.evaluation.step(self, batch, "predict")

    def on_validation_epoch_end(self) -> None:
        self.evaluation.finish(self, "val")

    def on_test_epoch_end(self) -> None:
        self.evaluation.finish(self, "test")

    def on_predict_epoch_end(self) -> None:
        self.evaluation.finish(self, "predict")
