"""Composed evaluation: task scorers write the official result formats and score exactly those files; every rank
gathers every task in one order; no family overrides a private hook of the base module."""

from __future__ import annotations

import inspect
import json
from types import SimpleNamespace

import pytest
import torch
from reference.vqa_eval import official_vqa_accuracy

import mmlm.models
from mmlm.batch import Batch
from mmlm.evaluation import (
    CaptionScorer,
    Evaluation,
    GenerationEvaluator,
    GQAScorer,
    PlanScorer,
    ResultFiles,
    RetrievalEvaluator,
    VQAScorer,
    result_file,
)
from mmlm.evaluation import generation as generation_module
from mmlm.metrics.captioning import caption_scores
from mmlm.models.base import MultimodalModule


def batch(tasks: list[str], ids: list | None = None, references: list[list[str]] | None = None, **extra) -> Batch:
    n = len(tasks)
    empty = torch.zeros(n, 1, dtype=torch.long)
    return Batch(pixels=torch.zeros(n, 3, 4, 4), input_ids=empty, attention_mask=empty, labels=empty,
                 prompt_ids=empty, prompt_mask=empty, keys=[str(i) for i in range(n)], tasks=tasks,
                 references=references if references is not None else [["x"]] * n,
                 ids=ids if ids is not None else [f"id{i}" for i in range(n)], **extra)


def generator(*texts: str) -> SimpleNamespace:
    """A module whose ``generate_text`` returns ``texts``."""
    return SimpleNamespace(generate_text=lambda b: list(texts))


def files(tmp_path) -> ResultFiles:
    return ResultFiles(tmp_path, "val", 7, {"generation": {"num_beams": 5}})


def read(tmp_path, name: str, suffix: str = ".json"):
    return json.loads((tmp_path / "predictions" / f"val-{name}-step7{suffix}").read_text())


def test_rows_go_to_their_task_scorer_and_predict_rows_name_id_task_and_text():
    evaluator = GenerationEvaluator([VQAScorer(), PlanScorer(), CaptionScorer()])
    out = evaluator.step(generator("a", "1. pick red", "c"), batch(["vqa", "plan", "caption"], ids=[5, "p", 9]), "val")
    assert out.rows == [{"id": 5, "task": "vqa", "prediction": "a"}, {"id": "p", "task": "plan", "prediction": "1. pick red"},
                        {"id": 9, "task": "caption", "prediction": "c"}]
    assert evaluator._rows["vqa"] == [{"question_id": 5, "answer": "a", "answers": ["x"], "question_type": "",
                                       "answer_type": ""}]
    assert evaluator._rows["plan"] == [{"id": "p", "plan": "1. pick red", "reference": "x"}]
    assert evaluator._rows["caption"] == [{"image_id": 9, "caption": "c", "references": ["x"]}]


def test_an_example_of_an_unscored_task_is_refused_by_name():
    with pytest.raises(ValueError, match="task 'other'.*'caption', 'gqa', 'vqa'"):
        GenerationEvaluator().step(generator("a"), batch(["other"]), "val")


def test_every_task_is_gathered_in_one_order_even_without_rows(monkeypatch, tmp_path):
    gathered = []
    monkeypatch.setattr(generation_module, "gather_objects", lambda rows: gathered.append(len(rows)) or rows)
    evaluator = GenerationEvaluator()
    evaluator.step(generator("yes"), batch(["vqa"]), "val")
    evaluator.finish(None, "val", files(tmp_path))
    assert gathered == [1, 0, 0]  # vqa, gqa, caption: one collective each, on every rank alike
    assert evaluator._rows == {"vqa": [], "gqa": [], "caption": []}


def test_vqa_results_keep_integer_ids_and_score_exactly_the_official_scorer(tmp_path):
    answers = [["1", "1"] + ["one"] * 8, ["red one"] * 4 + ["red"] * 6, ["Yes"] * 10, ["2"] * 10]
    qtypes, atypes = ["how many", "what color", "is the", "how many"], ["number", "other", "yes/no", "number"]
    predictions = ["one", "the red one", "yes", "2"]
    evaluator = GenerationEvaluator([VQAScorer()])
    evaluator.step(generator(*predictions), batch(["vqa"] * 4, ids=[11, 12, 13, 14], references=answers,
                                                  question_types=qtypes, answer_types=atypes), "val")
    metrics = evaluator.finish(None, "val", files(tmp_path))

    results = read(tmp_path, "vqa")
    assert results == [{"question_id": i, "answer": p} for i, p in zip([11, 12, 13, 14], predictions)]
    annotations = {"annotations": [
        {"question_id": i, "image_id": 0, "question_type": q, "answer_type": a,
         "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": k + 1} for k, x in enumerate(refs)]}
        for i, refs, q, a in zip([11, 12, 13, 14], answers, qtypes, atypes)]}
    questions = {"questions": [{"question_id": i, "image_id": 0, "question": "?"} for i in [11, 12, 13, 14]]}
    official = official_vqa_accuracy(annotations, questions, results)
    assert read(tmp_path, "vqa", ".accuracy.json") == official
    assert official["overall"] == 40.0  # 0.6 + 0 + 0 + 1: the official quirks
    assert metrics["vqa_acc"] == pytest.approx(0.4)
    assert metrics["vqa_acc_number"] == pytest.approx(0.8) and metrics["vqa_acc_yes_no"] == 0.0
    assert metrics["vqa_acc_qtype/how_many"] == pytest.approx(0.8)
    assert "vqa_acc_normalized" not in metrics
    settings = read(tmp_path, "vqa", ".generation.json")
    assert settings["generation"] == {"num_beams": 5} and settings["count"] == 4


def test_string_ids_fail_the_official_loadres_check():
    annotations = {"annotations": [{"question_id": 1, "image_id": 0, "question_type": "", "answer_type": "",
                                    "answers": [{"answer": "a", "answer_confidence": "yes", "answer_id": 1}]}]}
    with pytest.raises(AssertionError):
        official_vqa_accuracy(annotations, {"questions": [{"question_id": 1}]}, [{"question_id": "1", "answer": "a"}])


def test_the_friendlier_vqa_variant_is_opt_in_and_named_apart(tmp_path):
    evaluator = GenerationEvaluator([VQAScorer(normalized=True)])
    evaluator.step(generator("yes"), batch(["vqa"], references=[["Yes"] * 10]), "val")
    metrics = evaluator.finish(None, "val", files(tmp_path))
    assert metrics["vqa_acc"] == 0.0 and metrics["vqa_acc_normalized"] == 1.0


def test_predictions_without_answers_are_written_but_not_scored(tmp_path):
    evaluator = GenerationEvaluator()
    out = evaluator.step(generator("2"), batch(["vqa"], ids=[262148000], references=[[]]), "predict")
    assert out.rows == [{"id": 262148000, "task": "vqa", "prediction": "2"}]
    assert evaluator.finish(None, "predict", ResultFiles(tmp_path, "predict", 0)) == {}
    written = json.loads((tmp_path / "predictions" / "predict-vqa-step0.json").read_text())
    assert written == [{"question_id": 262148000, "answer": "2"}]


def test_captions_are_scored_one_per_image_in_the_coco_results_format(tmp_path):
    refs = [["a red circle", "a circle"], ["two blue squares"], ["a green triangle"]]
    evaluator = GenerationEvaluator([CaptionScorer(tokenizer="python")])
    evaluator.step(generator("a red circle", "a blue square", "a red circle again", "a triangle"),
                   batch(["caption"] * 4, ids=[1, 2, 1, 3], references=[refs[0], refs[1], refs[0], refs[2]]), "val")
    metrics = evaluator.finish(None, "val", files(tmp_path))
    assert read(tmp_path, "caption") == [{"image_id": 1, "caption": "a red circle"},
                                         {"image_id": 2, "caption": "a blue square"},
                                         {"image_id": 3, "caption": "a triangle"}]
    expected = caption_scores(["a red circle", "a blue square", "a triangle"], refs, "python")
    assert metrics == expected and read(tmp_path, "caption", ".scores.json")["cider"] == expected["cider"]


def test_gqa_is_exact_match_of_the_processed_prediction(tmp_path):
    evaluator = GenerationEvaluator([GQAScorer()])
    evaluator.step(generator("The Dog.", "two", "Red"), batch(["gqa"] * 3, ids=["a", "b", "c"],
                                                            references=[["dog"], ["2"], ["red"]]), "val")
    metrics = evaluator.finish(None, "val", files(tmp_path))
    assert metrics == {"gqa_acc": 1.0}  # "the dog." → "dog", "two" → "2", "Red" → "red"
    assert read(tmp_path, "gqa")[0] == {"questionId": "a", "prediction": "The Dog."}


def test_predict_is_refused_by_name_where_no_evaluator_predicts():
    with pytest.raises(ValueError, match="Blip2Stage1 has no predictions to write.*RetrievalEvaluator"):
        Evaluation(RetrievalEvaluator()).step(type("Blip2Stage1", (), {})(), batch(["caption"]), "predict")


def family_classes() -> list[type]:
    return [c for c in vars(mmlm.models).values() if inspect.isclass(c) and issubclass(c, MultimodalModule)
            and c is not MultimodalModule]


def test_no_family_overrides_a_private_hook_of_the_base():
    private = {name for name in vars(MultimodalModule) if name.startswith("_") and not name.startswith("__")}
    offenders = [f"{cls.__name__}.{name}" for family in family_classes() for cls in family.__mro__
                 if cls not in (MultimodalModule, object) and issubclass(cls, MultimodalModule)
                 for name in vars(cls) if name in private]
    assert family_classes() and not offenders, offenders


def test_result_file_finds_the_newest_results_not_the_files_beside_them(tmp_path):
    for step in (3, 12):
        ResultFiles(tmp_path / "run", "val", step).write_json("vqa", [{"question_id": step, "answer": "a"}])
        ResultFiles(tmp_path / "run", "val", step).write_json("vqa", {"overall": 1.0}, ".accuracy.json")
    found = result_file(tmp_path, "val", "vqa")
    assert found.name == "val-vqa-step12.json" and json.loads(found.read_text())[0]["question_id"] == 12
    with pytest.raises(FileNotFoundError, match="val-caption-step"):
        result_file(tmp_path, "val", "caption")
