"""Per-field confidence of Donut predictions for ``mmlm report --load-model``: the mean and the minimum probability of
the tokens of each predicted field's value, for runs whose ``documents.jsonl`` was written without it.

The run's checkpoint is loaded and each shown document's decoded sequence (``text`` of ``documents.jsonl``) goes
through :meth:`mmlm.models.documents.DocumentModule.token_probabilities` with its image, and
:func:`mmlm.evaluation.documents.field_confidences` pairs the values with the leaves of the parsed prediction: the
same functions as the document evaluator's, which writes ``confidence`` during validation and ``predict``.
"""

from __future__ import annotations

from typing import Any

import torch

from mmlm.evaluation.documents import field_confidences, prompt_length, value_spans

__all__ = ["DocumentConfidence", "field_confidences", "prompt_length", "value_spans"]


class DocumentConfidence:
    """Teacher-forced token probabilities of decoded sequences, one document image at a time.

    Args:
        model: a :class:`~mmlm.models.documents.DocumentModule` (``token_probabilities``).
    """

    def __init__(self, model: Any) -> None:
        from mmlm.inference import image_transform

        self.model, self.transform = model.eval(), image_transform(model)

    @torch.no_grad()
    def probabilities(self, image: bytes, text: str) -> tuple[list[str], list[float | None]]:
        """``(tokens, probability of each token given the image and the tokens before it)``; ``None`` for the
        prompt."""
        pixels = self.transform(image).unsqueeze(0).to(self.model.device)
        return self.model.token_probabilities(pixels, [text])[0]

    def confidences(self, image: bytes, record: dict[str, Any]) -> dict[str, dict[str, float]]:
        """:func:`field_confidences` of one ``documents.jsonl`` row (its ``text`` and ``prediction``)."""
        tokens, probabilities = self.probabilities(image, str(record.get("text", "")))
        return field_confidences(tokens, probabilities, record.get("prediction"))
