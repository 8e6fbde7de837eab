"""Multimodal sentences: text with marker spans that modality embeddings fill (KOSMOS-1, PaLM-E).

A *marker* in a text (``<image>``, ``<img1>``, ``<state>``, ``<obj3>`` …) expands into a *span* of
``count`` placeholder ids, optionally wrapped (KOSMOS-1: ``<image>`` + N × ``<image_embed>`` +
``</image>``). The expansion returns the ids plus an ordered record of spans
``(modality, item, start, length)``; the model fills every span from per-modality embeddings with
:func:`fill_spans` (one :func:`mmlm.fusion.splice` per modality, count-checked).

Shape legend: B batch, T text tokens, K items of a modality, M embeddings per item, D width.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from mmlm.fusion import splice

IGNORE_INDEX = -100
IMAGE_START, IMAGE_END, IMAGE_EMBED = "<image>", "</image>", "<image_embed>"


@dataclass(frozen=True)
class Marker:
    """How one marker of a text becomes a span.

    Attributes:
        text: the marker as written in the text, e.g. ``"<image>"`` or ``"<img{}>"``; ``{}`` stands
            for a number that names the item (``<img2>`` → item ``2 - index_base``).
        modality: the modality that fills the span (``"image"``, ``"state"``, ``"object"`` …).
        count: N placeholder positions per item (the connector's output length M).
        placeholder: the placeholder token; one per modality, distinct between modalities.
        open: optional token written before the span (KOSMOS-1 ``<image>``).
        close: optional token written after the span (KOSMOS-1 ``</image>``).
        index_base: the number that names item 0 in a ``{}`` marker (``<img1>`` is item 0 with 1).
    """

    text: str
    modality: str
    count: int
    placeholder: str
    open: str | None = None
    close: str | None = None
    index_base: int = 1

    def tokens(self) -> list[str]:
        """Special tokens the tokenizer must know (placeholder and wrappers)."""
        return [t for t in (self.open, self.placeholder, self.close) if t is not None]

    def pattern(self) -> str:
        """Regex that matches this marker; a ``{}`` marker captures the item number."""
        if "{}" not in self.text:
            return re.escape(self.text)
        head, tail = self.text.split("{}", 1)
        return re.escape(head) + r"(\d+)" + re.escape(tail)


def kosmos_image_marker(count: int) -> Marker:
    """KOSMOS-1's image marker: ``<image>`` in text → ``<image>`` + count × ``<image_embed>`` + ``</image>``."""
    return Marker(IMAGE_START, "image", count, IMAGE_EMBED, open=IMAGE_START, close=IMAGE_END)


def prefix_image_marker(count: int) -> Marker:
    """The image marker of the prefix families (Frozen, BLIP-2, MetaLM): ``count`` ``<image>`` placeholders, no
    wrappers, in front of each sentence (``count`` = the connector's output length M; 0: text-only sentences)."""
    return Marker(IMAGE_START, "image", count, IMAGE_START)


def special_tokens(markers: Sequence[Marker]) -> list[str]:
    """All special tokens of ``markers`` (deduplicated, in order) for ``load_tokenizer(special_tokens=…)``."""
    return list(dict.fromkeys(t for m in markers for t in m.tokens()))


@dataclass(frozen=True)
class Span:
    """One filled span of a sentence.

    Attributes:
        modality: which modality fills it.
        item: index of the item in that modality's list (per sentence; global per batch after collation).
        start: position of the first placeholder.
        length: number of placeholders (the modality's M).
        before: wrapper tokens right before ``start`` (0 or 1).
        after: wrapper tokens right after ``start + length`` (0 or 1).
    """

    modality: str
    item: int
    start: int
    length: int
    before: int = 0
    after: int = 0

    @property
    def outer(self) -> tuple[int, int]:
        """``[begin, end)`` of the span including its wrappers (never cut by truncation)."""
        return self.start - self.before, self.start + self.length + self.after

    def shifted(self, offset: int = 0, item_offset: int = 0) -> Span:
        """The same span ``offset`` positions later, with ``item + item_offset``."""
        return replace(self, start=self.start + offset, item=self.item + item_offset)


@dataclass
class Sentence:
    """Token ids of one multimodal sentence.

    Attributes:
        ids: ``T`` token ids.
        targets: ``T`` flags, True where the token is text that carries the LM loss (never
            placeholders, wrappers or prompts).
        spans: the spans in reading order.
    """

    ids: list[int] = field(default_factory=list)
    targets: list[bool] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def __add__(self, other: Sentence) -> Sentence:
        """Concatenate; ``other``'s spans move by ``len(self)`` (item indices unchanged)."""
        spans = self.spans + [s.shifted(len(self)) for s in other.spans]
        return Sentence(self.ids + other.ids, self.targets + other.targets, spans)

    def items(self, modality: str) -> list[int]:
        """Item indices of ``modality`` in reading order (an item may appear more than once)."""
        return [s.item for s in self.spans if s.modality == modality]

    def labels(self) -> list[int]:
        """``T`` LM labels: the id where ``targets`` is True, else ``-100``."""
        return [i if t else IGNORE_INDEX for i, t in zip(self.ids, self.targets)]

    def as_prompt(self) -> Sentence:
        """The same sentence with no LM targets (prompts, demonstrations in evaluation)."""
        return Sentence(list(self.ids), [False] * len(self.ids), list(self.spans))

    def truncate(self, max_tokens: int) -> Sentence:
        """Keep at most ``max_tokens`` tokens; a span (with its wrappers) that would be cut is dropped
        whole, together with everything after it."""
        end = min(max_tokens, len(self.ids))
        for span in self.spans:
            begin, stop = span.outer
            if begin < end < stop:
                end = begin
                break
        spans = [s for s in self.spans if s.outer[1] <= end]
        return Sentence(self.ids[:end], self.targets[:end], spans)


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of raw ``text`` with no special id in them: no bos/eos added, and special tokens written
    in the text (``</s>``, ``<pad>``, added marker tokens) tokenised as ordinary text
    (``split_special_tokens=True``)."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


class SentenceBuilder:
    """Builds a :class:`Sentence` piece by piece from text, markers and raw ids.

    Sequential markers (no ``{}``) number their items per modality in order of appearance;
    ``{}`` markers name them. Example (KOSMOS-1)::

        builder = SentenceBuilder(tokenizer, [kosmos_image_marker(64)])
        sentence = builder.ids([tokenizer.bos_token_id]).expand("a cat <image> and a dog <image>").build()
    """

    def __init__(self, tokenizer: Any, markers: Sequence[Marker]) -> None:
        self.tokenizer, self.markers = tokenizer, list(markers)
        self._ids = {tok: self._token_id(tok) for tok in special_tokens(self.markers)}
        placeholders = [m.placeholder for m in self.markers]
        by_modality = {m.modality: m.placeholder for m in self.markers}
        if len(set(by_modality.values())) != len(by_modality) or len(set(placeholders)) != len(by_modality):
            raise ValueError(f"SentenceBuilder: each modality needs its own placeholder token, got "
                             f"{[(m.text, m.modality, m.placeholder) for m in self.markers]}")
        self._regex = re.compile("|".join(f"({m.pattern()})" for m in self.markers)) if self.markers else None
        self._sentence = Sentence()
        self._next_item: dict[str, int] = {}

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"SentenceBuilder: the tokenizer has no token {token!r}; load it with "
                             f"load_tokenizer(..., special_tokens=special_tokens(markers))")
        return token_id

    def text(self, text: str, target: bool = True) -> SentenceBuilder:
        """Append plain text (no marker parsing); ``target`` False for prompts.

        Raw text never becomes special ids: it is tokenised with special tokens split (a literal ``</s>``
        or ``<pad>`` in a document stays text, see :func:`text_ids`); bos, eos and spans come only from
        :meth:`ids` and :meth:`marker`. Marker tokens written literally in the text (``<image>`` in a web
        page) are removed, as before.
        """
        for token in self._ids:
            text = text.replace(token, " ")
        return self.ids(text_ids(self.tokenizer, text), target) if text else self

    def ids(self, ids: Sequence[int], target: bool = True) -> SentenceBuilder:
        """Append raw token ids (bos, eos, separators)."""
        self._sentence.ids.extend(int(i) for i in ids)
        self._sentence.targets.extend([target] * len(ids))
        return self

    def marker(self, marker: Marker | str, item: int | None = None) -> SentenceBuilder:
        """Append the span of ``marker`` (a :class:`Marker` or its modality name) for ``item``
        (default: the next item of that modality)."""
        m = marker if isinstance(marker, Marker) else self._by_modality(marker)
        if item is None:
            item = self._next_item.get(m.modality, 0)
        self._next_item[m.modality] = max(self._next_item.get(m.modality, 0), item + 1)
        before = [self._ids[m.open]] if m.open else []
        after = [self._ids[m.close]] if m.close else []
        start = len(self._sentence.ids) + len(before)
        self.ids(before + [self._ids[m.placeholder]] * m.count + after, target=False)
        self._sentence.spans.append(Span(m.modality, item, start, m.count, len(before), len(after)))
        return self

    def _by_modality(self, modality: str) -> Marker:
        for m in self.markers:
            if m.modality == modality:
                return m
        raise KeyError(f"SentenceBuilder: no marker for modality {modality!r}; markers: "
                       f"{[m.modality for m in self.markers]}")

    def expand(self, text: str, target: bool = True) -> SentenceBuilder:
        """Append ``text``, turning every marker in it into its span."""
        pos = 0
        for match in self._regex.finditer(text) if self._regex else ():
            self.text(text[pos:match.start()], target)
            m, number = self._matched(match)
            self.marker(m, None if number is None else int(number) - m.index_base)
            pos = match.end()
        return self.text(text[pos:], target)

    def _matched(self, match: re.Match) -> tuple[Marker, str | None]:
        groups = match.groups()
        index = 0
        for m in self.markers:
            width = 1 + ("{}" in m.text)
            if groups[index] is not None:
                return m, groups[index + 1] if width == 2 else None
            index += width
        raise AssertionError("unreachable: a match belongs to one marker")

    def build(self) -> Sentence:
        """The sentence so far; the builder starts over (item numbering too)."""
        sentence, self._sentence, self._next_item = self._sentence, Sentence(), {}
        return sentence


def placeholder_ids(tokenizer: Any, markers: Sequence[Marker]) -> dict[str, int]:
    """Modality → placeholder id (what :func:`fill_spans` needs), checked like :class:`SentenceBuilder`."""
    builder = SentenceBuilder(tokenizer, markers)
    return {m.modality: builder._ids[m.placeholder] for m in markers}


def expand(text: str, tokenizer: Any, markers: Sequence[Marker], target: bool = True) -> Sentence:
    """Expand ``text`` with markers into a :class:`Sentence` (see :class:`SentenceBuilder`)."""
    return SentenceBuilder(tokenizer, markers).expand(text, target).build()


def fill_spans(text_embeds: torch.Tensor, input_ids: torch.Tensor, spans: Sequence[Sequence[Span]],
               embeds: Mapping[str, torch.Tensor], placeholder_ids: Mapping[str, int]) -> torch.Tensor:
    """Fill every span of a batch with its item's embeddings (one :func:`splice` per modality).

    Args:
        text_embeds: ``[B, T, D]`` embeddings of ``input_ids``.
        input_ids: ``[B, T]`` with the placeholder ids at the spans.
        spans: ``B`` lists of spans; ``item`` indexes the modality's tensor in ``embeds``.
        embeds: modality → ``[K, M, D]`` embeddings of its K items (M = each span's length).
        placeholder_ids: modality → its placeholder id.

    Returns:
        ``[B, T, D]`` with every span filled (differentiable in ``text_embeds`` and ``embeds``).

    Raises:
        ValueError: a span's length differs from M, an item is out of range, a modality has no
            embeddings, or the placeholders in ``input_ids`` differ from the spans (splice's count check).
    """
    out = text_embeds
    for modality in sorted({s.modality for row in spans for s in row} | set(embeds)):
        ordered = [s for row in spans for s in sorted(row, key=lambda s: s.start) if s.modality == modality]
        if modality not in embeds:
            raise ValueError(f"fill_spans: {len(ordered)} spans of modality {modality!r} but no embeddings "
                             f"(given: {sorted(embeds)})")
        out = splice(out, input_ids, placeholder_ids[modality], _gather_items(modality, ordered, embeds[modality]))
    return out


def embed_sentence(embed: Callable[[torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
                   spans: Sequence[Sequence[Span]], embeds: Mapping[str, torch.Tensor],
                   placeholder_ids: Mapping[str, int]) -> torch.Tensor:
    """Every generative family's input: ``input_ids [B, T]`` embedded by ``embed`` (the LM's token embedding) with
    each span filled from ``embeds`` (modality → ``[K, M, D]``) by :func:`fill_spans` → ``[B, T, D]``."""
    return fill_spans(embed(input_ids), input_ids, spans, embeds, placeholder_ids)


def _gather_items(modality: str, spans: Sequence[Span], items: torch.Tensor) -> torch.Tensor:
    """``[S, M, D]``: the embeddings of each span's item, in span order."""
    for s in spans:
        if s.length != items.shape[1] or not 0 <= s.item < items.shape[0]:
            raise ValueError(f"fill_spans: span {s} does not fit {modality!r} embeddings of shape "
                             f"{tuple(items.shape)} (need length == M and 0 <= item < K)")
    index = torch.tensor([s.item for s in spans], dtype=torch.long, device=items.device)
    return items.index_select(0, index)
