"""BLIP-2 evaluation end to end against the reference pipeline, as a user runs it.

A tiny random ``Blip2ForConditionalGeneration`` (OPT-class LM that ends text with "\\n", as the Salesforce OPT
checkpoints) is saved with its ``Blip2Processor``; non-square COCO-style JPEGs with questions in the official VQAv2
JSON layout (and a Karpathy split file for captions) go through ``mmlm data convert-vqav2`` / ``convert-karpathy``
and ``mmlm validate`` with the shipped eval configs. The reference is transformers' own pipeline —
``Blip2Processor`` + ``generate`` with the config's settings — and the official scorers: VQAv2's ``vqaEval.py``
(re-derived in ``tests/reference/vqa_eval.py``) on the results file mmlm wrote, and pycocoevalcap's PTB tokenizer +
CIDEr/BLEU on the COCO results file loaded through ``pycocotools``.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from coco_images import write_coco_val_images
from PIL import Image
from reference.vqa_eval import official_vqa_accuracy
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    PreTrainedTokenizerFast,
)

from mmlm.app.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "blip2"
M = 4  # query tokens
CORPUS = ["Question: what color is the cat? Short answer: red", "a photo of a dog on a red couch",
          "How many cats are there? two cats and one dog", "Is it sunny? yes no blue green\n"] * 20
QUESTIONS = ["What color is the cat?", "How many dogs are there?", "Is it sunny?", "What is on the couch?",
             "Where is the dog?", "What color is the sky?"]


def opt_like_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer laid out as OPT's (bos = eos = ``</s>`` prepended, pad ``<pad>``) + ``<image>``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.save_pretrained(directory)
    return fast


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The tiny checkpoint directory: weights, config (eos = "\\n"), tokenizer and a non-default image processor."""
    directory = tmp_path_factory.mktemp("blip2-opt-tiny")
    tokenizer = opt_like_tokenizer(directory)
    newline = tokenizer("\n", add_special_tokens=False).input_ids[0]
    opt = {"model_type": "opt", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "ffn_dim": 64,
           "vocab_size": len(tokenizer), "word_embed_proj_dim": 32, "max_position_embeddings": 128,
           "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": newline}
    config = Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        qformer_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                        "encoder_hidden_size": 32, "cross_attention_frequency": 1},
        text_config=opt, num_query_tokens=M, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(config)
    with torch.no_grad():  # BERT-style 0.02 init gives near-flat logits: parity would test little
        for param in hf.parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.3)
    hf.save_pretrained(directory)
    images = BlipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25])
    Blip2Processor(images, tokenizer, num_query_tokens=M).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def coco_images(tmp_path_factory) -> tuple[Path, list[int]]:
    """Non-square JPEGs named as COCO val2014 images; returns the folder and the image ids."""
    folder = tmp_path_factory.mktemp("coco") / "val2014"
    return folder, write_coco_val_images(folder)


class Reference:
    """transformers' pipeline: ``Blip2Processor`` + ``generate``, one image at a time, new tokens decoded."""

    def __init__(self, checkpoint: Path) -> None:
        self.processor = Blip2Processor.from_pretrained(checkpoint)
        self.model = Blip2ForConditionalGeneration.from_pretrained(checkpoint).eval()

    @torch.no_grad()
    def __call__(self, image_path: Path, prompt: str, generation: dict) -> str:
        inputs = self.processor(images=Image.open(image_path).convert("RGB"), text=prompt, return_tensors="pt")
        out = self.model.generate(**inputs, do_sample=False, **generation)
        return self.processor.batch_decode(out[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)[0].strip()


def config_generation(name: str) -> dict:
    """The shipped eval config's generation settings as ``generate`` arguments."""
    declared = yaml.safe_load((CONFIGS / name).read_text())["model"]["init_args"]["generation"]
    return {k: v for k, v in declared.items() if k != "repetition_penalty"}


def validate(config: str, checkpoint: Path, shards: str, kind: str, root: Path, monkeypatch) -> dict[str, float]:
    """``mmlm validate --config configs/blip2/<config>`` on CPU in fp32; returns the logged val metrics."""
    monkeypatch.setattr(sys, "argv", ["mmlm"])
    val = json.dumps([{"urls": shards, "kind": kind}])
    assert main(["validate", "--config", str(CONFIGS / config), "--trainer.accelerator", "cpu",
                 "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
                 "--trainer.logger", "pytorch_lightning.loggers.CSVLogger", "--trainer.logger.save_dir", str(root),
                 "--model.init_args.name_or_path", str(checkpoint), "--model.init_args.vision_dtype", "float32",
                 "--model.init_args.lm_dtype", "float32", "--model.init_args.predictions_dir", str(root),
                 "--data.init_args.val", val, "--data.init_args.batch_size", "4",
                 "--data.init_args.num_workers", "0"]) == 0
    (metrics_csv,) = root.glob("lightning_logs/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics_csv.open()))
    return {k: float(v) for row in rows for k, v in row.items() if v not in ("", None) and k.startswith("val/")}


def vqa_files(folder: Path, ids: list[int], predictions: list[str]) -> tuple[dict, dict]:
    """Official-layout questions and annotations whose human answers put the reference predictions through the
    scorer's quirks: exact, upper-cased (all ten agree: no processing, 0), punctuated and mixed, fewer than ten."""
    questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
                 "license": {}, "questions": []}
    annotations = {"info": {}, "data_type": "mscoco", "data_subtype": "val2014", "license": {}, "annotations": []}
    answer_sets = [lambda p: [p] * 10, lambda p: [p.upper() + "X"] * 10, lambda p: [p + "!"] * 3 + ["zz"] * 7,
                   lambda p: [p] * 2 + ["one"] * 8, lambda p: [p] * 4, lambda p: ["no"] * 10]
    types = [("what color is the", "other"), ("how many", "number"), ("is it", "yes/no")] * 2
    for n, (image_id, question, prediction) in enumerate(zip(ids, QUESTIONS, predictions)):
        question_id = image_id * 1000 + n
        questions["questions"].append({"image_id": image_id, "question": question, "question_id": question_id})
        answers = answer_sets[n](prediction)
        annotations["annotations"].append({
            "question_id": question_id, "image_id": image_id, "question_type": types[n][0],
            "answer_type": types[n][1], "multiple_choice_answer": answers[0],
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)]})
    (folder / "questions.json").write_text(json.dumps(questions))
    (folder / "annotations.json").write_text(json.dumps(annotations))
    return questions, annotations


def test_zero_shot_vqa_equals_processor_generate_and_the_official_scorer(checkpoint, coco_images, tmp_path,
                                                                        monkeypatch):
    images, ids = coco_images
    generation = config_generation("eval_vqav2_zeroshot.yaml")
    assert generation == {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": 0.0}
    prompt = yaml.safe_load((CONFIGS / "eval_vqav2_zeroshot.yaml").read_text())["data"]["init_args"]["vqa_prompt"]
    reference = Reference(checkpoint)
    expected = [reference(images / f"COCO_val2014_{i:012d}.jpg", prompt.format(q), generation)
                for i, q in zip(ids, QUESTIONS)]
    assert len(set(expected)) > 1 and all(expected)  # varied answers: the comparison is not trivially equal
    questions, annotations = vqa_files(tmp_path, ids, expected)

    monkeypatch.setattr(sys, "argv", ["mmlm"])
    assert main(["data", "convert-vqav2", "--questions", str(tmp_path / "questions.json"), "--annotations",
                 str(tmp_path / "annotations.json"), "--images", str(images), "--out", str(tmp_path / "shards")]) == 0
    logged = validate("eval_vqav2_zeroshot.yaml", checkpoint, str(tmp_path / "shards" / "*.tar"), "vqa",
                      tmp_path / "run", monkeypatch)

    out = tmp_path / "run" / "predictions"
    results = json.loads((out / "val-vqa-step0.json").read_text())
    by_question = {row["question_id"]: row["answer"] for row in results}
    assert by_question == {q["question_id"]: e for q, e in zip(questions["questions"], expected)}  # token for token
    official = official_vqa_accuracy(annotations, questions, results)  # loadRes accepts the file as written
    assert json.loads((out / "val-vqa-step0.accuracy.json").read_text()) == official
    assert logged["val/vqa_acc"] == pytest.approx(official["overall"] / 100, abs=5e-5)
    assert 0 < official["overall"] < 100  # the quirks bite: exact answers score, upper-cased ones do not
    assert logged["val/vqa_acc_number"] == pytest.approx(official["perAnswerType"]["number"] / 100, abs=5e-5)


def karpathy_file(folder: Path, ids: list[int], predictions: list[str]) -> Path:
    """A Karpathy split file whose references include each reference caption (so CIDEr is not 0) among others."""
    images = []
    for n, (image_id, prediction) in enumerate(zip(ids, predictions)):
        raws = [prediction, f"A photo of a cat, number {n}.", "two dogs don't sit on a red couch"]
        images.append({"filepath": "val2014", "filename": f"COCO_val2014_{image_id:012d}.jpg", "split": "test",
                       "cocoid": image_id, "imgid": n, "sentences": [{"raw": r, "tokens": r.split()} for r in raws]})
    path = folder / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def coco_reference_scores(folder: Path, karpathy: Path, results_file: Path) -> dict[str, float]:
    """pycocoevalcap's pipeline on the files: annotations through ``pycocotools.COCO``, the results file through
    ``loadRes``, PTB tokenizer, then BLEU and CIDEr-D (``COCOEvalCap.evaluate`` without METEOR and SPICE)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    from pycocotools.coco import COCO

    data = json.loads(karpathy.read_text())
    coco_json = {"images": [{"id": im["cocoid"]} for im in data["images"]], "annotations": [
        {"id": k, "image_id": im["cocoid"], "caption": s["raw"]}
        for k, (im, s) in enumerate((im, s) for im in data["images"] for s in im["sentences"])]}
    (folder / "captions_gt.json").write_text(json.dumps(coco_json))
    coco = COCO(str(folder / "captions_gt.json"))
    results = coco.loadRes(str(results_file))
    image_ids = results.getImgIds()
    gts = {i: coco.imgToAnns[i] for i in image_ids}
    res = {i: results.imgToAnns[i] for i in image_ids}
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"cider": cider, "bleu4": bleu[3]}


@pytest.mark.skipif(not __import__("shutil").which("java"), reason="pycocoevalcap's PTB tokenizer needs Java")
def test_captioning_equals_processor_generate_and_coco_eval(checkpoint, coco_images, tmp_path, monkeypatch):
    images, ids = coco_images
    generation = config_generation("eval_coco_caption.yaml")
    prompt = yaml.safe_load((CONFIGS / "eval_coco_caption.yaml").read_text())["data"]["init_args"]["caption_prompt"]
    reference = Reference(checkpoint)
    expected = [reference(images / f"COCO_val2014_{i:012d}.jpg", prompt, generation) for i in ids]
    assert len(set(expected)) > 1 and all(expected)
    karpathy = karpathy_file(tmp_path, ids, expected)

    monkeypatch.setattr(sys, "argv", ["mmlm"])
    assert main(["data", "convert-karpathy", "--karpathy-json", str(karpathy), "--images", str(images.parent),
                 "--split", "test", "--out", str(tmp_path / "shards")]) == 0
    logged = validate("eval_coco_caption.yaml", checkpoint, str(tmp_path / "shards" / "*.tar"), "caption",
                      tmp_path / "run", monkeypatch)

    results_file = tmp_path / "run" / "predictions" / "val-caption-step0.json"
    results = json.loads(results_file.read_text())
    assert {r["image_id"]: r["caption"] for r in results} == dict(zip(ids, expected))  # integer COCO ids
    official = coco_reference_scores(tmp_path, karpathy, results_file)
    assert official["cider"] > 0
    assert logged["val/cider"] == pytest.approx(official["cider"], rel=1e-6)
    assert logged["val/bleu4"] == pytest.approx(official["bleu4"], rel=1e-6)
