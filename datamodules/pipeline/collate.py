"""Examples → :class:`mmlm.batch.Batch`: tokenise prompt + target, build labels and left-padded prompts.

Shape legend: B batch, T text tokens, P prompt tokens, H/W image height/width.

Sequence layout of one example (``max_text_tokens`` caps the whole sequence; eos, the end token, is kept)::

    input_ids  = [bos]? prompt_ids target_ids eos pad…      (right-padded)
    labels     = -100…  -100…     target_ids eos -100…
    prompt_ids = pad… [bos]? prompt_ids                      (left-padded, for generation)

The target is tokenised as ``" " + target`` when the prompt is non-empty (so "Answer: red"
tokenises like running text), else as ``target``. All tokenizer calls use
``add_special_tokens=False``; bos/eos/pad come from the tokenizer's ids. The token that ends each target is the
tokenizer's eos unless the collator is given another ``end_token_id`` (the model's
:attr:`~mmlm.data_spec.DataSpec.end_token_id`: ``"\\n"`` for LAVIS's BLIP-2 OPT checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mmlm.batch import Batch
from mmlm.losses import IGNORE_INDEX


@dataclass
class Example:
    """One decoded sample before collation.

    Attributes:
        image: ``[3, H, W]`` normalised pixels.
        prompt: text the model is conditioned on (``""`` for plain captioning).
        target: text the model learns to produce.
        references: all reference strings (captions or the human answers) for metrics.
        id: evaluation id (``image_id`` or ``question_id`` with its JSON type, else the sample key).
        task: ``"caption"``, ``"vqa"`` or ``"gqa"``.
        key: the shard sample's ``__key__``.
        question_type: VQA question type, ``""`` where unknown.
        answer_type: VQA answer type (``"yes/no"``, ``"number"``, ``"other"``), ``""`` where unknown.
    """

    image: torch.Tensor
    prompt: str
    target: str
    references: list[str]
    id: Any
    task: str
    key: str
    question_type: str = field(default="")
    answer_type: str = field(default="")


def token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text without special tokens (``[]`` for an empty text)."""
    if not any(texts):
        return [[] for _ in texts]
    return [list(ids) if text else [] for ids, text in zip(tokenizer(texts, add_special_tokens=False)["input_ids"], texts)]


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to eos (GPT-2 style tokenizers have no pad)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither a pad nor an eos token id")
    return pad


def sequence(prefix: list[int], target: list[int], eos: int, max_tokens: int) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` of ``prefix + target + [eos]`` cut to ``max_tokens`` (eos kept), prefix masked."""
    body = (prefix + target)[: max_tokens - 1]
    ids = body + [eos]
    n_prefix = min(len(prefix), len(body))
    return ids, [IGNORE_INDEX] * n_prefix + ids[n_prefix:]


def pad_right(rows: list[list[int]], value: int) -> torch.Tensor:
    """``[B, max_len]`` tensor of ``rows`` padded on the right with ``value``."""
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), width)


def pad_left(rows: list[list[int]], value: int) -> torch.Tensor:
    """``[B, max_len]`` tensor of ``rows`` padded on the left with ``value``."""
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([[value] * (width - len(r)) + r for r in rows], dtype=torch.long).reshape(len(rows), width)


def end_token(tokenizer: Any, end_token_id: int | None = None) -> int:
    """The id that ends every target: ``end_token_id``, else the tokenizer's eos.

    Raises:
        ValueError: neither is set, or ``end_token_id`` lies outside the tokenizer's ids (both named).
    """
    if end_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no eos token id; collate needs one (or an end_token_id) "
                             "to end targets")
        return tokenizer.eos_token_id
    if not 0 <= end_token_id < len(tokenizer):
        raise ValueError(f"end_token_id={end_token_id} is not an id of {type(tokenizer).__name__} "
                         f"({len(tokenizer)} ids)")
    return end_token_id


def instructions(prompts: list[str], tokenizer: Any, max_text_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``B`` prompts in ``tokenizer`` with its special tokens (BERT: ``[CLS] prompt [SEP]``), right-padded and cut at
    ``max_text_tokens`` as transformers' ``InstructBlipProcessor`` gives ``qformer_input_ids`` →
    ``ids, mask [B, Q]``."""
    encoded = tokenizer(prompts, padding="longest", truncation=True, max_length=max_text_tokens, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def collate_examples(examples: list[Example], tokenizer: Any, max_text_tokens: int,
                     end_token_id: int | None = None, instruction_tokenizer: Any = None) -> Batch:
    """Collate examples into a :class:`Batch` (see the module docstring for the token layout).

    Args:
        examples: ``B`` examples with equally sized images ``[3, H, W]``.
        tokenizer: a Hugging Face tokenizer (``eos_token_id`` required unless ``end_token_id``; bos used when set).
        max_text_tokens: cap on ``T`` (and ``P``); the end token always survives truncation.
        end_token_id: the token that ends every target (:func:`end_token`); ``None``: the tokenizer's eos.
        instruction_tokenizer: when given, each prompt is also tokenised with it (:func:`instructions`).

    Returns:
        A batch with ``pixels [B, 3, H, W]``, ``input_ids/attention_mask/labels [B, T]``,
        ``prompt_ids/prompt_mask [B, P]`` and, with an instruction tokenizer, ``instruction_ids/instruction_mask [B, Q]``.
    """
    bos, end, pad = tokenizer.bos_token_id, end_token(tokenizer, end_token_id), pad_id(tokenizer)
    start = [bos] if bos is not None else []
    prompts = [start + ids for ids in token_ids(tokenizer, [e.prompt for e in examples])]
    targets = token_ids(tokenizer, [" " + e.target if e.prompt else e.target for e in examples])
    seqs = [sequence(p, t, end, max_text_tokens) for p, t in zip(prompts, targets)]
    ids = [s[0] for s in seqs]
    prompt_rows = [p[:max_text_tokens] for p in prompts]
    instruction_ids = instruction_mask = None
    if instruction_tokenizer is not None:
        instruction_ids, instruction_mask = instructions([e.prompt for e in examples], instruction_tokenizer,
                                                         max_text_tokens)
    return Batch(
        pixels=torch.stack([e.image for e in examples]),
        input_ids=pad_right(ids, pad),
        attention_mask=pad_right([[1] * len(r) for r in ids], 0),
        labels=pad_right([s[1] for s in seqs], IGNORE_INDEX),
        prompt_ids=pad_left(prompt_rows, pad),
        prompt_mask=pad_left([[1] * len(r) for r in prompt_rows], 0),
        keys=[e.key for e in examples],
        tasks=[e.task for e in examples],
        references=[list(e.references) for e in examples],
        ids=[e.id for e in examples],
        question_types=[e.question_type for e in examples],
        answer_types=[e.answer_type for e in examples],
        instruction_ids=instruction_ids,
        instruction_mask=instruction_mask,
    )


@dataclass(frozen=True)
class Collator:
    """Picklable ``list[Example] -> Batch`` for DataLoader workers (wraps :func:`collate_examples`)."""

    tokenizer: Any
    max_text_tokens: int
    end_token_id: int | None = None
    instruction_tokenizer: Any = None

    def __call__(self, examples: list[Example]) -> Batch:
        return collate_examples(examples, self.tokenizer, self.max_text_tokens, self.end_token_id,
                                self.instruction_tokenizer)
