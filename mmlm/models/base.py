"""The LightningModule every family builds on: optimisation, logging, evaluation, predictions.

A family implements :meth:`MultimodalModule.training_loss` and :meth:`MultimodalModule.generate_text`
and sets ``self.tokenizer``; this class does the rest. Shape legend: B batch, T text tokens.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import nn

from mmlm.batch import Batch
from mmlm.encoders.base import ImagePreprocess
from mmlm.fusion import prepend_placeholders, splice
from mmlm.language.base import GenerationConfig
from mmlm.metrics import CaptionMetrics, VQAAccuracy

NO_DECAY_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.BatchNorm1d, nn.BatchNorm2d)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into decay / no-decay groups.

    Biases, 1-d parameters (norm scales, learned scalars) and embedding tables get no weight decay.
    """
    decay, no_decay, seen = [], [], set()
    named = declared_no_decay(module)
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


def gather_objects(items: list[Any]) -> list[Any]:
    """Concatenate a Python list across ranks (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    out: list[list[Any]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


class MultimodalModule(pl.LightningModule):
    """Shared training and evaluation logic.

    Args:
        lr: peak learning rate of AdamW.
        weight_decay: decoupled weight decay (not applied to norms, biases, embeddings).
        warmup_steps: linear warmup steps.
        min_lr_ratio: the cosine schedule ends at ``lr * min_lr_ratio``.
        betas: AdamW betas.
        generation: decoding settings used by validation, test and predict.
        predictions_dir: where evaluation writes predictions (default: the trainer's log dir).
    """

    tokenizer: Any

    def __init__(self, lr: float = 1e-4, weight_decay: float = 0.05, warmup_steps: int = 100,
                 min_lr_ratio: float = 0.1, betas: tuple[float, float] = (0.9, 0.98),
                 generation: GenerationConfig | None = None, predictions_dir: str | None = None) -> None:
        super().__init__()
        self.lr, self.weight_decay, self.betas = lr, weight_decay, betas
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.generation = generation or GenerationConfig()
        self.predictions_dir = predictions_dir
        self.vqa_metric = VQAAccuracy()
        self.caption_metric = CaptionMetrics()
        self._predictions: dict[str, list[dict[str, Any]]] = {"vqa": [], "caption": []}
        self._step_start = 0.0

    # --- what a family provides -------------------------------------------------------------
    def training_loss(self, batch: Batch) -> torch.Tensor:
        """Scalar training loss for ``batch``."""
        raise NotImplementedError

    def generate_text(self, batch: Batch) -> list[str]:
        """One generated string per example of ``batch`` (from ``batch.prompt_ids``)."""
        raise NotImplementedError

    @property
    def image_preprocess(self) -> ImagePreprocess:
        """Image size, mean and std the datamodule must produce: the family's ``encoder``'s."""
        return self.encoder.preprocess

    def _embed(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None,
               prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Put a modality prefix ``[B, M, D]`` before ``ids [B, T]`` of ``self.language_model``, filling
        ``self.image_token_id`` slots → embeds ``[B, M+T, D]``, mask ``[B, M+T]``, labels (``-100`` on slots)."""
        ids, mask, labels = prepend_placeholders(ids, mask, self.image_token_id, prefix.shape[1], labels)
        return splice(self.language_model.embed(ids), ids, self.image_token_id, prefix), mask, labels

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Generated ids ``[B, T_new]`` → stripped strings without special tokens (pad, eos)."""
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # --- training ------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over decay/no-decay groups with warmup + cosine, stepped every optimizer step."""
        groups = param_groups(self, self.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        if not (0 < total < float("inf")):
            raise ValueError(
                f"the cosine schedule needs a known number of steps, but the trainer estimates {total}: "
                "set trainer.max_steps, or data.init_args.epoch_samples with trainer.max_epochs")
        schedule = warmup_cosine(self.warmup_steps, int(total), self.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        """Every ``log_every_n_steps``: samples/s and tokens/s of this step, lr, skipped samples."""
        if (batch_idx + 1) % self.trainer.log_every_n_steps != 0:
            return
        seconds = max(time.perf_counter() - self._step_start, 1e-9)
        self.log("train/samples_per_s", len(batch) / seconds, batch_size=len(batch))
        self.log("train/tokens_per_s", float(batch.attention_mask.sum()) / seconds, batch_size=len(batch))
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=len(batch))
        self._log_skipped()

    def on_train_epoch_end(self) -> None:
        self._log_skipped()

    # --- evaluation ----------------------------------------------------------------------------
    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Generated text for each example: ``[{"id", "task", "prediction"}]``; also written to
        ``predictions/predict-{vqa,caption}-step{N}.json`` at the end of the epoch."""
        texts = self.generate_text(batch)
        self._record(batch, texts)
        return [{"id": i, "task": t, "prediction": p} for i, t, p in zip(batch.ids, batch.tasks, texts)]

    def on_predict_epoch_end(self) -> None:
        self._write_predictions("predict")

    def _evaluate(self, batch: Batch, stage: str) -> None:
        self.log(f"{stage}/loss", self.training_loss(batch), batch_size=len(batch), sync_dist=True)
        texts = self.generate_text(batch)
        self._record(batch, texts)
        for kind, metric in (("vqa", self.vqa_metric), ("caption", self.caption_metric)):
            rows = [i for i, task in enumerate(batch.tasks) if task == kind]
            if rows:
                metric.update([texts[i] for i in rows], [batch.references[i] for i in rows])

    def _record(self, batch: Batch, texts: list[str]) -> None:
        """Keep predictions in the official result formats (VQAv2 / COCO captions)."""
        for i, task in enumerate(batch.tasks):
            if task == "vqa":
                self._predictions["vqa"].append({"question_id": batch.ids[i], "answer": texts[i]})
            else:
                self._predictions["caption"].append({"image_id": batch.ids[i], "caption": texts[i]})

    def _finish_evaluation(self, stage: str) -> None:
        used = torch.tensor([self.vqa_metric.update_called, self.caption_metric.update_called],
                            dtype=torch.float32, device=self.device)
        used = self.all_gather(used).reshape(-1, 2).amax(0)  # every rank computes the same metrics
        if used[0]:
            self.log(f"{stage}/vqa_acc", self.vqa_metric.compute(), prog_bar=True)
        if used[1]:
            for name, value in self.caption_metric.compute().items():
                self.log(f"{stage}/{name}", value)
        self.vqa_metric.reset()
        self.caption_metric.reset()
        self._write_predictions(stage)
        self._log_skipped()

    def _write_predictions(self, stage: str) -> None:
        gathered = {kind: gather_objects(rows) for kind, rows in self._predictions.items()}
        self._predictions = {"vqa": [], "caption": []}
        out_dir = self.predictions_dir or (self.trainer.log_dir if self._trainer is not None else None)
        if out_dir is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        for kind, rows in gathered.items():
            if rows:
                stem = Path(out_dir) / "predictions" / f"{stage}-{kind}-step{self.global_step}"
                stem.parent.mkdir(parents=True, exist_ok=True)
                stem.with_suffix(".json").write_text(json.dumps(rows, indent=1))
                settings = {"generation": asdict(self.generation), "count": len(rows)}
                stem.with_suffix(".generation.json").write_text(json.dumps(settings, indent=1))

    def _log_skipped(self) -> None:
        """Log this rank's running count of skipped samples per reason as ``data/skipped_<reason>``."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        counts = datamodule.skip_counts() if hasattr(datamodule, "skip_counts") else {}
        for reason, count in counts.items():
            self.log(f"data/skipped_{reason}", float(count), rank_zero_only=True)
