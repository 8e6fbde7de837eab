"""Per-field confidence of Donut predictions for ``mmlm report --model``: the mean and the minimum probability of the
tokens of each predicted field's value.

The run's checkpoint is loaded, each shown document's decoded sequence (``text`` of ``documents.jsonl``: prompt +
generation, tags kept) is tokenised again and teacher-forced once through the model with its image; the probability
of each generated token is read off the logits. Tokens are grouped into value spans by the JSON tags
(``<s_key>`` … ``</s_key>``, ``<sep/>``), and the spans are matched in order to the leaves of the parsed prediction
(:func:`mmlm.app.report_page.leaf_paths`); a prediction whose spans and leaves do not pair up gets none. The prompt is
the first token, through ``<s_answer>`` for DocVQA. Shape legend: T tokens, V vocabulary.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from mmlm.app.report_page import leaf_paths

TAG = re.compile(r"</?s_[^>]+>|<sep/>")


def value_spans(tokens: Sequence[str], probabilities: Sequence[float | None]) -> list[list[float]]:
    """The probabilities of each value: runs of non-tag tokens closed by a tag (``<s_x>``, ``</s_x>``, ``<sep/>``);
    a category token (``<x/>``) is a value of its own. Prompt tokens (probability ``None``) start no value."""
    spans: list[list[float]] = []
    current: list[float] = []
    for token, probability in zip(tokens, probabilities):
        if TAG.fullmatch(token) or re.fullmatch(r"<[^>]+/>", token):
            if current:
                spans.append(current)
            current = []
            if not TAG.fullmatch(token) and probability is not None:
                spans.append([probability])
        elif probability is not None:
            current.append(probability)
    return spans + ([current] if current else [])


def field_confidences(tokens: Sequence[str], probabilities: Sequence[float | None],
                      prediction: Any) -> dict[str, dict[str, float]]:
    """``leaf path → {"mean", "min"}`` of the prediction's leaves, paired in order with :func:`value_spans` (the
    last leaves when the prompt holds the first ones, as DocVQA's question); ``{}`` when they do not pair up."""
    spans, paths = value_spans(tokens, probabilities), list(leaf_paths(prediction))
    if not spans or len(spans) > len(paths):
        return {}
    return {path: {"mean": sum(span) / len(span), "min": min(span)}
            for path, span in zip(paths[len(paths) - len(spans):], spans)}


def prompt_length(tokens: Sequence[str]) -> int:
    """Tokens of the task prompt: through ``<s_answer>`` when present (DocVQA), else the first token."""
    return tokens.index("<s_answer>") + 1 if "<s_answer>" in tokens else 1


class DocumentConfidence:
    """Teacher-forced token probabilities of decoded Donut sequences.

    Args:
        model: a :class:`~mmlm.models.documents.DocumentModule` with ``encode_images`` and a ``decoder``.
    """

    def __init__(self, model: Any) -> None:
        from mmlm.inference import image_transform

        self.model, self.transform = model.eval(), image_transform(model)

    @torch.no_grad()
    def probabilities(self, image: bytes, text: str) -> tuple[list[str], list[float | None]]:
        """``(tokens, probability of each token given the image and the tokens before it)``; ``None`` for the
        prompt."""
        tokenizer = self.model.tokenizer
        ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids], device=self.model.device)
        tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
        states = self.model.encode_images(self.transform(image).unsqueeze(0).to(self.model.device))
        logits = self.model.decoder(self.model.decoder.embed(ids), torch.ones_like(ids), None,
                                    encoder_states=states).logits  # [1, T, V]
        chosen = logits[0, :-1].float().softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]  # token t+1 given ≤ t
        start = prompt_length(tokens)
        return tokens, [None] * start + chosen[start - 1:].tolist()

    def confidences(self, image: bytes, record: dict[str, Any]) -> dict[str, dict[str, float]]:
        """:func:`field_confidences` of one ``documents.jsonl`` row (its ``text`` and ``prediction``)."""
        tokens, probabilities = self.probabilities(image, str(record.get("text", "")))
        return field_confidences(tokens, probabilities, record.get("prediction"))
