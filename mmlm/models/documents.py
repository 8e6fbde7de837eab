"""Document models (Donut): generated JSON-as-tokens with their tags, evaluated as Donut evaluates them.

A family implements ``training_loss`` and ``generate_ids`` (each row's prompt and generated ids); this class decodes
them keeping the JSON tags and composes :class:`mmlm.evaluation.documents.DocumentEvaluator` (Donut's parsing;
TED accuracy, field F1 and NED for extraction, ANLS and exact match for DocVQA; result files per document; per-field
confidence from :meth:`DocumentModule.token_probabilities`, which a family provides through ``sequence_logits``).
Shape legend: B batch, P prompt tokens, T_new generated tokens, T tokens, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from mmlm.batch import Batch
from mmlm.evaluation import Evaluation, LossEvaluator
from mmlm.evaluation.documents import DocumentEvaluator, prompt_length
from mmlm.models.base import MultimodalModule


class DocumentModule(MultimodalModule):
    """:class:`MultimodalModule` whose examples are documents (see the module docstring).

    Arguments: those of :class:`MultimodalModule`.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.evaluation = Evaluation(LossEvaluator(), DocumentEvaluator())

    def generate_ids(self, batch: Batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per document: ``(prompt ids [P_i], generated ids [T_new_i])`` without padding."""
        raise NotImplementedError

    def sequence_logits(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                        features: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits ``[B, T, V]`` of ``ids [B, T]`` (right-padded, ``mask``) given the documents."""
        raise NotImplementedError

    @torch.no_grad()
    def token_probabilities(self, pixels: torch.Tensor, texts: list[str], features: torch.Tensor | None = None
                            ) -> list[tuple[list[str], list[float | None]]]:
        """Per document: ``(tokens, probability of each token given the image and the tokens before it)`` of its
        decoded sequence ``texts[i]`` (prompt + generation, tags kept), tokenised again and teacher-forced once;
        ``None`` for the prompt's tokens (:func:`~mmlm.evaluation.documents.prompt_length`)."""
        rows = [torch.tensor(self.tokenizer(t, add_special_tokens=False).input_ids or [self.tokenizer.pad_token_id])
                for t in texts]
        ids = pad_sequence(rows, batch_first=True, padding_value=self.tokenizer.pad_token_id).to(self.device)
        mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True).to(self.device)
        logits = self.sequence_logits(pixels, ids, mask, features)
        chosen = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0].exp().cpu()  # t+1 | ≤t
        out = []
        for i, (row, text) in enumerate(zip(rows, texts)):
            tokens = self.tokenizer.convert_ids_to_tokens(row.tolist()) if text else []
            start = min(prompt_length(tokens), len(tokens))
            out.append((tokens, [None] * start + chosen[i, start - 1:len(tokens) - 1].tolist() if tokens else []))
        return out

    def decode_rows(self, rows: list[list[int]]) -> list[str]:
        """Token id rows → sequences keeping the JSON tags (added special tokens), without bos, eos and padding."""
        drop = {self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        kept = [[i for i in row if i not in drop] for row in rows]
        return [text.strip() for text in self.tokenizer.batch_decode(kept, skip_special_tokens=False)]

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Generated ids ``[B, T_new]`` → sequences with their tags (see :meth:`decode_rows`)."""
        return self.decode_rows(ids.tolist())

    def generate_text(self, batch: Batch) -> list[str]:
        """The generated part of each document's sequence, with its tags."""
        return self.decode_rows([new.tolist() for _, new in self.generate_ids(batch)])

    def generate_sequences(self, batch: Batch) -> list[str]:
        """Each document's whole sequence, prompt + generation decoded together, as Donut's inference decodes it
        before parsing (``<s_docvqa><s_question>…</s_question><s_answer>…</s_answer>``)."""
        return self.decode_rows([torch.cat([prompt, new]).tolist() for prompt, new in self.generate_ids(batch)])
