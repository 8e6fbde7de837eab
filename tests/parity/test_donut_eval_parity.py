"""Donut evaluation end to end against Donut's own pipeline, as a user runs it.

A tiny random ``VisionEncoderDecoderModel`` (DonutSwin + MBart) is saved with its ``DonutProcessor``; non-square
JPEGs with ground truths in Donut's folder layout (``metadata.jsonl``) go through ``mmlm test`` / ``mmlm validate``
with the shipped eval configs. The reference is transformers' Donut pipeline — ``DonutProcessor`` pixels,
``generate`` from the task prompt, the decoded sequence with eos/pad and the first tag removed, ``token2json`` — and
Donut's evaluator (``JSONParseEvaluator`` re-derived on ``zss``/``nltk`` in ``tests/reference/donut_eval.py``; ANLS
from the DocVQA definition) on what it parses.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from reference.donut_eval import cal_acc, cal_f1
from transformers import (
    DonutImageProcessor,
    DonutProcessor,
    DonutSwinConfig,
    MBartConfig,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
)

from mmlm.app.cli import main
from mmlm.piece_tokenizer import train_piece_tokenizer

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "donut"
SIZE = (64, 48)  # (H, W) of the checkpoint and the processor
KEYS = ("menu", "nm", "price", "total", "question", "answer")
TOKENS = ["<s_cord-v2>", "<s_docvqa>", "<sep/>", *[t for k in KEYS for t in (f"<s_{k}>", f"</s_{k}>")]]
TEXTS = ["Total 12.50 Cash 20.00", "Latte 3.50 Bagel 2.25", "what is the total ?", "Thank you"] * 8
DOCS = [(70, 40), (40, 90), (64, 48), (33, 77), (120, 50)]  # (width, height) of the document images


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random Donut checkpoint whose tokenizer already has every tag the data uses (as a finetuned one)."""
    directory = tmp_path_factory.mktemp("donut-tiny")
    tokenizer = train_piece_tokenizer(TEXTS, vocab_size=80)
    tokenizer.add_special_tokens({"additional_special_tokens": TOKENS})
    decoder = MBartConfig(vocab_size=len(tokenizer), d_model=32, decoder_layers=2, decoder_attention_heads=2,
                          decoder_ffn_dim=64, max_position_embeddings=64, is_decoder=True, add_cross_attention=True,
                          scale_embedding=True, add_final_layer_norm=True, pad_token_id=1, bos_token_id=0,
                          eos_token_id=2)
    encoder = DonutSwinConfig(image_size=list(SIZE), patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                              window_size=4)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.pad_token_id, config.decoder_start_token_id, config.eos_token_id = 1, 0, 2
    torch.manual_seed(0)
    hf = VisionEncoderDecoderModel(config)
    with torch.no_grad():  # varied greedy generations that depend on the image: tags and text appear
        for part, std in ((hf.encoder, 0.5), (hf.decoder, 0.3)):
            for param in part.parameters():
                if param.ndim >= 2:
                    param.normal_(0.0, std)
        end = tokenizer.convert_tokens_to_ids("</s_answer>")
        hf.decoder.get_output_embeddings().weight[end] *= 3.0  # some DocVQA generations close their answer
    hf.save_pretrained(directory)
    processor = DonutImageProcessor(size={"height": SIZE[0], "width": SIZE[1]}, do_align_long_axis=False,
                                    image_mean=[0.4, 0.5, 0.6], image_std=[0.3, 0.2, 0.25])
    DonutProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


class Reference:
    """transformers' Donut inference: processor pixels, ``generate`` from the prompt, Donut's post-processing."""

    def __init__(self, checkpoint: Path, max_new_tokens: int) -> None:
        self.processor = DonutProcessor.from_pretrained(checkpoint)
        self.model = VisionEncoderDecoderModel.from_pretrained(checkpoint).eval()
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def __call__(self, image: Path, prompt: str) -> dict | list:
        tokenizer = self.processor.tokenizer
        pixels = self.processor(Image.open(image).convert("RGB"), return_tensors="pt").pixel_values
        prompt_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        out = self.model.generate(pixels, decoder_input_ids=prompt_ids, max_new_tokens=self.max_new_tokens,
                                  do_sample=False, num_beams=1, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, bad_words_ids=[[tokenizer.unk_token_id]])
        sequence = self.processor.batch_decode(out)[0]
        sequence = sequence.replace(tokenizer.eos_token, "").replace(tokenizer.pad_token, "")
        return self.processor.token2json(re.sub(r"<.*?>", "", sequence, count=1).strip())


def write_folder(folder: Path, ground_truths: list[dict]) -> list[Path]:
    """Donut's folder layout: non-square JPEGs and ``metadata.jsonl`` with each ``ground_truth`` JSON string."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths, lines = [], []
    for n, ((width, height), gt) in enumerate(zip(DOCS, ground_truths)):
        path = folder / f"doc_{n}.jpg"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, quality=92)
        paths.append(path)
        lines.append(json.dumps({"file_name": path.name, "ground_truth": json.dumps(gt)}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return paths


def run(stage: str, config: str, checkpoint: Path, data: list[str], root: Path, monkeypatch) -> dict[str, float]:
    """``mmlm <stage> --config configs/donut/<config>`` on CPU in fp32; returns the logged metrics."""
    monkeypatch.setattr(sys, "argv", ["mmlm"])
    assert main([stage, "--config", str(CONFIGS / config), "--trainer.accelerator", "cpu", "--trainer.precision",
                 "32-true", "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
                 "--trainer.logger", "pytorch_lightning.loggers.CSVLogger", "--trainer.logger.save_dir", str(root),
                 "--model.init_args.name_or_path", str(checkpoint), "--model.init_args.image_size", json.dumps(SIZE),
                 "--model.init_args.generation", json.dumps({"max_new_tokens": 16}),
                 "--model.init_args.predictions_dir", str(root), "--data.init_args.batch_size", "2",
                 "--data.init_args.num_workers", "0", "--data.init_args.max_text_tokens", "48", *data]) == 0
    (metrics_csv,) = root.glob("lightning_logs/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics_csv.open()))
    return {k: float(v) for row in rows for k, v in row.items() if v not in ("", None) and "/" in k}


def predictions(root: Path, stage: str) -> dict[str, dict | list]:
    """``file_name → parsed prediction`` of the run's JSONL."""
    (path,) = (root / "predictions").glob(f"{stage}-documents-step*.jsonl")
    return {row["id"]: row["prediction"] for row in map(json.loads, path.read_text().splitlines())}


def perturbed(parse: dict | list) -> dict:
    """A ground truth near ``parse``: its text with the last third changed (TED and F1 strictly between 0 and 1)."""
    text = json.dumps(parse)
    return {"text_sequence": text[: 2 * len(text) // 3] + "Total 9.99"}


def test_cord_test_equals_donut_inference_and_its_evaluator(checkpoint, tmp_path, monkeypatch):
    reference = Reference(checkpoint, max_new_tokens=16)
    assert yaml.safe_load((CONFIGS / "eval_cord.yaml").read_text())["data"]["init_args"]["task"] == "cord-v2"
    probe = write_folder(tmp_path / "probe", [{"gt_parse": {}}] * len(DOCS))  # the same images, written again below
    parses = [reference(p, "<s_cord-v2>") for p in probe]
    assert len({json.dumps(e, sort_keys=True) for e in parses}) > 1  # varied parses
    gt_parses = [parses[0], {**parses[1], "total": "12.50"}, perturbed(parses[2]), {"menu": {"nm": "Tea"}},
                 {"menu": [{"nm": "Latte", "price": "3.50"}, {"nm": "Bagel"}], "total": "5.75"}]
    paths = write_folder(tmp_path / "cord" / "test", [{"gt_parse": g} for g in gt_parses])
    expected = {p.name: e for p, e in zip(paths, parses)}

    logged = run("test", "eval_cord.yaml", checkpoint, ["--data.init_args.test_path", str(tmp_path / "cord" / "test"),
                                                         "--data.init_args.val_path", "null"], tmp_path / "run",
                 monkeypatch)
    assert predictions(tmp_path / "run", "test") == expected  # what Donut's inference parses, document by document
    ted = np.mean([cal_acc(p, g) for p, g in zip(parses, gt_parses)])
    f1 = cal_f1(parses, gt_parses)
    assert 0.2 < ted < 1 and 0 < f1 < 1  # exact, partial and wrong documents: not a trivial 0 or 1
    assert logged["test/ted_accuracy"] == pytest.approx(ted, abs=1e-6)
    assert logged["test/f1"] == pytest.approx(f1, abs=1e-6)


def reference_anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """ANLS of one question as the RRC DocVQA/InfographicVQA evaluation script computes it: edit distance of the
    normalised strings (stripped, lower-cased, whitespace collapsed) over the longer RAW length, ``1 − min``, and 0
    below the threshold."""
    def distance(a: str, p: str) -> int:
        rows = list(range(len(p) + 1))
        for i, ca in enumerate(a, 1):
            rows, prev = [i], rows
            for j, cp in enumerate(p, 1):
                rows.append(min(prev[j] + 1, rows[j - 1] + 1, prev[j - 1] + (ca != cp)))
        return rows[-1]

    def normal(text: str) -> str:
        return " ".join(text.strip().lower().split())

    values = []
    for answer in answers:
        length = max(len(answer.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else distance(normal(answer), normal(prediction)) / length)
    score = 1 - min(values)
    return 0.0 if score < threshold else score


def test_docvqa_scores_the_answer_only_as_donut_and_the_anls_definition(checkpoint, tmp_path, monkeypatch):
    reference = Reference(checkpoint, max_new_tokens=16)
    questions = ["what is the total ?", "Thank you", "what is the total ?", "Latte", "Cash"]
    expected_parses = {}
    folder_paths = write_folder(tmp_path / "probe", [{"gt_parse": {}}] * len(DOCS))
    for path, question in zip(folder_paths, questions):
        expected_parses[path.name] = reference(path, f"<s_docvqa><s_question>{question}</s_question><s_answer>")
    generated = [str(p.get("answer", "")) if isinstance(p, dict) else "" for p in expected_parses.values()]
    assert sum(bool(a) for a in generated) >= 2  # some answers closed: scored text, not only empty answers
    answers = [[a.upper() or "12.50", "x"] if n % 3 == 0 else [a[:-2] or "zz", "zz"] if n % 3 == 1 else [a or "no"]
               for n, a in enumerate(generated)]  # case differs (ANLS 1, exact 0), partial, exact
    answers[1] = ["something else"]  # a wrong answer scores 0 (the whole-JSON TED gave it 0.84)
    ground_truths = [{"gt_parses": [{"question": q, "answer": a} for a in ans]} for q, ans in zip(questions, answers)]
    paths = write_folder(tmp_path / "docvqa" / "validation", ground_truths)

    logged = run("validate", "eval_docvqa.yaml", checkpoint,
                 ["--data.init_args.val_path", str(tmp_path / "docvqa" / "validation")], tmp_path / "run", monkeypatch)
    got = predictions(tmp_path / "run", "val")
    assert got == {p.name: expected_parses[p.name] for p in paths}
    predicted = [str(got[p.name].get("answer", "")) if isinstance(got[p.name], dict) else "" for p in paths]
    anls = np.mean([reference_anls(p, a) for p, a in zip(predicted, answers)])
    exact = np.mean([float(p in set(a)) for p, a in zip(predicted, answers)])
    assert logged["val/anls"] == pytest.approx(anls, abs=1e-6)
    assert logged["val/exact_match"] == pytest.approx(exact, abs=1e-6)
    assert 0 < anls < 1 and exact < anls
    assert "val/ted_accuracy" not in logged  # DocVQA is scored on its answers, not on the question's JSON
