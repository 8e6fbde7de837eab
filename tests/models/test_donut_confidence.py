"""Per-field confidence of Donut predictions: one teacher-forced pass (``DocumentModule.token_probabilities``) whose
token probabilities are the model's own loss, grouped per field by the functions the report uses too, in the rows of
validation and ``predict``."""

from __future__ import annotations

import pytest
import torch
from test_donut import doc_batch, piece_donut

from mmlm.batch import Batch
from mmlm.evaluation import ResultFiles
from mmlm.evaluation.documents import DocumentEvaluator, field_confidences

TEXTS = ["<s_cord-v2><s_total>12.50</s_total>", "<s_cord-v2><s_name>Latte</s_name><s_total>3.50</s_total>"]


@pytest.fixture(scope="module")
def donut(tmp_path_factory):
    return piece_donut(tmp_path_factory.mktemp("tok"))


def teacher_forced_loss(model, pixels: torch.Tensor, text: str) -> torch.Tensor:
    """The model's training loss of ``text`` after its first token (the prompt), no eos."""
    ids = torch.tensor([model.tokenizer(text, add_special_tokens=False).input_ids])
    labels = ids.clone()
    labels[:, 0] = -100
    batch = Batch(pixels=pixels, input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                  prompt_ids=ids[:, :1], prompt_mask=torch.ones(1, 1, dtype=torch.long))
    return model.training_loss(batch)


def test_token_probabilities_are_the_models_loss_and_padding_changes_none(donut):
    pixels = torch.stack([torch.full((3, 32, 32), float(i)) for i in range(2)])
    together = donut.token_probabilities(pixels, TEXTS)
    for i, text in enumerate(TEXTS):
        tokens, probabilities = together[i]
        assert tokens == donut.tokenizer.convert_ids_to_tokens(donut.tokenizer(text, add_special_tokens=False).input_ids)
        assert probabilities[0] is None and all(0 < p <= 1 for p in probabilities[1:])
        assert len(probabilities) == len(tokens)
        nll = -torch.tensor(probabilities[1:]).log().mean()
        torch.testing.assert_close(teacher_forced_loss(donut, pixels[i:i + 1], text), nll, rtol=1e-4, atol=1e-5)
        alone = donut.token_probabilities(pixels[i:i + 1], [text])[0]
        assert alone[0] == tokens and alone[1][1:] == pytest.approx(probabilities[1:], rel=1e-5)
    assert donut.token_probabilities(pixels[:1], [""]) == [([], [])]


def test_predict_and_validation_rows_carry_each_fields_mean_and_min_probability(donut, monkeypatch, tmp_path):
    batch = doc_batch(donut, [{"total": "12.50"}, {"name": "Latte", "total": "3.50"}])
    ids = [torch.tensor(donut.tokenizer(t, add_special_tokens=False).input_ids) for t in TEXTS]
    monkeypatch.setattr(donut, "generate_ids", lambda b: [(row[:1], row[1:]) for row in ids])
    expected = [field_confidences(tokens, probabilities, prediction) for (tokens, probabilities), prediction in zip(
        donut.token_probabilities(batch.pixels, TEXTS), [{"total": "12.50"}, {"name": "Latte", "total": "3.50"}])]
    assert set(expected[0]) == {"total"} and set(expected[1]) == {"name", "total"}
    tokens, probabilities = donut.token_probabilities(batch.pixels, TEXTS)[1]
    latte = probabilities[tokens.index("<s_name>") + 1:tokens.index("</s_name>")]
    assert expected[1]["name"] == pytest.approx({"mean": sum(latte) / len(latte), "min": min(latte)})
    total = probabilities[tokens.index("<s_total>") + 1:tokens.index("</s_total>")]
    assert expected[1]["total"] == pytest.approx({"mean": sum(total) / len(total), "min": min(total)})
    assert 0 < expected[0]["total"]["min"] <= expected[0]["total"]["mean"] <= 1
    for stage in ("predict", "val"):
        evaluator = DocumentEvaluator()
        rows = evaluator.step(donut, batch, stage).rows
        assert [r["prediction"] for r in rows] == [{"total": "12.50"}, {"name": "Latte", "total": "3.50"}]
        assert [r["confidence"] for r in rows] == expected
        evaluator.finish(donut, stage, ResultFiles(tmp_path, stage, 0))
        written = (tmp_path / "predictions" / f"{stage}-documents-step0.jsonl").read_text()
        assert '"confidence": {"total": {"mean": ' in written
    assert "confidence" not in DocumentEvaluator(confidence=False).step(donut, batch, "predict").rows[0]
