"""Every batch type moves with one mixin: ``to`` and ``pin_memory`` reach each tensor field and each tensor of a
dict field; plain Python fields and ``None`` stay as they are."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mmlm.batch import Batch, ImageBatch, MovesTensors, PairBatch, SentenceBatch, TextBatch


def examples() -> list[MovesTensors]:
    ids = torch.ones(2, 3, dtype=torch.long)
    pixels = torch.zeros(2, 3, 4, 4)
    return [
        Batch(pixels=pixels, input_ids=ids, attention_mask=ids, labels=ids, prompt_ids=ids, prompt_mask=ids,
              keys=["a", "b"]),
        SentenceBatch(input_ids=ids, attention_mask=ids, labels=ids, position_ids=ids, segment_ids=ids,
                      images=pixels, modalities={"state": torch.zeros(2, 5)}, keys=["a", "b"]),
        ImageBatch(pixels=pixels, keys=["a", "b"]),
        TextBatch(input_ids=ids, attention_mask=ids, keys=["a", "b"]),
        PairBatch(pixels_left=pixels, pixels_right=pixels, input_ids=ids, attention_mask=ids,
                  targets=torch.ones(2, dtype=torch.long), keys=["a", "b"]),
    ]


@pytest.mark.parametrize("batch", examples(), ids=lambda b: type(b).__name__)
def test_to_reaches_every_tensor_and_keeps_the_rest(batch):
    moved = batch.to(torch.float64)
    assert moved is batch
    for item in dataclasses.fields(batch):
        value = getattr(batch, item.name)
        if isinstance(value, torch.Tensor):
            assert value.dtype == torch.float64, item.name
        elif isinstance(value, dict):
            assert all(v.dtype == torch.float64 for v in value.values()), item.name
    assert batch.keys == ["a", "b"]
    if isinstance(batch, SentenceBatch):
        assert batch.prompt_ids is None  # None stays None


def test_every_batch_dataclass_of_the_module_uses_the_mixin():
    import inspect

    import mmlm.batch

    batches = [value for name, value in vars(mmlm.batch).items() if inspect.isclass(value)
               and dataclasses.is_dataclass(value) and value.__module__ == "mmlm.batch"]
    assert len(batches) == 5 and all(issubclass(value, MovesTensors) for value in batches)
