"""Donut built from parts: vocabulary growth, learning, gradient checkpointing, cached generation (BART-style
decoders with more decoder than encoder layers), prompts of different lengths, evaluation and prediction files,
checkpoints that carry their added tokens."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch.utils.data import DataLoader

from mmlm.batch import Batch
from mmlm.encoders import HFVisionEncoder
from mmlm.json_tokens import json_to_tokens
from mmlm.language import GenerationConfig
from mmlm.language.cross_attention import CrossAttentionLM
from mmlm.models import Donut
from mmlm.piece_tokenizer import train_piece_tokenizer

SWIN = {"image_size": [32, 32], "patch_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2],
        "window_size": 4, "drop_path_rate": 0.0}
MBART = {"model_type": "mbart", "d_model": 32, "decoder_layers": 3, "encoder_layers": 1, "decoder_attention_heads": 2,
         "decoder_ffn_dim": 64, "max_position_embeddings": 64, "scale_embedding": True, "add_final_layer_norm": True,
         "vocab_size": 60, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "dropout": 0.0,
         "forced_eos_token_id": None}  # MBart forces eos at the length limit by default
FIELDS = ["<s_cord-v2>", "<s_total>", "</s_total>", "<s_name>", "</s_name>", "<sep/>"]
DOCS = [{"total": "12.50"}, {"name": "Latte"}]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_piece_tokenizer(["Total 12.50", "Latte 3.50", "Bagel 2.25 Cash"] * 4, out, vocab_size=50)
    return out


def make_donut(tokenizer_dir, grad_checkpointing: bool = False, **kwargs) -> Donut:
    torch.manual_seed(0)
    encoder = HFVisionEncoder(model_type="donut-swin", config=SWIN, grad_checkpointing=grad_checkpointing)
    decoder = CrossAttentionLM(config=MBART, grad_checkpointing=grad_checkpointing)
    return Donut(encoder, decoder, tokenizer=str(tokenizer_dir), **kwargs)


def piece_donut(directory) -> Donut:
    """A tiny Donut in eval mode over a 50-piece tokenizer trained in ``directory`` on receipt words, with the
    :data:`FIELDS` tags added (the per-field confidence and attention tests' model)."""
    from mmlm.piece_tokenizer import train_piece_tokenizer

    train_piece_tokenizer(["Total 12.50", "Latte 3.50", "Bagel 2.25 Cash"] * 4, directory, vocab_size=50)
    model = make_donut(directory).eval()
    model.add_tokens(FIELDS)
    return model


def doc_batch(model: Donut, docs: list[dict], pixels: torch.Tensor | None = None) -> Batch:
    """Right-padded ``<s_cord-v2>`` + JSON tokens + eos, labels without the prompt; references as JSON."""
    tok = model.tokenizer
    rows = [tok("<s_cord-v2>" + json_to_tokens(d), add_special_tokens=False).input_ids + [tok.eos_token_id]
            for d in docs]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = (torch.arange(width) < torch.tensor([len(r) for r in rows])[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100
    if pixels is None:
        pixels = torch.stack([torch.full((3, 32, 32), float(i)) for i in range(len(docs))])
    return Batch(pixels=pixels, input_ids=ids, attention_mask=mask, labels=labels, prompt_ids=ids[:, :1],
                 prompt_mask=torch.ones(len(docs), 1, dtype=torch.long), keys=[f"k{i}" for i in range(len(docs))],
                 tasks=["document"] * len(docs), references=[[json.dumps(d)] for d in docs],
                 ids=[f"doc/{i}" for i in range(len(docs))])


def test_add_tokens_grows_the_decoder_once_in_a_fixed_order(tokenizer_dir):
    model = make_donut(tokenizer_dir)
    base = len(model.tokenizer)
    assert model.decoder.vocab_size == 60 and base < 60
    model.add_tokens(FIELDS + ["<s_total>"])
    ids = model.tokenizer.convert_tokens_to_ids(FIELDS)
    assert ids == list(range(base, base + len(FIELDS)))
    assert model.decoder.vocab_size == 60  # the table already had room
    many = [f"<s_k{i}>" for i in range(20)]
    model.add_tokens(many)
    assert model.decoder.vocab_size == len(model.tokenizer) == base + len(FIELDS) + 20
    assert model.decoder.model.lm_head.weight.shape[0] == model.decoder.vocab_size
    before = model.decoder.model.get_input_embeddings().weight.clone()
    model.add_tokens(FIELDS + many)  # idempotent
    assert torch.equal(before, model.decoder.model.get_input_embeddings().weight)
    assert model.added_tokens == FIELDS + many
    other = make_donut(tokenizer_dir)
    other.add_tokens(FIELDS + many)
    assert other.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    text = "<s_total>12.50</s_total>"
    assert model.tokenizer.convert_ids_to_tokens(model.tokenizer(text, add_special_tokens=False).input_ids)[0] == "<s_total>"


def test_cached_generation_equals_recomputing_with_more_decoder_than_encoder_layers(tokenizer_dir):
    """transformers sizes a BART/MBart cache by encoder_layers (1 here, 3 decoder layers): CrossAttentionLM aligns it."""
    model = make_donut(tokenizer_dir, generation=GenerationConfig(max_new_tokens=6), suppress_unk=False).eval()
    with torch.no_grad():
        for param in model.decoder.parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.3)
        model.add_tokens(FIELDS)
        batch = doc_batch(model, DOCS)
        states = model.encode_images(batch.pixels)
        cached = model.decoder.generate(model.decoder.embed(batch.prompt_ids), batch.prompt_mask, model.generation,
                                        encoder_states=states)
        ids = batch.prompt_ids
        for _ in range(cached.shape[1]):  # greedy by full recomputation, no cache
            logits = model.decoder(model.decoder.embed(ids), torch.ones_like(ids), encoder_states=states).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    finished = (cached == 2).cumsum(1) - (cached == 2).long() > 0  # positions after eos are padding
    assert torch.equal(cached[~finished], ids[:, 1:][~finished])
    assert len(set(cached[0].tolist())) > 1


def test_prompts_of_different_lengths_decode_as_if_unpadded(tokenizer_dir):
    model = make_donut(tokenizer_dir, generation=GenerationConfig(max_new_tokens=5), suppress_unk=False).eval()
    model.add_tokens(FIELDS)
    with torch.no_grad():
        for param in model.decoder.parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.3)
    tok = model.tokenizer
    prompts = [tok("<s_cord-v2><s_name>", add_special_tokens=False).input_ids, tok("<s_cord-v2>").input_ids]
    padded = torch.tensor([prompts[0], [tok.pad_token_id] + prompts[1]])
    batch = doc_batch(model, DOCS)
    batch.prompt_ids, batch.prompt_mask = padded, torch.tensor([[1, 1], [0, 1]])
    together = model.generate_text(batch)
    for row, prompt in enumerate(prompts):
        alone = doc_batch(model, DOCS[row:row + 1], batch.pixels[row:row + 1])
        alone.prompt_ids = torch.tensor([prompt])
        alone.prompt_mask = torch.ones_like(alone.prompt_ids)
        assert model.generate_text(alone) == [together[row]]


class RecordLoss(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), **kwargs)


def test_fit_learns_two_documents_then_reads_them_back(tokenizer_dir, tmp_path):
    """Two images → two JSONs: the loss falls, and greedy decoding then gives the exact JSON (TED accuracy 1)."""
    model = make_donut(tokenizer_dir, lr=3e-3, warmup_steps=0, min_lr_ratio=1.0, predictions_dir=str(tmp_path),
                       generation=GenerationConfig(max_new_tokens=12))
    model.add_tokens(FIELDS)
    batch = doc_batch(model, DOCS)
    loader = DataLoader([batch], batch_size=None, collate_fn=lambda b: b)
    record = RecordLoss()
    trainer(tmp_path, max_steps=60, enable_checkpointing=False, callbacks=[record]).fit(model, train_dataloaders=loader)
    assert record.losses[-1] < 0.1 * record.losses[0], [round(x, 2) for x in record.losses[::10]]
    scores = trainer(tmp_path).validate(model, dataloaders=loader)[0]
    assert scores["val/ted_accuracy"] == pytest.approx(1.0) and scores["val/f1"] == pytest.approx(1.0)
    assert scores["val/ned"] == pytest.approx(0.0)
    trainer(tmp_path).predict(model, dataloaders=loader)
    stem = tmp_path / "predictions" / "predict-documents-step0"
    rows = [json.loads(line) for line in stem.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == DOCS and [r["id"] for r in rows] == ["doc/0", "doc/1"]
    assert json.loads((stem / "doc_0.json").read_text()) == DOCS[0]
    assert json.loads((stem / "doc_1.json").read_text()) == DOCS[1]
    assert json.loads(stem.with_suffix(".generation.json").read_text())["count"] == 2


def test_gradient_checkpointing_gives_the_same_loss_and_grads(tokenizer_dir):
    plain, checkpointed = make_donut(tokenizer_dir), make_donut(tokenizer_dir, grad_checkpointing=True)
    from mmlm.language.recompute import hf_blocks, is_recomputed  # the decoder's blocks recompute in any mode
    assert all(is_recomputed(block) for block in hf_blocks(checkpointed.decoder.model))
    assert checkpointed.encoder.model.is_activation_checkpointing
    for model in (plain, checkpointed):
        model.add_tokens(FIELDS)
        model.train()
        model.training_loss(doc_batch(model, DOCS)).backward()
    torch.testing.assert_close(plain.training_loss(doc_batch(plain, DOCS)),
                               checkpointed.training_loss(doc_batch(checkpointed, DOCS)))
    grads = {name: p.grad for name, p in checkpointed.named_parameters()}
    for name, param in plain.named_parameters():
        assert param.grad is not None and grads[name] is not None, name
        torch.testing.assert_close(grads[name], param.grad, msg=name)


def test_checkpoint_carries_added_tokens(tokenizer_dir, tmp_path):
    model = make_donut(tokenizer_dir)
    model.add_tokens(FIELDS + [f"<s_k{i}>" for i in range(30)])
    checkpoint: dict = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    fresh = make_donut(tokenizer_dir)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    assert fresh.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    clash = make_donut(tokenizer_dir)
    clash.add_tokens(["<s_other>"])
    with pytest.raises(ValueError, match="differ"):
        clash.on_load_checkpoint(checkpoint)


def test_bf16_autocast_training_step_is_finite(tokenizer_dir):
    model = make_donut(tokenizer_dir)
    model.add_tokens(FIELDS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.training_loss(doc_batch(model, DOCS))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_docvqa_answers_are_parsed_beside_their_question_and_scored_alone(tokenizer_dir, monkeypatch, tmp_path):
    """Generation returns only the answer; evaluation parses prompt + answer as Donut does and scores the answer
    alone: ANLS and exact match 1 for the right answer, 0 for a wrong one (whole-JSON TED gave it 0.84)."""
    from mmlm.evaluation import ResultFiles

    model = make_donut(tokenizer_dir)
    model.add_tokens(["<s_docvqa>", "<s_question>", "</s_question>", "<s_answer>", "</s_answer>"])
    tok = model.tokenizer
    prompt = tok("<s_docvqa><s_question>Total</s_question><s_answer>", add_special_tokens=False).input_ids
    batch = doc_batch(model, [{"total": "12.50"}] * 2)
    batch.prompt_ids, batch.prompt_mask = torch.tensor([prompt] * 2), torch.ones(2, len(prompt), dtype=torch.long)
    batch.references = [[json.dumps({"question": "Total", "answer": "12.50"})]] * 2
    batch.tasks = ["docvqa"] * 2
    answers = [tok(a, add_special_tokens=False, return_tensors="pt").input_ids[0] for a in ("12.50</s_answer>", "7")]
    monkeypatch.setattr(model, "generate_ids", lambda b: [(b.prompt_ids[i], answers[i]) for i in range(2)])
    (evaluator,) = [e for e in model.evaluation.evaluators if type(e).__name__ == "DocumentEvaluator"]
    rows = evaluator.step(model, batch, "val").rows
    assert rows[0]["prediction"] == {"question": "Total", "answer": "12.50"} and rows[1]["prediction"] == {"question": "Total"}
    metrics = evaluator.finish(model, "val", ResultFiles(tmp_path, "val", 0))
    assert metrics == {"anls": 0.5, "exact_match": 0.5}  # the unclosed answer of row 1 is no answer: 0, not 0.79


def cnn_donut(tokenizer_dir, **kwargs) -> Donut:
    """A tiny Donut over a timm CNN with 2D sin-cos positions (the tiny recipe's parts): no transformers layout."""
    from mmlm.encoders import TimmEncoder

    torch.manual_seed(0)
    encoder = TimmEncoder("resnet10t", img_size=32, sincos_positions=True,
                          model_kwargs={"channels": [8, 16, 32, 32], "stem_width": 8, "output_stride": 16})
    return Donut(encoder, CrossAttentionLM(config=MBART), tokenizer=str(tokenizer_dir), **kwargs)


def test_a_cnn_donut_exports_weights_that_init_from_loads_with_its_tokens_first(tokenizer_dir, tmp_path):
    """``export_dir`` of a Donut with no transformers layout → ``weights.pt``; a fresh module built with
    ``init_from`` of it adds the tokens in their order, holds the same weights and gives the same loss, and goes on
    to add the next stage's tokens; a file of other parts is refused by key; ``mmlm export`` picks the mmlm format."""
    from mmlm.models.exported import export, load_exported

    model = cnn_donut(tokenizer_dir)
    assert not model.exports_to_hf and make_donut(tokenizer_dir).exports_to_hf
    with pytest.raises(TypeError, match="HFVisionEncoder"):
        model.to_hf(tmp_path / "hf")
    model.add_tokens(["<s_synthdog>", "<sep/>"])
    with torch.no_grad():
        model.encoder.model.conv1[0].weight.mul_(3.0)  # differs from a fresh module's
    path = model.save_weights(tmp_path / "read")
    assert path == tmp_path / "read" / "weights.pt"
    stage2 = cnn_donut(tokenizer_dir, init_from=str(path))
    assert stage2.added_tokens == ["<s_synthdog>", "<sep/>"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(stage2.state_dict()[name], value, msg=name)
    stage2.add_tokens(FIELDS)  # <sep/> is there already
    assert stage2.added_tokens == ["<s_synthdog>", "<sep/>", *FIELDS[:-1]]
    model.add_tokens(FIELDS)
    torch.testing.assert_close(stage2.training_loss(doc_batch(stage2, DOCS)), model.training_loss(doc_batch(model, DOCS)))
    with pytest.raises(RuntimeError, match="encoder"):
        Donut(HFVisionEncoder(model_type="donut-swin", config=SWIN), CrossAttentionLM(config=MBART),
              tokenizer=str(tokenizer_dir), init_from=str(path))

    checkpoint = tmp_path / "stage2.ckpt"
    trainer(tmp_path, max_steps=1, enable_checkpointing=False).fit(
        stage2, train_dataloaders=DataLoader([doc_batch(stage2, DOCS)], batch_size=None, collate_fn=lambda b: b))
    stage2.trainer.save_checkpoint(checkpoint)
    config = tmp_path / "donut.yaml"  # the module was built in Python: export reads its parts from a config
    config.write_text(yaml.safe_dump({"model": {"class_path": "mmlm.models.Donut", "init_args": {
        "tokenizer": str(tokenizer_dir), "init_from": str(path), "encoder": {
            "class_path": "mmlm.encoders.TimmEncoder", "init_args": {
                "name": "resnet10t", "img_size": 32, "sincos_positions": True,
                "model_kwargs": {"channels": [8, 16, 32, 32], "stem_width": 8, "output_stride": 16}}},
        "decoder": {"class_path": "mmlm.language.CrossAttentionLM", "init_args": {"config": MBART}}}}}))
    summary = export(checkpoint, tmp_path / "export", config)
    assert summary["format"] == "mmlm"
    reloaded = load_exported(tmp_path / "export")
    for name, value in stage2.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], value, msg=name)
