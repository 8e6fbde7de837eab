"""EmbodiedDataModule: markers expanded into spans, items per modality, loss masks, prompts, skips."""

from __future__ import annotations

import json

import pytest
import torch

from datamodules.embodied import EmbodiedDataModule, rewrite_markers
from datamodules.formats.shards import ShardWriter
from datamodules.synthetic.tabletop import OBJECT_DIM, STATE_DIM, write_tabletop
from mmlm.models.palme import OBJECT_TOKEN, STATE_TOKEN, palme_markers
from mmlm.tokenizers import IMAGE_TOKEN

IMAGE_TOKENS, STATE_TOKENS = 4, 3


@pytest.fixture(scope="module")
def tabletop(tmp_path_factory):
    out = tmp_path_factory.mktemp("tabletop")
    write_tabletop(out, train=40, val=24, seed=0, shard_size=20, progress=False)
    return out


def datamodule(data, modalities=("image", "state", "object"), **kwargs) -> EmbodiedDataModule:
    dm = EmbodiedDataModule(train_urls=str(data / "train" / "tabletop-*.tar"), val_urls=str(data / "val" / "tabletop-*.tar"),
                            modalities=list(modalities), tokenizer=str(data / "tokenizer"),
                            markers=palme_markers(IMAGE_TOKENS, STATE_TOKENS), image_size=32, state_dim=STATE_DIM,
                            object_dim=OBJECT_DIM, batch_size=24,
                            num_workers=0, **kwargs)
    dm.setup()
    return dm


def first_val_batch(dm):
    return next(iter(dm.val_dataloader()))


def test_rewrite_markers_expands_objects_and_drops_left_out_modalities():
    prompt = "Q: what moved between <img1> and <img2>? State: <state> Objects: <obj> A:"
    assert rewrite_markers(prompt, ["image", "state", "object"], 3) == \
        "Q: what moved between <img1> and <img2>? State: <state> Objects: <obj1><obj2><obj3> A:"
    assert rewrite_markers(prompt, ["object"], 2) == "Q: what moved between and ? State: Objects: <obj1><obj2> A:"
    assert rewrite_markers(prompt, [], 2) == "Q: what moved between and ? State: Objects: A:"


def test_spans_hold_placeholders_and_match_the_items(tabletop):
    dm = datamodule(tabletop)
    batch = first_val_batch(dm)
    tok = dm.tokenizer
    ids = {m: tok.convert_tokens_to_ids(t) for m, t in (("image", IMAGE_TOKEN), ("state", STATE_TOKEN),
                                                          ("object", OBJECT_TOKEN))}
    counts = {"image": IMAGE_TOKENS, "state": STATE_TOKENS, "object": 1}
    for row, spans in enumerate(batch.spans):
        for span in spans:
            assert span.length == counts[span.modality]
            assert (batch.input_ids[row, span.start:span.start + span.length] == ids[span.modality]).all()
        assert sum(s.length for s in spans) == sum(int((batch.input_ids[row] == i).sum()) for i in ids.values())
    inputs = batch.inputs()
    assert inputs["image"].shape[1:] == (3, 32, 32) and inputs["state"].shape[1] == STATE_DIM
    assert inputs["object"].shape[1] == OBJECT_DIM
    for modality in ids:  # every item is used by exactly the spans that name it
        used = sorted(s.item for spans in batch.spans for s in spans if s.modality == modality)
        assert used == list(range(inputs[modality].shape[0]))


def test_before_after_samples_get_two_images_and_objects_one_token_each(tabletop):
    batch = first_val_batch(datamodule(tabletop))
    moved = [i for i, t in enumerate(batch.question_types) if t == "moved"]
    assert moved, "the val batch should hold a before/after question"
    for row in moved:
        images = [s for s in batch.spans[row] if s.modality == "image"]
        assert len(images) == 2 and images[1].item == images[0].item + 1
    with_objects = [spans for spans in batch.spans if any(s.modality == "object" for s in spans)]
    assert with_objects and all(3 <= sum(s.modality == "object" for s in spans) <= 4 for spans in with_objects)


def test_labels_cover_target_and_eos_only(tabletop):
    dm = datamodule(tabletop)
    batch = first_val_batch(dm)
    for row in range(len(batch)):
        labelled = batch.labels[row] != -100
        target = dm.tokenizer(" " + batch.references[row][0], add_special_tokens=False)["input_ids"]
        assert batch.labels[row][labelled].tolist() == target + [dm.tokenizer.eos_token_id]
        assert torch.equal(batch.labels[row][labelled], batch.input_ids[row][labelled])
        first = int(labelled.nonzero()[0])
        assert all(s.start + s.length <= first for s in batch.spans[row])  # spans live in the prompt


def test_prompts_are_left_padded_prefixes_with_their_own_spans(tabletop):
    batch = first_val_batch(datamodule(tabletop))
    width = batch.prompt_ids.shape[1]
    for row in range(len(batch)):
        prompt = batch.prompt_ids[row][batch.prompt_mask[row].bool()]
        assert torch.equal(batch.input_ids[row, :len(prompt)], prompt)
        assert [(s.modality, s.item, s.start - (width - len(prompt))) for s in batch.prompt_spans[row]] == \
            [(s.modality, s.item, s.start) for s in batch.spans[row]]
    assert set(batch.tasks) == {"vqa", "plan"}


def test_text_only_keeps_the_words_and_drops_every_span(tabletop):
    full, text = first_val_batch(datamodule(tabletop)), first_val_batch(datamodule(tabletop, modalities=()))
    assert all(not spans for spans in text.spans) and text.images.shape[0] == 0 and not text.modalities
    for row in range(len(full)):
        in_spans = torch.zeros_like(full.input_ids[row], dtype=torch.bool)
        for s in full.spans[row]:
            in_spans[s.start:s.start + s.length] = True
        words = full.input_ids[row][~in_spans & full.attention_mask[row].bool()]
        assert torch.equal(words, text.input_ids[row][text.attention_mask[row].bool()])


def test_bad_samples_are_skipped_and_counted(tabletop, tmp_path):
    good = json.dumps({"task": "vqa", "prompt": "<img1> Q: how many blocks are on the table? A:", "target": "2",
                       "state": [0.0] * STATE_DIM, "objects": [[0.0] * OBJECT_DIM]}).encode()
    writer = ShardWriter(tmp_path, 10, "bad-")
    writer.write({"__key__": "0", "json": good})  # no img1.png
    writer.write({"__key__": "1", "json": b"{\"task\": \"dance\"}"})
    writer.write({"__key__": "2", "json": json.dumps({"task": "vqa", "prompt": "<state> A:", "target": "2",
                                                       "state": [1.0, 2.0]}).encode()})
    writer.close()
    dm = datamodule(tabletop, max_text_tokens=160)
    dm.sources["validate"][0].urls = str(tmp_path / "bad-*.tar")
    assert list(dm.val_dataloader()) == []
    assert dm.skipped == {"missing_image": 1, "bad_sentence": 1, "bad_state": 1}


def test_too_long_sentences_are_skipped_not_cut(tabletop):
    dm = datamodule(tabletop, max_text_tokens=30)
    batches = list(dm.val_dataloader())
    kept = sum(len(b) for b in batches)
    assert dm.skipped.get("too_long", 0) > 0 and kept + dm.skipped["too_long"] == 24
    assert all(b.attention_mask.sum(1).max() <= 30 for b in batches)
