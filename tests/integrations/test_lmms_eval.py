"""lmms-eval's ``mmlm`` model and :mod:`mmlm.inference`, offline, on a tiny random model (nothing is trained).

A tiny random Frozen is exported (``mmlm.models.exported.export_model``); a few VQA questions about non-square
JPEGs are written both as a raw VQAv2 source (questions + annotations JSON) for ``mmlm validate --model DIR`` and as
a local lmms-eval task (JSON lines + a task YAML + ``utils.py`` scoring with the official VQAv2 metric) run by
lmms-eval's own ``simple_evaluate`` with ``--model mmlm`` found through the entry point. The generated answers must
equal ``validate``'s predictions file and the lmms-eval score ``val/vqa_acc``. A PaLM-E request with two images
equals the embodied datamodule's batch; ``loglikelihood`` equals a hand computation with the language model.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from coco_images import write_coco_val_images
from PIL import Image

from mmlm.app.cli import main
from mmlm.language.base import GenerationConfig

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# lmms-eval is imported inside the tests only: importing lmms_eval.utils runs warnings.filterwarnings("ignore"),
# which pytest undoes after each test but not after collection.

#: conftest's tiny parts: a 2-layer, 32-wide GPT-2 over 64 ids and a narrow resnet10t.
TINY_GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 128, "vocab_size": 64,
             "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "initializer_range": 0.3}
TINY_RESNET = {"channels": [8, 16, 16, 16], "stem_width": 8, "output_stride": 16}

QUESTIONS = ["what colour is the circle?", "how many shapes are there?", "what shape is the red object?",
             "how many squares are there?", "what colour is the square?", "what shape is the blue object?"]
MAX_NEW_TOKENS = 3
PROMPT = "Question: {} Answer:"  # the datamodule's vqa_prompt, written by the task's doc_to_text
TASK = "mmlm_tiny_vqa"
TASK_UTILS = '''
from PIL import Image

from mmlm.metrics.vqa import vqa_accuracy


def doc_to_visual(doc):
    return [Image.open(doc["image"])]


def doc_to_text(doc):
    return "Question: " + doc["question"] + " Answer:"


def process_results(doc, results):
    return {"vqa_acc": vqa_accuracy(results[0], doc["answers"])}
'''


@pytest.fixture(scope="module")
def exported(shapes_data, tmp_path_factory) -> Path:
    """A tiny random Frozen (resnet10t at 32 px, 2-layer GPT-2) built from a config and exported (mmlm format)."""
    from mmlm.models.exported import build_from_config, export_model

    root = tmp_path_factory.mktemp("frozen")
    model = {"class_path": "mmlm.models.Frozen", "init_args": {
        "tokenizer": str(shapes_data / "tokenizer"), "generation": {"max_new_tokens": MAX_NEW_TOKENS},
        "encoder": {"class_path": "mmlm.encoders.TimmEncoder",
                    "init_args": {"name": "resnet10t", "img_size": 32, "model_kwargs": TINY_RESNET}},
        "language_model": {"class_path": "mmlm.language.HFCausalLM", "init_args": {"config": TINY_GPT2}}}}
    (root / "config.yaml").write_text(yaml.safe_dump({"model": model}))
    torch.manual_seed(0)
    return export_model(build_from_config(root / "config.yaml"), root / "export")


@pytest.fixture(scope="module")
def frozen(exported):
    from mmlm.models import Frozen

    return Frozen.from_pretrained(exported)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, list[int]]:
    """Non-square random JPEGs named as COCO val2014 images; the folder and the image ids."""
    folder = tmp_path_factory.mktemp("coco") / "val2014"
    return folder, write_coco_val_images(folder)


def image_path(folder: Path, image_id: int) -> Path:
    return folder / f"COCO_val2014_{image_id:012d}.jpg"


@pytest.fixture(scope="module")
def generated(frozen, images) -> list[str]:
    """``mmlm.inference.generate`` on every question at once."""
    from mmlm.inference import generate

    folder, ids = images
    return generate(frozen, [PROMPT.format(q) for q in QUESTIONS],
                    [[Image.open(image_path(folder, i))] for i in ids])


def human_answers(prediction: str, n: int) -> list[str]:
    """Ten answers that put ``prediction`` through the scorer: all, some (0.6–0.9) or none of them match."""
    return [[prediction] * 10, [prediction] * 2 + ["zz"] * 8, ["zz"] * 10][n % 3]


@pytest.fixture(scope="module")
def vqa(images, generated, tmp_path_factory) -> SimpleNamespace:
    """The questions as a raw VQAv2 source and as lmms-eval documents (JSON lines), with the same answers."""
    root = tmp_path_factory.mktemp("vqa")
    folder, ids = images
    questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
                 "license": {}, "questions": []}
    annotations = {"info": {}, "data_type": "mscoco", "data_subtype": "val2014", "license": {}, "annotations": []}
    docs = []
    for n, (image_id, question, prediction) in enumerate(zip(ids, QUESTIONS, generated)):
        qid, answers = image_id * 10 + n, human_answers(prediction, n)
        questions["questions"].append({"image_id": image_id, "question": question, "question_id": qid})
        annotations["annotations"].append({"question_id": qid, "image_id": image_id, "question_type": "what",
                                           "answer_type": "other", "multiple_choice_answer": answers[0],
                                           "answers": [{"answer": a, "answer_id": k + 1} for k, a in enumerate(answers)]})
        docs.append({"question_id": qid, "question": question, "answers": answers,
                     "image": str(image_path(folder, image_id))})
    (root / "questions.json").write_text(json.dumps(questions))
    (root / "annotations.json").write_text(json.dumps(annotations))
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return SimpleNamespace(root=root, folder=folder, docs=docs)


def validate(exported: Path, vqa: SimpleNamespace, monkeypatch) -> tuple[dict[int, str], float]:
    """``mmlm validate --model DIR`` on the raw VQAv2 source: predictions by question id and ``val/vqa_acc``."""
    run = vqa.root / "run"
    source = [{"urls": str(vqa.root / "questions.json"), "kind": "vqa", "images": str(vqa.folder),
               "annotations": str(vqa.root / "annotations.json")}]
    monkeypatch.setattr(sys, "argv", ["mmlm"])
    assert main(["validate", "--model", str(exported), "--data", "datamodules.ImageTextDataModule",
                 "--data.init_args.val", json.dumps(source), "--data.init_args.batch_size", "4",
                 "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
                 "--trainer.default_root_dir", str(run), "--trainer.logger", "pytorch_lightning.loggers.CSVLogger",
                 "--trainer.logger.save_dir", str(run), "--model.init_args.predictions_dir", str(run)]) == 0
    (predictions,) = (run / "predictions").glob("val-vqa-step*[0-9].json")
    (metrics,) = run.glob("lightning_logs/version_*/metrics.csv")
    logged = {k: float(v) for row in csv.DictReader(metrics.open()) for k, v in row.items() if v}
    return {r["question_id"]: r["answer"] for r in json.loads(predictions.read_text())}, logged["val/vqa_acc"]


def lmms_task(vqa: SimpleNamespace, directory: Path) -> Path:
    """A local lmms-eval task over the JSON lines, scored with mmlm's official VQAv2 metric."""
    directory.mkdir()
    (directory / "utils.py").write_text(TASK_UTILS)
    (directory / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {vqa.root / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_visual: !function utils.doc_to_visual\n"
        "doc_to_text: !function utils.doc_to_text\ndoc_to_target: question\n"
        f"generation_kwargs:\n  max_new_tokens: {MAX_NEW_TOKENS}\n  temperature: 0\n  until: [\"\\n\"]\n"
        "process_results: !function utils.process_results\n"
        "metric_list:\n  - metric: vqa_acc\n    aggregation: mean\n    higher_is_better: true\n")
    return directory


def test_lmms_eval_score_and_answers_equal_mmlm_validate(exported, vqa, generated, tmp_path, monkeypatch):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    predictions, val_vqa_acc = validate(exported, vqa, monkeypatch)
    assert [predictions[d["question_id"]] for d in vqa.docs] == generated  # batch of 4 vs 6: the same text
    assert 0 < val_vqa_acc < 1 and len(set(generated)) > 1

    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.syspath_prepend(str(tmp_path / "task"))  # the task's utils.py, also for its pickled functions
    manager = TaskManager(include_path=str(lmms_task(vqa, tmp_path / "task")), include_defaults=False)
    results = simple_evaluate(model="mmlm", model_args=f"pretrained={exported}", tasks=[TASK], batch_size=4,
                              device="cpu", task_manager=manager, bootstrap_iters=0, log_samples=True)
    assert results["results"][TASK]["vqa_acc,none"] == pytest.approx(val_vqa_acc, abs=1e-6)
    answers = {s["doc"]["question_id"]: s["filtered_resps"][0] for s in results["samples"][TASK]}
    assert answers == predictions


def test_two_images_of_a_palme_request_equal_the_embodied_datamodule(shapes_data):
    from datamodules.embodied import EmbodiedDataModule
    from mmlm.encoders import TimmEncoder
    from mmlm.inference import build_batch, generate, image_bytes
    from mmlm.language import HFCausalLM
    from mmlm.models import PaLME

    torch.manual_seed(0)
    model = PaLME(TimmEncoder("resnet10t", img_size=32, model_kwargs=TINY_RESNET), HFCausalLM(config=TINY_GPT2),
                  str(shapes_data / "tokenizer"), state_dim=4, object_dim=3).eval()
    rng = np.random.default_rng(1)
    pictures = [Image.fromarray(rng.integers(0, 256, (40, 30 + 20 * k, 3), dtype=np.uint8)) for k in range(2)]
    prompt = "<img1> and <img2> : how many circles are there? Answer:"
    data = EmbodiedDataModule(markers=model.markers, state_dim=4, object_dim=3)
    data.tokenizer, data.preprocess = model.tokenizer, model.image_preprocess  # what setup reads from the trainer's module
    meta = {"task": "vqa", "prompt": prompt, "target": "two", "answers": ["two"], "id": "0"}
    sample = {"__key__": "0", "json": json.dumps(meta).encode(),
              **{f"img{k + 1}.png": image_bytes(p) for k, p in enumerate(pictures)}}
    expected = data.collate_fn("validate")([data.example_fn("validate", [])(sample, 0)])

    built = build_batch(model, [prompt], [pictures])
    assert [s.item for s in built.prompt_spans[0]] == [0, 1] and built.images.shape[0] == 2
    assert torch.equal(built.prompt_ids, expected.prompt_ids) and torch.equal(built.images, expected.images)
    with torch.no_grad():
        assert generate(model, [prompt], [pictures]) == model.generate_text(expected)
    unmarked = build_batch(model, ["how many circles are there? Answer:"], [pictures])  # spans put before the text
    assert [s.item for s in unmarked.prompt_spans[0]] == [0, 1]


def requests(kind: str, rows: list[tuple[str, str]], picture: Image.Image) -> list:
    """lmms-eval instances of a task ``t`` whose documents all show ``picture``."""
    from lmms_eval.api.instance import Instance

    return [Instance(request_type=kind, arguments=(context, second, lambda doc: [picture], n, "t", "test"), idx=0,
                     metadata={"task": "t", "doc_id": n, "repeats": 1}) for n, (context, second) in enumerate(rows)]


def hand_loglikelihood(model, picture: Image.Image, context: str, continuation: str) -> tuple[float, bool, int]:
    """``log p(continuation | image, [bos] context)`` from the LM's logits over the Frozen prefix, by hand; whether
    it is greedy; its number of tokens."""
    from datamodules.pipeline.transforms import ImageTransform
    from mmlm.inference import image_bytes

    tok = model.tokenizer
    prompt = [tok.bos_token_id] + tok(context, add_special_tokens=False)["input_ids"]
    target = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + target])
    pixels = ImageTransform.from_preprocess(model.image_preprocess, train=False)(image_bytes(picture))[None]
    with torch.no_grad():
        prefix = model.encode_images(pixels)
        embeds = torch.cat([prefix, model.language_model.embed(ids)], 1)
        logits = model.language_model(embeds, torch.ones(embeds.shape[:2], dtype=torch.long)).logits[0]
    start = prefix.shape[1] + len(prompt)
    logprobs = logits[start - 1:start - 1 + len(target)].log_softmax(-1)
    chosen = logprobs[torch.arange(len(target)), torch.tensor(target)]
    return float(chosen.sum()), bool((logprobs.argmax(-1) == torch.tensor(target)).all()), len(target)


def test_loglikelihood_equals_a_hand_computation_with_the_lm(exported, frozen, images):
    from mmlm.integrations.lmms_eval import MMLM

    folder, ids = images
    picture = Image.open(image_path(folder, ids[0]))
    rows = [(PROMPT.format(QUESTIONS[0]), " red"), (PROMPT.format(QUESTIONS[1]), " two shapes"), ("", " circle")]
    expected = [hand_loglikelihood(frozen, picture, c, t) for c, t in rows]
    assert len({n for *_, n in expected}) > 1  # continuations of several lengths: a mean differs from a sum
    adapter = MMLM(pretrained=str(exported), device="cpu", batch_size=2)
    adapter.task_dict = {"t": {"test": [{}] * len(rows)}}
    # Default score=loss: the mean negative log-probability per token, as lmms-eval's llava returns (argmin picks).
    for (loss, greedy), (hand, hand_greedy, n) in zip(adapter.loglikelihood(requests("loglikelihood", rows, picture)),
                                                      expected):
        assert loss == pytest.approx(-hand / n, abs=1e-4) and greedy == hand_greedy
    for score, sign in (("nll", -1), ("logprob", 1)):
        adapter.score = score
        for (value, _), (hand, *_) in zip(adapter.loglikelihood(requests("loglikelihood", rows, picture)), expected):
            assert value == pytest.approx(sign * hand, abs=1e-4)
    with pytest.raises(NotImplementedError, match="generate_until_multi_round"):
        adapter.generate_until_multi_round([])
    video = requests("generate_until", [("Question: ?", {})], picture)
    video[0].arguments = (*video[0].arguments[:2], lambda doc: ["clip.mp4"], *video[0].arguments[3:])
    with pytest.raises(NotImplementedError, match="video and audio"):
        adapter.generate_until(video)


def test_generation_settings_and_stops_follow_the_request():
    from mmlm.integrations.lmms_eval import cut, generation_settings, stop_strings

    base = GenerationConfig(max_new_tokens=7, num_beams=2)
    assert generation_settings(base, {"until": ["\n"]}) == base
    assert generation_settings(base, {"max_new_tokens": 4, "temperature": 0, "top_p": 1.0, "num_beams": 1}) == \
        GenerationConfig(max_new_tokens=4)
    sampled = generation_settings(base, {"temperature": 0.7, "top_p": 0.9, "num_beams": 1})
    assert (sampled.do_sample, sampled.temperature, sampled.top_p, sampled.max_new_tokens) == (True, 0.7, 0.9, 7)
    with pytest.raises(ValueError, match="num_beams"):
        generation_settings(base, {"do_sample": True})  # sampling with 2 beams: refused by GenerationConfig
    assert cut("red circle\nnext. more", stop_strings({"until": ["\n", "."]})) == "red circle"
    assert stop_strings({"until": None}) == [] and stop_strings({"until": "\n\n"}) == ["\n\n"]


def test_families_that_cannot_score_text_are_named():
    from mmlm.inference import scoring_lm
    from mmlm.models import Donut
    from mmlm.models.vlmo_tasks import VLMOVQA

    for family in (Donut, VLMOVQA):
        with pytest.raises(NotImplementedError, match=family.__name__):
            scoring_lm(family.__new__(family))


def test_the_model_class_comes_from_the_export_or_the_family_argument(exported, tmp_path):
    from mmlm.inference import family_class, load_model
    from mmlm.models import Blip2, Donut
    from mmlm.models.base import MultimodalModule

    assert family_class(str(exported), None) is MultimodalModule  # model.yaml names the class
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "mmlm_export.json").write_text(json.dumps({"family": "mmlm.models.blip2.Blip2"}))
    assert family_class(str(tmp_path / "hf"), None) is Blip2
    assert family_class("Salesforce/blip2-opt-2.7b", "Donut") is Donut
    with pytest.raises(ValueError, match="family=Blip2"):
        family_class(str(tmp_path), None)
    with pytest.raises(ValueError, match="exactly one"):
        load_model()


def test_one_image_families_use_the_first_image_and_say_so(frozen, images, caplog):
    from mmlm import inference

    folder, ids = images
    two = [Image.open(image_path(folder, ids[0])), Image.open(image_path(folder, ids[1]))]
    prompt = [PROMPT.format(QUESTIONS[0])]
    inference._warned.discard("Frozen-first-image")
    with caplog.at_level("WARNING", logger="mmlm.inference"):
        assert inference.generate(frozen, prompt, [two]) == inference.generate(frozen, prompt, [two[:1]])
    assert "first image only" in caplog.text
    with pytest.raises(ValueError, match="needs an image"):
        inference.generate(frozen, prompt, [[]])
