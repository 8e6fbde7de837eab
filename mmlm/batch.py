"""Typed batches that flow from ``datamodules`` into every model, all moved by one mixin (:class:`MovesTensors`).

Shape legend: B batch, T text tokens, P prompt tokens, H/W image height/width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import Self

if TYPE_CHECKING:
    from mmlm.sentences import Span


class MovesTensors:
    """Mixin of every batch dataclass: :meth:`to` and :meth:`pin_memory` apply to each tensor field, and to each
    tensor of a ``dict`` field (``None`` and plain Python fields stay as they are). Lightning moves a batch to the
    device with ``to``; ``DataLoader(pin_memory=True)`` calls ``pin_memory``."""

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Self:
        """Replace every tensor field ``t`` with ``fn(t)`` in place; returns ``self``."""
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, torch.Tensor):
                setattr(self, item.name, fn(value))
            elif isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
                setattr(self, item.name, {key: fn(v) for key, v in value.items()})
        return self

    def to(self, *args: Any, **kwargs: Any) -> Self:
        """Move every tensor (``Tensor.to`` arguments)."""
        return self.apply(lambda t: t.to(*args, **kwargs))

    def pin_memory(self) -> Self:
        """Pin every tensor."""
        return self.apply(lambda t: t.pin_memory())


@dataclass
class Batch(MovesTensors):
    """One collated batch of image + text examples.

    Every example is ``image, prompt, target``: a caption sample has an empty (or fixed)
    prompt and the caption as target; a VQA sample has ``"Question: … Answer:"`` as prompt
    and an answer as target. Teacher-forced training uses ``input_ids``/``labels``;
    generation uses the left-padded ``prompt_ids``.

    Attributes:
        pixels: ``[B, 3, H, W]`` float images, normalised with the encoder's mean/std.
        input_ids: ``[B, T]`` prompt + target + eos, right-padded.
        attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding.
        labels: ``[B, T]`` copy of ``input_ids`` with prompt and padding set to ``-100``.
        prompt_ids: ``[B, P]`` prompt only, left-padded (for generation).
        prompt_mask: ``[B, P]`` 1 for real prompt tokens.
        keys: ``B`` sample keys (``__key__`` of the shard sample).
        tasks: ``B`` task names (``"caption"``, ``"vqa"``, ``"gqa"``; documents: the document task).
        references: ``B`` lists of reference strings (captions, or the human answers).
        ids: ``B`` evaluation ids as the data has them (``image_id`` for captions, ``question_id`` for VQA;
            integers for COCO and VQAv2), else the sample keys.
        question_types: ``B`` question types (VQA), ``""`` where unknown.
        answer_types: ``B`` answer types (VQA: ``"yes/no"``, ``"number"``, ``"other"``), ``""`` where unknown.
        features: ``[B, N, D]`` cached frozen-encoder features (``mmlm data cache-features``) or ``None``;
            when set, ``pixels`` is ``[B, 0]`` and the model's frozen encoder returns these instead of running.
        instruction_ids: ``[B, Q]`` each prompt in the model's instruction tokenizer
            (:attr:`~mmlm.data_spec.DataSpec.instruction_tokenizer`), right-padded, or ``None`` without one.
        instruction_mask: ``[B, Q]`` 1 for real instruction tokens, or ``None``.
    """

    pixels: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    keys: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    references: list[list[str]] = field(default_factory=list)
    ids: list[Any] = field(default_factory=list)
    question_types: list[str] = field(default_factory=list)
    answer_types: list[str] = field(default_factory=list)
    features: torch.Tensor | None = None
    instruction_ids: torch.Tensor | None = None
    instruction_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.pixels.shape[0]


@dataclass
class SentenceBatch(MovesTensors):
    """A batch of multimodal sentences, padded or packed: the input of every generative family (KOSMOS-1 interleaved
    documents, PaLM-E prompts; Frozen, BLIP-2 and MetaLM examples, whose sentence starts with one image span).

    Each row holds one sentence, or several packed ones (``segment_ids`` tells them apart; attention
    never crosses them and ``position_ids`` restart at 0 for each). Spans (:class:`mmlm.sentences.Span`)
    say where each modality item goes; after collation ``span.item`` indexes the batch-wide tensor of
    its modality (``images`` for ``"image"``, ``modalities[name]`` otherwise), so one item may fill
    several spans and items are encoded once.

    Shape legend: B rows, T tokens, P prompt tokens, I images in the batch, S items of another modality.

    Attributes:
        input_ids: ``[B, T]`` right-padded; spans hold placeholder ids (wrappers around them).
        attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding.
        labels: ``[B, T]`` ``input_ids`` where the LM loss applies, ``-100`` on placeholders, wrappers,
            padding and prompts.
        position_ids: ``[B, T]`` position of each token within its own sentence (0 on padding).
        segment_ids: ``[B, T]`` 1, 2, … for the packed sentences of a row, 0 on padding.
        spans: ``B`` lists of spans in reading order, items global to the batch.
        images: ``[I, 3, H, W]`` every image item of the batch in item order (``I = 0`` allowed).
        modalities: other modality inputs by name, e.g. ``"state": [S, Ds]``, ``"object": [S, Do]``.
        prompt_ids: ``[B, P]`` left-padded prompts for generation (evaluation), else ``[B, 0]``.
        prompt_mask: ``[B, P]`` 1 for real prompt tokens.
        prompt_spans: ``B`` lists of spans with positions in ``prompt_ids`` (same global items).
        prompt_labels: ``[B, P]`` the demonstrations' targets inside few-shot prompts (``-100`` elsewhere: the task
            input MetaLM encodes), or ``None``.
        features: ``[I, N, Dv]`` cached frozen-encoder features of the images (``mmlm data cache-features``) or
            ``None``; when set, ``images`` is ``[I, 0]`` and the frozen encoder does not run.
        instruction_ids: ``[I, Q]`` per image item, the prompt of the example it belongs to in the model's
            instruction tokenizer (BLIP-2's instruction-aware queries), right-padded; ``None`` without one.
        instruction_mask: ``[I, Q]`` 1 for real instruction tokens, or ``None``.
        keys: sample keys, one per sentence (several per packed row).
        tasks: ``B`` task names for evaluation rows (``"vqa"``, ``"caption"``), else empty.
        references: ``B`` lists of reference strings (evaluation).
        ids: ``B`` evaluation ids (their data type kept).
        question_types: ``B`` VQA question types (evaluation).
        answer_types: ``B`` VQA answer types (evaluation).
        num_samples: sentences in the batch (more than ``B`` when packed).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    spans: list[list[Span]] = field(default_factory=list)
    images: torch.Tensor = field(default_factory=lambda: torch.empty(0, 3, 0, 0))
    modalities: dict[str, torch.Tensor] = field(default_factory=dict)
    prompt_ids: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    prompt_spans: list[list[Span]] = field(default_factory=list)
    prompt_labels: torch.Tensor | None = None
    features: torch.Tensor | None = None
    instruction_ids: torch.Tensor | None = None
    instruction_mask: torch.Tensor | None = None
    keys: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    references: list[list[str]] = field(default_factory=list)
    ids: list[Any] = field(default_factory=list)
    question_types: list[str] = field(default_factory=list)
    answer_types: list[str] = field(default_factory=list)
    num_samples: int = 0

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def packed(self) -> bool:
        """True when some row holds more than one sentence."""
        return bool((self.segment_ids.amax(dim=1) > 1).any()) if self.segment_ids.numel() else False

    def inputs(self) -> dict[str, torch.Tensor]:
        """Every modality's item tensor by name (``"image"`` → ``images``)."""
        return {"image": self.images, **self.modalities}

    def padding_fraction(self) -> float:
        """Share of the ``B × T`` positions that are padding."""
        return 1.0 - float(self.attention_mask.float().mean()) if self.attention_mask.numel() else 0.0


@dataclass
class ImageBatch(MovesTensors):
    """Images only: ``pixels [B, 3, H, W]`` (normalised), sample ``keys`` and ``ids`` (``image_id`` else key)."""

    pixels: torch.Tensor
    keys: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.pixels.shape[0]

    @property
    def attention_mask(self) -> torch.Tensor:
        """``[B, 0]``: an image batch has no text tokens (the shared tokens/s logging reads 0)."""
        return self.pixels.new_zeros(len(self), 0)


@dataclass
class TextBatch(MovesTensors):
    """Text only: ``input_ids [B, T]`` (``text eos``, right-padded), ``attention_mask [B, T]`` and ``keys``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    keys: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class PairBatch(MovesTensors):
    """Two images and a statement per example.

    Attributes:
        pixels_left: ``[B, 3, H, W]``.
        pixels_right: ``[B, 3, H, W]``.
        input_ids: ``[B, T]`` statement + eos, right-padded.
        attention_mask: ``[B, T]``.
        targets: ``[B]`` long, 1 = the statement is true.
        keys: sample keys.
        ids: sample ids (``json["id"]``, else the key).
    """

    pixels_left: torch.Tensor
    pixels_right: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    keys: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.targets.shape[0]
