"""``mmlm report``: the parts of the page, a Donut run written by hand, and a tiny Frozen run through the real CLI
(``fit`` → ``validate --ckpt_path``, which writes the report) rendered by headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mmlm.app.cli import main
from mmlm.app.report import (
    build_report,
    caption_score,
    find_log_dir,
    read_metrics_csv,
    result_files,
    stage_sources,
    verdict,
)
from mmlm.app.report_page import field_status, json_diff, leaf_paths, line_chart

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


# --------------------------------------------------------------------------- parts


def test_line_chart_is_inline_svg_with_the_range_and_drops_non_finite_points():
    svg = line_chart("train/loss", [(0, 2.0), (5, float("nan")), (10, 1.0)])
    assert svg.startswith("<svg") and "train/loss" in svg and "<polyline" in svg
    assert svg.count("<circle") == 2 and ">2<" in svg and ">1<" in svg and ">10<" in svg
    assert line_chart("empty", [(0, float("inf"))]) == ""


def test_json_diff_marks_each_field():
    prediction = {"menu": [{"nm": "COLA", "price": "4.00"}], "total": "9"}
    reference = {"menu": [{"nm": "COLA", "price": "5.00"}], "tax": "1"}
    assert leaf_paths(reference) == {"menu[0].nm": "COLA", "menu[0].price": "5.00", "tax": "1"}
    assert field_status(prediction, reference) == {"menu[0].nm": "same", "menu[0].price": "diff", "total": "extra",
                                                   "tax": "missing"}
    predicted, truth = json_diff(prediction, reference, {"menu[0].nm": "p̄ 0.90 · min 0.80"})
    assert 'class="f-diff" title="menu[0].price">&quot;4.00&quot;' in predicted and "p̄ 0.90" in predicted
    assert 'class="f-missing" title="tax"' in truth and "f-extra" not in truth
    assert json.loads(re.sub(r"<[^>]+>", "", html.unescape(truth))) == reference


def test_verdicts_and_caption_scores():
    assert [verdict(s) for s in (1.0, 0.3, 0.0, None)] == ["right", "partial", "wrong", "unscored"]
    assert verdict(0.3, partial_from=0.5) == "wrong"
    assert caption_score("A red square.", ["a red square", "a square"]) == 1.0
    assert caption_score("a red circle left of a square", ["a red circle right of a square"]) == pytest.approx(0.8)
    assert caption_score("x", []) is None


def test_run_files_are_found_from_any_folder_above(tmp_path):
    log_dir = tmp_path / "run" / "lightning_logs" / "version_3"
    (log_dir / "predictions").mkdir(parents=True)
    for name in ("val-vqa-step8.json", "val-vqa-step8.accuracy.json", "test-documents-step2.jsonl", "notes.txt"):
        (log_dir / "predictions" / name).write_text("[]")
    (log_dir / "metrics.csv").write_text("epoch,step,train/loss,val/vqa_acc\n0,0,2.5,\n0,1,,0.25\n0,1,2.0,\n")
    assert find_log_dir(tmp_path / "run") == log_dir
    assert {(f.stage, f.task, f.step, f.suffix) for f in result_files(log_dir)} == {
        ("val", "vqa", 8, ".json"), ("val", "vqa", 8, ".accuracy.json"), ("test", "documents", 2, ".jsonl")}
    assert read_metrics_csv(log_dir / "metrics.csv") == {"train/loss": [(0.0, 2.5), (1.0, 2.0)],
                                                         "val/vqa_acc": [(1.0, 0.25)]}
    with pytest.raises(FileNotFoundError, match="no run found"):
        find_log_dir(tmp_path / "elsewhere")


def test_stage_sources_of_every_datamodule_shape():
    config = {"data": {"init_args": {
        "val": [{"urls": "a/vqa-*.tar", "kind": "vqa"}, {"urls": "b.json", "kind": "vqa", "format": "vqav2"}],
        "val_path": "docs/validation", "test_urls": "t-*.tar", "train": [{"urls": "x", "kind": "caption"}]}}}
    assert stage_sources(config, "val") == [("a/vqa-*.tar", "vqa"), ("docs/validation", None)]
    assert stage_sources(config, "test") == [("t-*.tar", None)]



def test_qformer_cross_attention_maps_are_the_weights_its_forward_used():
    import torch

    from mmlm.connectors.qformer import QFormer, cross_attention_maps

    torch.manual_seed(0)
    qformer = QFormer(12, num_query_tokens=3, hidden_size=16, num_layers=3, num_heads=2, intermediate_size=24,
                      cross_attention_freq=2, with_text=False).eval()
    image, mask = torch.randn(2, 5, 12), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    seen = []
    layer = qformer.layers[0].cross_attn
    hook = layer.register_forward_hook(lambda module, args, out: seen.append((args, out)))
    maps = cross_attention_maps(qformer, image, mask)
    hook.remove()
    assert maps.shape == (2, 2, 2, 3, 5)  # B, cross-attention layers 0 and 2, heads, M, N
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 2, 3))
    assert maps[1, :, :, :, 3:].abs().max() == 0
    (x, context, _), out = seen[0]
    attended = maps[:, 0] @ layer._heads(layer.v(context))
    torch.testing.assert_close(layer.norm(x + layer.out(attended.transpose(1, 2).flatten(2))), out)


def test_instruction_aware_cross_attention_maps_follow_the_instruction():
    import torch

    from mmlm.connectors.qformer import QFormer, cross_attention_maps

    torch.manual_seed(0)
    qformer = QFormer(12, num_query_tokens=3, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24,
                      cross_attention_freq=1, vocab_size=20, initializer_range=0.5).eval()
    image = torch.randn(1, 5, 12)
    first = cross_attention_maps(qformer, image, input_ids=torch.tensor([[3, 4, 5]]),
                                 attention_mask=torch.ones(1, 3))
    second = cross_attention_maps(qformer, image, input_ids=torch.tensor([[7, 8, 9]]),
                                  attention_mask=torch.ones(1, 3))
    torch.testing.assert_close(first.sum(-1), torch.ones(1, 2, 2, 3))
    # every cross-attention reads queries that have already met the instruction in self-attention
    assert all((first[:, k] - second[:, k]).abs().max() > 1e-3 for k in range(2))



def test_value_spans_pair_with_the_leaves_of_the_parsed_prediction():
    from mmlm.evaluation.documents import field_confidences, prompt_length, value_spans

    tokens = ["<s_cord-v2>", "<s_menu>", "<s_nm>", "▁CO", "LA", "</s_nm>", "<sep/>", "<s_nm>", "▁TEA", "</s_nm>",
              "</s_menu>", "<s_class>", "<receipt/>", "</s_class>"]
    probabilities = [None, 0.9, 0.9, 0.5, 0.7, 0.9, 0.9, 0.9, 0.8, 0.9, 0.9, 0.9, 0.4, 0.9]
    assert value_spans(tokens, probabilities) == [[0.5, 0.7], [0.8], [0.4]]
    prediction = {"menu": [{"nm": "COLA"}, {"nm": "TEA"}], "class": "receipt"}
    assert field_confidences(tokens, probabilities, prediction) == {
        "menu[0].nm": {"mean": 0.6, "min": 0.5}, "menu[1].nm": {"mean": 0.8, "min": 0.8},
        "class": {"mean": 0.4, "min": 0.4}}
    assert field_confidences(tokens, probabilities, {"menu": "COLA"}) == {}  # three values, one leaf: no pairing
    docvqa = ["<s_docvqa>", "<s_question>", "▁what", "</s_question>", "<s_answer>", "▁12", "</s_answer>"]
    assert prompt_length(docvqa) == 5
    assert field_confidences(docvqa, [None] * 5 + [0.3, 0.9], {"question": "what", "answer": "12"}) == {
        "answer": {"mean": 0.3, "min": 0.3}}


def test_document_confidence_is_the_teacher_forced_probability_of_each_token(tmp_path):
    import io

    import torch
    from PIL import Image

    from mmlm.app.report_confidence import DocumentConfidence
    from mmlm.batch import Batch
    from mmlm.encoders import HFVisionEncoder
    from mmlm.language.cross_attention import CrossAttentionLM
    from mmlm.models import Donut
    from mmlm.piece_tokenizer import train_piece_tokenizer

    train_piece_tokenizer(["Total 12.50", "Latte 3.50", "Bagel 2.25 Cash"] * 4, tmp_path, vocab_size=50)
    torch.manual_seed(0)
    swin = {"image_size": [32, 32], "patch_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2],
            "window_size": 4}
    mbart = {"model_type": "mbart", "d_model": 32, "decoder_layers": 1, "encoder_layers": 1,
             "decoder_attention_heads": 2, "decoder_ffn_dim": 64, "max_position_embeddings": 64, "vocab_size": 60,
             "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "dropout": 0.0, "forced_eos_token_id": None}
    model = Donut(HFVisionEncoder(model_type="donut-swin", config=swin), CrossAttentionLM(config=mbart),
                  tokenizer=str(tmp_path)).eval()
    model.add_tokens(["<s_cord-v2>", "<s_total>", "</s_total>"])
    image = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 180, 90)).save(image, "PNG")
    confidence = DocumentConfidence(model)
    tokens, probabilities = confidence.probabilities(image.getvalue(), "<s_cord-v2><s_total>12.50</s_total>")
    assert tokens[:2] == ["<s_cord-v2>", "<s_total>"] and tokens[-1] == "</s_total>"
    assert probabilities[0] is None and all(0 < p <= 1 for p in probabilities[1:])
    ids = torch.tensor([model.tokenizer("<s_cord-v2><s_total>12.50</s_total>", add_special_tokens=False).input_ids])
    labels = ids.clone()
    labels[:, 0] = -100
    batch = Batch(pixels=confidence.transform(image.getvalue())[None], input_ids=ids,
                  attention_mask=torch.ones_like(ids), labels=labels, prompt_ids=ids[:, :1],
                  prompt_mask=torch.ones(1, 1, dtype=torch.long))
    nll = -torch.tensor(probabilities[1:]).log().mean()
    torch.testing.assert_close(model.training_loss(batch), nll, rtol=1e-4, atol=1e-5)
    fields = confidence.confidences(image.getvalue(), {"text": "<s_cord-v2><s_total>12.50</s_total>",
                                                       "prediction": {"total": "12.50"}})
    assert set(fields) == {"total"} and 0 < fields["total"]["min"] <= fields["total"]["mean"] <= 1


# --------------------------------------------------------------------------- a Donut run written by hand


@pytest.fixture(scope="module")
def donut_run(tmp_path_factory) -> Path:
    """A log dir as Donut's validation leaves it (documents.jsonl with references, metrics.csv, config.yaml naming
    the validation shards by a relative path), over synthetic receipts."""
    from datamodules.synthetic.documents import write_documents

    root = tmp_path_factory.mktemp("donut")
    write_documents(root / "data" / "receipts", "receipts", train=2, val=3, seed=0, shard_size=2, layouts=("shards",))
    log_dir = root / "runs" / "donut" / "lightning_logs" / "version_0"
    (log_dir / "predictions").mkdir(parents=True)
    (log_dir / "config.yaml").write_text(json.dumps({
        "model": {"class_path": "mmlm.models.Donut"},
        "data": {"class_path": "datamodules.DocumentDataModule",
                 "init_args": {"val_path": "data/receipts/shards/validation"}}}))
    (log_dir / "metrics.csv").write_text("epoch,step,train/loss,train/lr,val/ted_accuracy\n0,0,3.0,0.001,\n"
                                         "0,1,2.0,0.002,\n0,1,,,0.5\n")
    rows = []
    for i in range(3):
        truth = {"menu": [{"nm": "COLA", "price": f"{i}.00"}], "total": {"total_price": f"{i}.00"}}
        prediction = truth if i == 0 else {"menu": [{"nm": "COLA", "price": "9.99"}]}
        rows.append({"id": f"receipt_{i}.jpg", "key": f"{i:09d}", "task": "cord-v2", "text": "",
                     "prediction": prediction, "references": [truth],
                     "confidence": {"menu[0].nm": {"mean": 0.9, "min": 0.75}}})
    (log_dir / "predictions" / "val-documents-step1.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return log_dir


def test_donut_report_shows_documents_beside_their_ground_truth(donut_run, monkeypatch):
    monkeypatch.chdir(donut_run.parents[3])  # the config's shard path is relative to the workspace
    out = donut_run / "report.html"
    assert main(["report", str(donut_run.parents[2]), "--out", str(out), "--load-model"]) == 0
    page = out.read_text()
    assert "no model views: no checkpoint" in page
    assert page.count('<tr data-verdict="right" data-type="cord-v2">') == 1
    assert page.count('data-verdict="partial"') + page.count('data-verdict="wrong"') == 2
    assert page.count('src="data:image/') == 3 and "image not found" not in page
    assert 'class="f-diff"' in page and 'class="f-missing"' in page and "p̄ 0.90 · min 0.75" in page
    assert "train/loss" in page and "<svg" in page


def test_report_of_a_run_without_reachable_shards_says_so(donut_run, tmp_path, monkeypatch):
    moved = tmp_path / "copy"
    shutil.copytree(donut_run, moved)
    monkeypatch.chdir(tmp_path)
    page = build_report(moved).read_text()
    assert page.count("image not found") == 3 and "are not reachable" in page


# --------------------------------------------------------------------------- a retrieval run written by hand


def test_retrieval_report_shows_each_images_top_texts_with_its_own_marked(tmp_path, monkeypatch):
    """The ``.top.json`` of :func:`mmlm.evaluation.retrieval.top_matches` over 3 shapes images, one caption each, with
    a similarity that ranks image 0's caption first, image 1's second and image 2's not at all."""
    import torch

    from datamodules.synthetic.shapes import write_shapes
    from mmlm.evaluation.retrieval import top_matches

    write_shapes(tmp_path / "data", train=1, val=3, seed=0, shard_size=8, progress=False)
    log_dir = tmp_path / "runs" / "stage1" / "lightning_logs" / "version_0"
    (log_dir / "predictions").mkdir(parents=True)
    (log_dir / "config.yaml").write_text(json.dumps({"model": {"class_path": "mmlm.models.Blip2Stage1"}, "data": {
        "init_args": {"val": [{"urls": "data/val/captions-*.tar", "kind": "caption"}]}}}))
    texts = [{"id": f"val-{i:09d}", "key": f"{i:09d}", "text": f"caption <{i}>"} for i in range(3)]
    sim = torch.tensor([[0.9, 0.1, 0.2], [0.8, 0.7, 0.1], [0.9, 0.8, 0.0]])
    top = top_matches(sim, torch.arange(3), texts, k=2)
    (log_dir / "predictions" / "val-retrieval-step4.top.json").write_text(json.dumps(top))
    (log_dir / "predictions" / "val-retrieval-step4.json").write_text(json.dumps({"i2t_r1": 33.3, "r_mean": 50.0}))
    monkeypatch.chdir(tmp_path)
    page = build_report(log_dir).read_text()
    assert "i2t_r1" in page and page.count('data-type="retrieval"') == 3
    assert page.count('<tr data-verdict="right" data-type="retrieval">') == 1
    assert page.count('<tr data-verdict="partial" data-type="retrieval">') == 1
    assert page.count('<tr data-verdict="wrong" data-type="retrieval">') == 1
    assert page.count('<li class="f-same">✓ caption &lt;') == 2 and "caption &lt;2&gt;" in page
    assert page.count('src="data:image/jpeg;base64,') == 3 and "image not found" not in page
    first = page.index('<td>val-000000000<br>retrieval</td>')
    assert page.index("✓ caption &lt;0&gt;", first) < page.index("caption &lt;2&gt;", first)


# --------------------------------------------------------------------------- a tiny Frozen run, in a browser


def tiny_gpt2_dir(out: Path) -> Path:
    """A random 2-layer GPT-2 saved as a Hugging Face folder (the frozen LM of the tiny Frozen config)."""
    from conftest import TINY_GPT2
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(**{k: v for k, v in TINY_GPT2.items() if k != "model_type"})).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory) -> Path:
    """``mmlm fit`` of the tiny Frozen config (2 steps, validation at step 2) then ``mmlm validate --ckpt_path``;
    returns the validate run's log dir (where validate wrote ``report.html``)."""
    from datamodules.synthetic.shapes import write_shapes

    root = tmp_path_factory.mktemp("frozen")
    data = root / "data"
    write_shapes(data, train=16, val=16, seed=0, shard_size=8, progress=False)
    common = ["--config", str(CONFIGS / "tiny" / "frozen.yaml"), "--trainer.default_root_dir", str(root / "run"),
              "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "1",
              "--model.init_args.tokenizer", str(data / "tokenizer"),
              "--model.init_args.language_model.init_args.name_or_path", str(tiny_gpt2_dir(root / "lm")),
              "--model.init_args.generation.max_new_tokens", "3",
              "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "16",
              "--data.init_args.train", json.dumps([{"urls": str(data / "train" / "vqa-*.tar"), "kind": "vqa"}]),
              "--data.init_args.val", json.dumps([{"urls": str(data / "val" / "vqa-*.tar"), "kind": "vqa"},
                                                  {"urls": str(data / "val" / "captions-*.tar"), "kind": "caption"}])]
    assert main(["fit", *common, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                 "--trainer.log_every_n_steps", "1"]) == 0
    ckpt = sorted((root / "run").rglob("*.ckpt"))[-1]
    assert main(["validate", *common, "--ckpt_path", str(ckpt)]) == 0
    return max((root / "run" / "lightning_logs").iterdir())


@pytest.fixture(scope="module", params=["blip2_stage2", "blip2_vqa_instruct"])
def blip2_run(tmp_path_factory, request) -> Path:
    """``mmlm fit`` of a tiny BLIP-2 config (2 steps, validation at step 2; queries-only, or instruction-aware with
    a trained ViT), then ``mmlm report --load-model``; returns the run's log dir."""
    from datamodules.synthetic.shapes import write_shapes

    root = tmp_path_factory.mktemp("blip2")
    data = root / "data"
    write_shapes(data, train=8, val=8, seed=0, shard_size=8, progress=False)
    instruct = ["--model.init_args.qformer_tokenizer", str(data / "tokenizer")] if "instruct" in request.param else []
    assert main(["fit", "--config", str(CONFIGS / "tiny" / f"{request.param}.yaml"), *instruct,
                 "--trainer.default_root_dir", str(root / "run"), "--trainer.enable_progress_bar", "false",
                 "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                 "--model.init_args.tokenizer", str(data / "tokenizer"),
                 "--model.init_args.language_model.init_args.name_or_path", str(tiny_gpt2_dir(root / "lm")),
                 "--model.init_args.generation.max_new_tokens", "3",
                 "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "8",
                 "--data.init_args.train", json.dumps([{"urls": str(data / "train" / "vqa-*.tar"), "kind": "vqa"}]),
                 "--data.init_args.val", json.dumps([{"urls": str(data / "val" / "vqa-*.tar"), "kind": "vqa"}])]) == 0
    assert main(["report", str(root / "run"), "--load-model"]) == 0
    return max((root / "run" / "lightning_logs").iterdir())


def test_blip2_report_draws_each_querys_attention_under_the_images(blip2_run):
    page = (blip2_run / "report.html").read_text()
    assert "attention maps: Q-Former cross-attention per query under 8 images" in page
    assert page.count('<div class="attn">') == 8 and page.count('title="query ') == 8 * 8  # tiny config: M = 8


def test_validate_writes_the_report_with_training_curves_and_every_example(frozen_run):
    page = (frozen_run / "report.html").read_text()
    assert "evaluated: val at step 2" in page
    assert page.count('data-type="vqa · ') == 16 and page.count('data-type="caption"') == 16
    assert page.count('src="data:image/jpeg;base64,') == 32 and "image not found" not in page
    assert "train/loss" in page and "train/lr" in page and "val/vqa_acc" in page and "perQuestionType" in page
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", page), "the page must load nothing"


CHECKS = """<script>
window.__errors = [];
var __error = console.error;
console.error = function () { window.__errors.push(Array.from(arguments).join(' ')); __error.apply(console, arguments); };
window.addEventListener('error', function (e) { window.__errors.push('error: ' + (e.message || e.target.src)); }, true);
window.addEventListener('load', function () {
  var images = Array.from(document.images), rows = () => Array.from(document.querySelectorAll('#gallery tbody tr'));
  var visible = () => rows().filter(r => !r.hidden).length, out = {images: images.length, total: rows().length};
  out.decoded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  out.visibleBefore = visible();
  var select = document.getElementById('filter-type');
  select.value = select.options[1].value; select.dispatchEvent(new Event('change'));
  out.type = select.value; out.visibleAfter = visible();
  out.allOfType = rows().filter(r => !r.hidden).every(r => r.dataset.type === select.value);
  out.count = document.getElementById('shown-count').textContent;
  out.errors = window.__errors;
  var pre = document.createElement('pre'); pre.id = 'selftest'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def chromium(*args: str) -> str:
    """Run headless Chromium (no sandbox: tests may run as root); returns its stdout."""
    run = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          "--virtual-time-budget=10000", *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


NO_CHROMIUM = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y "
                                                           "chromium); the report is not checked in a browser")


@NO_CHROMIUM
def test_report_renders_in_chromium_images_decode_and_the_filter_works(frozen_run, tmp_path):
    check_in_chromium(frozen_run, tmp_path)


@NO_CHROMIUM
def test_blip2_report_with_attention_maps_renders_in_chromium(blip2_run, tmp_path):
    check_in_chromium(blip2_run, tmp_path)


def check_in_chromium(log_dir: Path, tmp_path: Path) -> None:
    """Headless chromium loads the run's report: no console errors, every image decoded, the gallery filter
    changes the visible rows; a screenshot is drawn (not blank)."""
    page = (log_dir / "report.html").read_text()
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("<head>", "<head>" + CHECKS, 1))
    dom = chromium(f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", checked.as_uri())
    found = re.search(r'<pre id="selftest">(.*?)</pre>', dom, flags=re.S)
    assert found, dom[-2000:]
    result = json.loads(html.unescape(found.group(1)))
    assert result["errors"] == []
    assert result["images"] == page.count("<img ") > result["total"] / 2 and result["decoded"] == result["images"]
    assert result["visibleBefore"] == result["total"] == page.count("<tr data-verdict=")
    assert 0 < result["visibleAfter"] < result["total"] and result["allOfType"]
    assert result["count"] == str(result["visibleAfter"])

    shot = tmp_path / "report.png"
    chromium(f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600", f"--screenshot={shot}",
             (log_dir / "report.html").as_uri())
    from PIL import Image

    pixels = Image.open(shot).convert("L")
    assert pixels.size == (1200, 1600) and pixels.getextrema()[0] < 100  # drawn: text and charts, not a blank page


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
