"""What retrieval retrieved: ``{stage}-retrieval-step{N}.top.json`` lists each image's best texts and each text's best
images, mapped back to sample ids, keys and caption texts, from a similarity matrix small enough to rank by hand."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from mmlm.batch import Batch
from mmlm.evaluation import ResultFiles, RetrievalEvaluator, RetrievalStep

WORDS = ["<pad>", "a dog", "a brown dog", "a cat", "a bird"]


def caption_batch(ids: list[int], words: list[int], keys: list[str]) -> Batch:
    """Caption rows whose target (the ``labels`` not -100) is one token: the index of its caption in WORDS."""
    n = len(ids)
    labels = torch.tensor([[-100, w, -100] for w in words])
    zeros = torch.zeros(n, 3, dtype=torch.long)
    return Batch(pixels=torch.zeros(n, 3, 4, 4), input_ids=labels.clamp(min=0), attention_mask=zeros + 1,
                 labels=labels, prompt_ids=zeros[:, :1], prompt_mask=zeros[:, :1], keys=keys,
                 tasks=["caption"] * n, ids=ids)


class Retriever:
    """A dual encoder that gives each row the features written for its image id and its caption token."""

    IMAGES = {10: [1.0, 0.0], 11: [0.0, 1.0], 12: [0.6, 0.8]}
    TEXTS = {1: [1.0, 0.0], 2: [0.8, 0.6], 3: [0.0, 1.0], 4: [0.6, 0.8]}
    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens: " ".join(WORDS[i] for i in ids))
    device = torch.device("cpu")

    def retrieval_step(self, batch: Batch) -> RetrievalStep:
        image = torch.tensor([self.IMAGES[i] for i in batch.ids])
        text = torch.tensor([self.TEXTS[int(w)] for w in batch.labels[:, 1]])
        return RetrievalStep({"loss": torch.tensor(0.0)}, image, text, torch.tensor(batch.ids))


def test_top_texts_per_image_and_images_per_text_are_ranked_by_similarity_and_named(tmp_path):
    evaluator, module = RetrievalEvaluator(), Retriever()
    evaluator.step(module, caption_batch([10, 10], [1, 2], ["k10a", "k10b"]), "val")
    evaluator.step(module, caption_batch([11, 12], [3, 4], ["k11", "k12"]), "val")
    metrics = evaluator.finish(module, "val", ResultFiles(tmp_path, "val", 3))
    top = json.loads((tmp_path / "predictions" / "val-retrieval-step3.top.json").read_text())
    assert json.loads((tmp_path / "predictions" / "val-retrieval-step3.json").read_text()) == metrics
    assert top["k"] == 5 and [image["id"] for image in top["images"]] == [10, 11, 12]
    # image 10 · texts: a dog 1.0, a brown dog 0.8, a bird 0.6, a cat 0.0 (both dogs are its captions)
    dog = top["images"][0]
    assert dog["key"] == "k10a" and dog["captions"] == ["a dog", "a brown dog"]
    assert [(t["text"], t["id"], t["key"], t["match"]) for t in dog["texts"]] == [
        ("a dog", 10, "k10a", True), ("a brown dog", 10, "k10b", True), ("a bird", 12, "k12", False),
        ("a cat", 11, "k11", False)]
    assert [t["score"] for t in dog["texts"]] == pytest.approx([1.0, 0.8, 0.6, 0.0])
    # image 12 · texts: a bird 1.0, a brown dog 0.96, a cat 0.8, a dog 0.6
    assert [(t["text"], t["match"]) for t in top["images"][2]["texts"]] == [
        ("a bird", True), ("a brown dog", False), ("a cat", False), ("a dog", False)]
    # "a brown dog" · images: 12 (0.96), 10 (0.8, its own), 11 (0.6)
    brown = top["texts"][1]
    assert (brown["text"], brown["id"], brown["key"]) == ("a brown dog", 10, "k10b")
    assert [(i["id"], i["key"], i["match"]) for i in brown["images"]] == [
        (12, "k12", False), (10, "k10a", True), (11, "k11", False)]
    assert [i["score"] for i in brown["images"]] == pytest.approx([0.96, 0.8, 0.6])
    assert metrics["i2t_r1"] == 100.0 and metrics["t2i_r1"] == 75.0
    assert evaluator._texts == []  # reset for the next epoch


def test_top_k_zero_writes_no_file_and_rank_zero_only_writes(tmp_path):
    evaluator, module = RetrievalEvaluator(top_k=0), Retriever()
    evaluator.step(module, caption_batch([10, 11], [1, 3], ["a", "b"]), "val")
    evaluator.finish(module, "val", ResultFiles(tmp_path, "val", 1))
    assert not (tmp_path / "predictions" / "val-retrieval-step1.top.json").exists()
    evaluator = RetrievalEvaluator()
    evaluator.step(module, caption_batch([10, 11], [1, 3], ["a", "b"]), "val")
    evaluator.finish(module, "val", ResultFiles(None, "val", 1))
    with pytest.raises(ValueError, match="top_k"):
        RetrievalEvaluator(top_k=-1)
