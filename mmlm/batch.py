"""Typed batches that flow from ``datamodules`` into every model.

Shape legend: B batch, T text tokens, P prompt tokens, H/W image height/width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
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
        tasks: ``B`` task names, ``"caption"`` or ``"vqa"``.
        references: ``B`` lists of reference strings (captions, or the human answers).
        ids: ``B`` evaluation ids (``image_id`` for captions, ``question_id`` for VQA).
        question_types: ``B`` question types (VQA), ``""`` where unknown.
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
    ids: list[str] = field(default_factory=list)
    question_types: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def pin_memory(self) -> Batch:
        """Pin the tensors (called by ``DataLoader(pin_memory=True)``)."""
        for name in ("pixels", "input_ids", "attention_mask", "labels", "prompt_ids", "prompt_mask"):
            setattr(self, name, getattr(self, name).pin_memory())
        return self
