"""Evaluation as composed parts: a module holds an :class:`Evaluation` of :class:`Evaluator` objects.

The base LightningModule's validation/test/predict hooks only forward to ``module.evaluation``:

* ``step(module, batch, stage)`` on every evaluation batch: each evaluator scores what it needs from the module
  (generated text, retrieval features, class logits, a loss) and returns per-batch values to log and prediction rows;
* ``finish(module, stage)`` at the end of the epoch, on every rank: each evaluator gathers its rows or metric states
  (collectives in one fixed order on every rank), returns its epoch metrics (logged as ``{stage}/{name}``) and writes
  its result files through :class:`ResultFiles` (global rank zero only).

Evaluators are ``nn.Module`` so that the torchmetrics states they hold move with the module to its device; they add
no keys to checkpoints. Shape legend: B batch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class StepOutput:
    """What an evaluator takes from one batch.

    Attributes:
        logs: per-batch values, logged as ``{stage}/{name}`` (averaged over batches, synced across ranks).
        rows: this batch's prediction rows (what ``predict_step`` returns), in the evaluator's row format.
    """

    logs: dict[str, Tensor] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class ResultFiles:
    """Where an evaluation epoch writes: ``{directory}/predictions/{stage}-{name}-step{step}{suffix}``.

    Attributes:
        directory: the run's output directory; ``None`` writes nothing (not global rank zero, Lightning's sanity
            check, or no directory).
        stage: ``"val"``, ``"test"`` or ``"predict"``.
        step: the global step of the evaluated weights.
        settings: what produced the predictions (decoding settings), recorded beside each predictions file.
    """

    directory: Path | None
    stage: str
    step: int
    settings: dict[str, Any] = field(default_factory=dict)

    def path(self, name: str, suffix: str = ".json") -> Path | None:
        """The file (or, with ``suffix=""``, folder) of ``name`` for this stage and step; ``None`` when not writing."""
        if self.directory is None:
            return None
        return self.directory / "predictions" / f"{self.stage}-{name}-step{self.step}{suffix}"

    def write_json(self, name: str, data: Any, suffix: str = ".json") -> Path | None:
        """Write ``data`` as indented JSON (UTF-8, non-ASCII kept); returns the path written, if any."""
        path = self.path(name, suffix)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
        return path

    def write_jsonl(self, name: str, rows: Iterable[dict[str, Any]]) -> Path | None:
        """Write one JSON object per line to ``….jsonl``."""
        path = self.path(name, ".jsonl")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", encoding="utf-8") as out:
                for row in rows:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
        return path

    def write_settings(self, name: str, count: int, **extra: Any) -> Path | None:
        """``….generation.json`` beside ``name``'s predictions: :attr:`settings`, the row ``count`` and ``extra``."""
        return self.write_json(name, {**self.settings, "count": count, **extra}, ".generation.json")


def result_file(directory: str | Path, stage: str, task: str) -> Path:
    """The newest (highest step) result file ``predictions/{stage}-{task}-step{N}.json`` under ``directory`` (searched
    recursively, e.g. a run's root), not the ``.accuracy.json``/``.generation.json``/``.scores.json`` beside it.

    Raises:
        FileNotFoundError: there is none, naming the pattern and the directory.
    """
    pattern = re.compile(rf"{re.escape(stage)}-{re.escape(task)}-step(\d+)\.json")
    found = [(int(m.group(1)), p) for p in Path(directory).rglob(f"{stage}-{task}-step*.json")
             if (m := pattern.fullmatch(p.name))]
    if not found:
        raise FileNotFoundError(f"no predictions/{stage}-{task}-step<N>.json under {directory}")
    return max(found)[1]


class Evaluator(nn.Module):
    """One kind of evaluation (generation, retrieval, classification, documents, loss).

    Attributes:
        main_metric: the epoch metric shown on the progress bar (``None``: none).
        predicts: whether it writes predictions in ``predict`` (losses and retrieval have none).
    """

    main_metric: str | None = None
    predicts: bool = True

    def step(self, module: Any, batch: Any, stage: str) -> StepOutput:
        """Take what this evaluation needs from ``module`` for ``batch`` (``stage``: val, test or predict)."""
        raise NotImplementedError

    def finish(self, module: Any, stage: str, files: ResultFiles) -> dict[str, Tensor | float]:
        """End of the epoch, on every rank (collectives in a fixed order): the epoch metrics to log, files written
        through ``files``; the state is reset for the next epoch."""
        return {}


class LossEvaluator(Evaluator):
    """Logs ``{stage}/loss``: the module's ``training_loss`` on evaluation batches (not in predict)."""

    predicts = False

    def step(self, module: Any, batch: Any, stage: str) -> StepOutput:
        if stage == "predict":
            return StepOutput()
        return StepOutput(logs={"loss": module.training_loss(batch)})


def settings_of(module: Any) -> dict[str, Any]:
    """The decoding settings recorded beside predictions: ``{"generation": …}`` when the module has them."""
    generation = getattr(module, "generation", None)
    return {"generation": asdict(generation)} if is_dataclass(generation) else {}


def result_files(module: Any, stage: str) -> ResultFiles:
    """Where ``module`` writes this stage's results: ``predictions_dir`` or the trainer's log dir, on global rank
    zero outside Lightning's sanity check."""
    trainer = module._trainer
    out_dir = module.predictions_dir or (trainer.log_dir if trainer is not None else None)
    writing = trainer is not None and trainer.is_global_zero and not trainer.sanity_checking
    return ResultFiles(Path(out_dir) if out_dir is not None and writing else None, stage, evaluated_step(module),
                       settings_of(module))


def evaluated_step(module: Any) -> int:
    """The training step of the weights being evaluated: the trainer's step while fitting; else the step of the
    checkpoint or export the weights came from (``validate --ckpt_path``: Lightning restores no loop state, so
    its ``global_step`` reads 0), else 0."""
    trainer = module._trainer
    fitting = trainer is not None and trainer.state.fn == "fit"
    loaded = getattr(module, "weights_step", None)
    return module.global_step if fitting or loaded is None else loaded


class Evaluation(nn.Module):
    """The evaluators of a module, run in order (the same order on every rank).

    Args:
        *evaluators: e.g. ``LossEvaluator(), GenerationEvaluator(...)``.
    """

    def __init__(self, *evaluators: Evaluator) -> None:
        super().__init__()
        self.evaluators = nn.ModuleList(evaluators)

    def step(self, module: Any, batch: Any, stage: str) -> list[dict[str, Any]]:
        """Run every evaluator on ``batch``; log their per-batch values (not in predict); return all rows.

        Raises:
            ValueError: ``predict`` on a module none of whose evaluators writes predictions.
        """
        if stage == "predict" and not any(e.predicts for e in self.evaluators):
            kinds = ", ".join(type(e).__name__ for e in self.evaluators)
            raise ValueError(f"{type(module).__name__} has no predictions to write (its evaluation: {kinds}); use "
                             "mmlm validate or test for its losses and scores")
        rows: list[dict[str, Any]] = []
        for evaluator in self.evaluators:
            out = evaluator.step(module, batch, stage)
            if stage != "predict" and module._trainer is not None:
                for name, value in out.logs.items():
                    module.log(f"{stage}/{name}", value, batch_size=len(batch), sync_dist=True)
            rows += out.rows
        return rows

    def finish(self, module: Any, stage: str) -> None:
        """End every evaluator's epoch and log its metrics as ``{stage}/{name}``."""
        files = result_files(module, stage)
        for evaluator in self.evaluators:
            metrics = evaluator.finish(module, stage, files)
            if stage == "predict" or module._trainer is None:
                continue
            for name, value in metrics.items():
                value = torch.as_tensor(value, dtype=torch.float32, device=module.device)
                module.log(f"{stage}/{name}", value, prog_bar=name == evaluator.main_metric)
