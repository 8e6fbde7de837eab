"""Per-field confidence of Donut predictions for ``mmlm report --load-model``: the mean and the minimum probability of
the tokens of each predicted field's value, for runs whose ``documents.jsonl`` was written without it.

The run's checkpoint is loaded and each shown document's decoded sequence (``text`` of ``documents.jsonl``) goes
through :meth:`mmlm.models.documents.DocumentModule.token_probabilities` with its image, and
:func:`mmlm.evaluation.documents.field_confidences` pairs the values with the leaves of the parsed prediction: the
same functions as the document evaluator's, which writes ``confidence`` during validation and ``predict``.

Field attention (as the Donut paper's figures): the decoder's cross-attention over the document while it wrote each
field's value (:meth:`mmlm.models.Donut.token_attention`, averaged over the value's tokens, the layers and the heads),
drawn in red over the document, one small picture per field.
"""

from __future__ import annotations

from typing import Any

import torch

from mmlm.evaluation.documents import field_confidences, field_positions, prompt_length, value_spans

#: Fields drawn per document (the first ones).
MAX_FIELDS = 8

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

    def field_attention(self, image: bytes, record: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``leaf path → [h, w]``: the decoder's cross-attention while writing each predicted field's value, on the
        encoder's token grid (``h × w = N`` in the input's aspect); ``{}`` without a grid or a pairing, or for a
        model without :meth:`~mmlm.models.Donut.token_attention`."""
        if not hasattr(self.model, "token_attention"):
            return {}
        pixels = self.transform(image).unsqueeze(0).to(self.model.device)
        tokens, attention = self.model.token_attention(pixels, str(record.get("text", "")))
        grid = token_grid(attention.shape[-1], pixels.shape[-2], pixels.shape[-1])
        fields = field_positions(tokens, prompt_length(tokens), record.get("prediction"))
        if grid is None:
            return {}
        return {path: attention[span].mean(0).reshape(grid) for path, span in fields.items()}

    def attention_overlays(self, image: bytes, record: dict[str, Any]) -> str:
        """HTML: one small picture per field (the first :data:`MAX_FIELDS`), the decoder's attention while writing
        it in red over the document; ``""`` when there is none."""
        from mmlm.app.report_attention import overlay

        maps = list(self.field_attention(image, record).items())[:MAX_FIELDS]
        if not maps:
            return ""
        return '<div class="attn">' + "".join(
            f'<img src="{overlay(image, heat)}" title="{path}" alt="{path}">' for path, heat in maps) + "</div>"


def token_grid(tokens: int, height: int, width: int) -> tuple[int, int] | None:
    """``(h, w)`` with ``h × w = tokens`` and ``h / w`` nearest to ``height / width`` (a Swin's last stage), or
    ``None`` when no factorisation is within 25 % of that aspect."""
    pairs = [(h, tokens // h) for h in range(1, tokens + 1) if tokens % h == 0]
    h, w = min(pairs, key=lambda p: abs(p[0] / p[1] - height / width))
    return (h, w) if abs(h / w - height / width) <= 0.25 * height / width else None
