"""``mmlm.sentences``: marker expansion, span records, truncation and span filling (count-checked)."""

from __future__ import annotations

import pytest
import torch

from datamodules.pipeline.packing import SentenceSample, collate_rows
from mmlm.sentences import (
    IGNORE_INDEX,
    Marker,
    SentenceBuilder,
    Span,
    expand,
    fill_spans,
    kosmos_image_marker,
    placeholder_ids,
    special_tokens,
)
from mmlm.tokenizers import train_word_tokenizer

WORDS = ["a red circle and a blue square", "the robot picks the block", "question answer"]
PALME = [Marker("<img{}>", "image", 3, "<img_embed>"), Marker("<state>", "state", 1, "<state_embed>"),
         Marker("<obj{}>", "object", 2, "<obj_embed>")]


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_word_tokenizer(WORDS)
    markers = [kosmos_image_marker(4), *PALME]
    tok.add_special_tokens({"additional_special_tokens": special_tokens(markers)})
    return tok


def test_kosmos_expansion_wraps_each_image_and_records_spans(tokenizer):
    s = expand("a red circle <image> and a blue square <image>", tokenizer, [kosmos_image_marker(4)])
    tok = tokenizer.convert_tokens_to_ids
    open_, emb, close = tok("<image>"), tok("<image_embed>"), tok("</image>")
    words = tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    assert s.ids[:3] == words and s.ids[3:9] == [open_, emb, emb, emb, emb, close]
    assert s.spans == [Span("image", 0, 4, 4, 1, 1), Span("image", 1, 4 + 6 + 4, 4, 1, 1)]
    assert s.ids[s.spans[1].start - 1] == open_ and s.ids[s.spans[1].start + 4] == close
    labels = s.labels()
    assert labels[:3] == words and all(labels[i] == IGNORE_INDEX for i in range(3, 9))  # wrappers too


def test_named_markers_give_item_indices_modalities_and_counts(tokenizer):
    s = expand("<img2> the robot <state> picks <obj1> <img1> <obj3>", tokenizer, PALME)
    assert [(sp.modality, sp.item, sp.length) for sp in s.spans] == [
        ("image", 1, 3), ("state", 0, 1), ("object", 0, 2), ("image", 0, 3), ("object", 2, 2)]
    assert [s.ids[sp.start] for sp in s.spans] == tokenizer.convert_tokens_to_ids(
        ["<img_embed>", "<state_embed>", "<obj_embed>", "<img_embed>", "<obj_embed>"])
    assert s.items("image") == [1, 0]


def test_prompt_plus_target_masks_the_prompt_and_shifts_spans(tokenizer):
    builder = SentenceBuilder(tokenizer, [kosmos_image_marker(2)])
    prompt = builder.expand("<image> question").build().as_prompt()
    full = prompt + builder.text("answer").build()
    assert full.labels() == [IGNORE_INDEX] * len(prompt) + tokenizer("answer", add_special_tokens=False)["input_ids"]
    assert full.spans == prompt.spans


def test_truncation_never_cuts_a_span(tokenizer):
    s = expand("a <image> red <image> circle", tokenizer, [kosmos_image_marker(4)])  # a [6] red [6] circle
    assert len(s) == 15
    assert s.truncate(10).ids == s.ids[:8] and len(s.truncate(10).spans) == 1  # cut inside span 2 → drop it
    assert s.truncate(14).ids == s.ids[:14] and len(s.truncate(14).spans) == 2
    assert len(s.truncate(3).spans) == 0 and len(s.truncate(3)) == 1


def test_builder_rejects_unknown_tokens_and_shared_placeholders(tokenizer):
    with pytest.raises(ValueError, match="no token '<nope>'"):
        SentenceBuilder(tokenizer, [Marker("<x>", "x", 1, "<nope>")])
    with pytest.raises(ValueError, match="own placeholder"):
        SentenceBuilder(tokenizer, [Marker("<a>", "a", 1, "<img_embed>"), Marker("<b>", "b", 1, "<img_embed>")])


def _batch(tokenizer):
    markers = [kosmos_image_marker(2), Marker("<state>", "state", 1, "<state_embed>")]
    one = SentenceSample(expand("a <image> red <state> <image>", tokenizer, markers),
                         {"image": torch.zeros(2, 3, 4, 4), "state": torch.zeros(1, 5)})
    two = SentenceSample(expand("<state> <image> a", tokenizer, markers),
                         {"image": torch.zeros(1, 3, 4, 4), "state": torch.zeros(1, 5)})
    return collate_rows([[one], [two]], pad_id=tokenizer.pad_token_id), placeholder_ids(tokenizer, markers)


def test_fill_spans_puts_each_items_embeddings_at_its_span_with_global_items(tokenizer):
    batch, ids = _batch(tokenizer)
    assert [[(s.modality, s.item) for s in row] for row in batch.spans] == [
        [("image", 0), ("state", 0), ("image", 1)], [("state", 1), ("image", 2)]]
    images = torch.arange(3 * 2 * 3, dtype=torch.float32).view(3, 2, 3) + 100  # [K=3, M=2, D=3]
    states = -torch.arange(1, 7, dtype=torch.float32).view(2, 1, 3)
    text = torch.zeros(*batch.input_ids.shape, 3, requires_grad=True)
    out = fill_spans(text, batch.input_ids, batch.spans, {"image": images, "state": states}, ids)
    for r, row in enumerate(batch.spans):
        for s in row:
            source = images if s.modality == "image" else states
            torch.testing.assert_close(out[r, s.start:s.start + s.length], source[s.item], rtol=0, atol=0)
    filled = sum(s.length for row in batch.spans for s in row)
    assert int((out.abs().sum(-1) > 0).sum()) == filled  # nothing else changed
    out.sum().backward()
    assert text.grad is not None


def test_fill_spans_checks_counts(tokenizer):
    batch, ids = _batch(tokenizer)
    images, states = torch.zeros(3, 2, 3), torch.zeros(2, 1, 3)
    with pytest.raises(ValueError, match="does not fit"):
        fill_spans(torch.zeros(2, batch.input_ids.shape[1], 3), batch.input_ids, batch.spans,
                   {"image": torch.zeros(3, 5, 3), "state": states}, ids)
    with pytest.raises(ValueError, match="does not fit"):
        fill_spans(torch.zeros(2, batch.input_ids.shape[1], 3), batch.input_ids, batch.spans,
                   {"image": images[:2], "state": states}, ids)
    with pytest.raises(ValueError, match="no embeddings"):
        fill_spans(torch.zeros(2, batch.input_ids.shape[1], 3), batch.input_ids, batch.spans, {"image": images}, ids)
    dropped = [row[:-1] for row in batch.spans]  # spans and ids disagree → splice's count check
    with pytest.raises(ValueError, match="placeholder tokens"):
        fill_spans(torch.zeros(2, batch.input_ids.shape[1], 3), batch.input_ids, dropped,
                   {"image": images, "state": states}, ids)


def test_raw_text_never_becomes_special_ids_but_code_markers_do():
    from byte_tokenizers import byte_bpe_tokenizer

    tok = byte_bpe_tokenizer(["a red circle and a blue square."])
    tok.add_special_tokens({"additional_special_tokens": kosmos_image_marker(2).tokens()})
    text = "a red </s> circle <pad> and <s> a square"
    builder = SentenceBuilder(tok, [kosmos_image_marker(2)]).ids([tok.bos_token_id], target=False)
    sentence = builder.text(text).marker("image").ids([tok.eos_token_id]).build()
    body = sentence.ids[1:-5]  # bos … <image> <image_embed> × 2 </image> eos
    assert tok.decode(body) == text
    assert not set(body) & set(tok.all_special_ids)
    assert sentence.ids[0] == tok.bos_token_id and sentence.ids[-1] == tok.eos_token_id
    assert sentence.ids[-5:-1] == tok.convert_tokens_to_ids(["<image>", "<image_embed>", "<image_embed>", "</image>"])
