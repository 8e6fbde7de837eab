"""Where Donut's decoder looks while writing each field (the Donut paper's attention figures): the cross-attention
weights recorded by hooks equal transformers' own (``output_attentions`` in eager attention), each produced token's
row is a distribution over the encoder's tokens, and the fields pair with the parsed prediction's leaves."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from test_donut import piece_donut

from mmlm.app.report_confidence import DocumentConfidence, token_grid
from mmlm.language.cross_attention import recorded_cross_attention

TEXT = "<s_cord-v2><s_name>Latte</s_name><s_total>3.50</s_total>"


@pytest.fixture(scope="module")
def donut(tmp_path_factory):
    return piece_donut(tmp_path_factory.mktemp("tok"))


@torch.no_grad()
def test_recorded_cross_attention_equals_transformers_eager_weights(donut):
    pixels = torch.rand(2, 3, 32, 32)
    states = donut.encode_images(pixels)
    ids = torch.tensor([donut.tokenizer(TEXT, add_special_tokens=False).input_ids] * 2)
    embeds = donut.decoder.embed(ids)
    decoder = donut.decoder.model
    decoder.set_attn_implementation("eager")
    expected = decoder(inputs_embeds=embeds, encoder_hidden_states=states, output_attentions=True).cross_attentions
    ours = recorded_cross_attention(decoder, lambda: decoder(inputs_embeds=embeds, encoder_hidden_states=states))
    assert ours.shape == (2, len(expected), *expected[0].shape[1:])  # [B, L, heads, T, N]
    torch.testing.assert_close(ours, torch.stack(expected, dim=1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no encoder_attn modules"):
        recorded_cross_attention(donut.encoder, lambda: None)


def test_each_field_gets_a_map_over_the_document(donut):
    pixels = torch.rand(1, 3, 32, 32)
    tokens, attention = donut.token_attention(pixels, TEXT)
    assert attention.shape == (len(tokens), donut.encode_images(pixels).shape[1])
    assert attention[0].abs().sum() == 0  # the prompt token is never produced
    torch.testing.assert_close(attention[1:].sum(-1), torch.ones(len(tokens) - 1))

    buffer = io.BytesIO()
    Image.fromarray((torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy()).save(buffer, "PNG")
    record = {"text": TEXT, "prediction": {"name": "Latte", "total": "3.50"}}
    fields = DocumentConfidence(donut).field_attention(buffer.getvalue(), record)
    assert list(fields) == ["name", "total"]
    assert all(torch.isclose(heat.sum(), torch.tensor(1.0)) for heat in fields.values())
    html = DocumentConfidence(donut).attention_overlays(buffer.getvalue(), record)
    assert html.count("<img ") == 2 and 'title="total"' in html


def test_token_grid_keeps_the_documents_aspect():
    assert token_grid(48, 96, 128) == (6, 8)  # the tiny configs' Swin: 6 × 8 tokens for 96 × 128 px
    assert token_grid(16, 32, 32) == (4, 4)
    assert token_grid(7, 32, 32) is None  # a prime count cannot be a square-ish grid


def test_report_puts_each_documents_field_attention_under_it(donut, monkeypatch, tmp_path):
    """``add_model_views`` with a Donut checkpoint: confidence and one picture per field on each shown document."""
    import mmlm.app.report_attention as report_attention
    import mmlm.models.exported as exported
    from mmlm.app.report import Example, Page, add_model_views, document_row

    buffer = io.BytesIO()
    Image.fromarray((torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy()).save(buffer, "PNG")
    record = {"id": "r0", "key": "0", "task": "cord-v2", "text": TEXT, "prediction": {"name": "Latte", "total": "3.50"},
              "references": [{"name": "Latte", "total": "3.50"}]}
    example = Example("r0", record, {"png": buffer.getvalue()})
    monkeypatch.setattr(report_attention, "evaluated_checkpoint", lambda log_dir, config: tmp_path / "x.ckpt")
    monkeypatch.setattr(exported, "load_checkpoint", lambda path: donut)
    report = Page("t")
    (row,) = add_model_views(report, [(document_row(example), example)], tmp_path, {})
    assert set(record["confidence"]) == {"name", "total"}
    assert row.extra.count("<img ") == 2 and 'title="name"' in row.extra
    assert "the decoder's attention per field of 1 documents" in report.subtitle[-1]
