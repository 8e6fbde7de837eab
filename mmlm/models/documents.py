"""Evaluation and predictions of document models (Donut): generated JSON-as-tokens → parsed JSON, scored with
TED accuracy, field F1 and normalised edit distance (:class:`mmlm.metrics.documents.DocumentMetrics`).

Files (rank 0, under ``predictions_dir`` or the trainer's log dir): ``predictions/{stage}-documents-step{N}.jsonl``
(one row per document: ``id``, ``key``, ``task``, ``text`` = prompt + generated sequence, ``prediction`` = its JSON and,
when known, ``references``), one JSON per document in ``predictions/{stage}-documents-step{N}/{id}.json`` and the
decoding settings in ``….generation.json``. Shape legend: B batch, T_new generated tokens.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from mmlm.batch import Batch
from mmlm.json_tokens import tokens_to_json
from mmlm.metrics.documents import DocumentMetrics
from mmlm.models.base import MultimodalModule, gather_objects

DOCUMENT_TASK = "document"
METRICS = ("ted_accuracy", "f1", "ned")


def file_name(doc_id: str) -> str:
    """A safe file name for a document id (path separators and odd characters become ``_``)."""
    return re.sub(r"[^\w.\-]+", "_", doc_id).strip(".") or "_"


class DocumentModule(MultimodalModule):
    """:class:`MultimodalModule` whose examples are documents: validation/test log ``{stage}/ted_accuracy``,
    ``{stage}/f1``, ``{stage}/ned`` (plus the loss); predict writes per-document JSON + a JSONL.

    A family implements ``training_loss`` and ``generate_text`` (sequences with their tags, without eos/pad; see
    :meth:`decode`). Arguments: those of :class:`MultimodalModule`.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.document_metric = DocumentMetrics()
        self._documents: list[dict[str, Any]] = []

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Generated ids ``[B, T_new]`` → sequences keeping the JSON tags (added special tokens), without bos,
        eos and padding."""
        drop = {self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        rows = [[i for i in row if i not in drop] for row in ids.tolist()]
        return [text.strip() for text in self.tokenizer.batch_decode(rows, skip_special_tokens=False)]

    def with_prompts(self, batch: Batch, texts: list[str]) -> list[str]:
        """Prompt + generation per document, so a DocVQA answer is parsed beside its question
        (``<s_docvqa><s_question>…</s_question><s_answer>`` + ``10.45</s_answer>``); a bare leading task token
        (``<s_cord-v2>``) is an unclosed tag that the parser ignores."""
        prompts = self.decode(batch.prompt_ids)
        return [prompt + text for prompt, text in zip(prompts, texts)]

    def _evaluate(self, batch: Batch, stage: str) -> None:
        self.log(f"{stage}/loss", self.training_loss(batch), batch_size=len(batch), sync_dist=True)
        texts = self.with_prompts(batch, self.generate_text(batch))
        self._record(batch, texts)
        rows = [i for i, task in enumerate(batch.tasks) if task == DOCUMENT_TASK and batch.references[i]]
        if rows:
            self.document_metric.update([texts[i] for i in rows], [batch.references[i] for i in rows])

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Parsed JSON for each document: ``[{"id", "task", "prediction"}]``; also written to the predictions
        files at the end of the epoch."""
        texts = self.with_prompts(batch, self.generate_text(batch))
        self._record(batch, texts)
        return [{"id": i, "task": t, "prediction": tokens_to_json(p)} for i, t, p in zip(batch.ids, batch.tasks, texts)]

    def _record(self, batch: Batch, texts: list[str]) -> None:
        """One row per document: ids, the generated sequence and its parsed JSON (and the references)."""
        for i, text in enumerate(texts):
            row = {"id": batch.ids[i] if batch.ids else batch.keys[i], "key": batch.keys[i] if batch.keys else "",
                   "task": batch.tasks[i] if batch.tasks else DOCUMENT_TASK, "text": text,
                   "prediction": tokens_to_json(text)}
            if batch.references and batch.references[i]:
                row["references"] = [json.loads(r) for r in batch.references[i]]
            self._documents.append(row)

    def _finish_evaluation(self, stage: str) -> None:
        used = torch.tensor([float(self.document_metric.update_called)], device=self.device)
        if self.all_gather(used).amax():  # every rank computes (and syncs) the same metric
            scores = self.document_metric.compute()
            for name in METRICS:
                self.log(f"{stage}/{name}", scores[name].float(), prog_bar=name == "ted_accuracy")
        self.document_metric.reset()
        self._write_predictions(stage)
        self._log_skipped()

    def _write_predictions(self, stage: str) -> None:
        rows = gather_objects(self._documents)
        self._documents = []
        out_dir = self.predictions_dir or (self.trainer.log_dir if self._trainer is not None else None)
        if not rows or out_dir is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        stem = Path(out_dir) / "predictions" / f"{stage}-documents-step{self.global_step}"
        stem.mkdir(parents=True, exist_ok=True)
        with stem.with_suffix(".jsonl").open("w") as jsonl:
            for row in rows:
                jsonl.write(json.dumps(row, ensure_ascii=False) + "\n")
                path = stem / f"{file_name(str(row['id']))}.json"
                path.write_text(json.dumps(row["prediction"], ensure_ascii=False, indent=1))
        settings = {"generation": asdict(self.generation), "count": len(rows)}
        stem.with_suffix(".generation.json").write_text(json.dumps(settings, indent=1))
