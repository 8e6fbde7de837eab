"""KOSMOS-1 module: packed = padded loss (Sub-LN and transformers LMs), text-only loss, image spans matter, k-shot
generation, learning."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from datamodules.interleaved import InterleavedDataModule, MixSource
from datamodules.pipeline.packing import collate_rows
from datamodules.synthetic.interleaved import write_interleaved
from mmlm.connectors import Resampler
from mmlm.encoders import TimmEncoder
from mmlm.language import HFCausalLM, SubLNDecoder
from mmlm.losses import causal_lm_loss
from mmlm.models import Kosmos1
from mmlm.sentences import IGNORE_INDEX


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_interleaved(tmp_path_factory.mktemp("kosmos"), docs=12, pairs=6, texts=6, val=8, support=6,
                             shard_size=3)


def make_model(synth, tiny_resnet, language_model=None, **kwargs) -> Kosmos1:
    torch.manual_seed(0)
    encoder = TimmEncoder("resnet10t", img_size=32, model_kwargs=tiny_resnet)
    lm = language_model or SubLNDecoder(vocab_size=64, width=32, depth=2, num_heads=2, ffn_mult=2,
                                        max_positions=128, position="xpos")
    connector = lambda dv, d: Resampler(dv, d, num_latents=3, depth=1, num_heads=2, head_dim=8)  # noqa: E731
    return Kosmos1(encoder=encoder, language_model=lm, tokenizer=synth["tokenizer"], connector=connector,
                   stop_strings=["."], **kwargs).eval()


def make_data(synth, model, **kwargs) -> InterleavedDataModule:
    urls = synth["urls"]
    args = dict(train=[MixSource(urls["docs"]), MixSource(urls["captions"], "caption"), MixSource(urls["text"], "text")],
                val=[MixSource(urls["val"], kind="vqa")], batch_size=6, max_tokens=96, vqa_prompt="{}",
                demo_template="{prompt} {target}.", support=urls["support"], match_question_type=True,
                shuffle_buffer=0, epoch_samples=24, resampled=True)
    data = InterleavedDataModule(**{**args, **kwargs})
    data.trainer = SimpleNamespace(lightning_module=model, global_rank=0, world_size=1, current_epoch=0)
    data.setup()
    return data


@pytest.fixture
def model(synth, tiny_resnet):
    return make_model(synth, tiny_resnet)


def samples(data, n: int = 6):
    build = data.example_fn("fit", data.sources["fit"])
    pipeline = data.build_pipeline("fit", data.sources["fit"], rank=0, world_size=1)
    pipeline.collate = lambda chunk: chunk
    return next(iter(pipeline)).batch[:n], build


def test_the_datamodule_takes_marker_tokenizer_and_size_from_the_model(synth, model):
    data = make_data(synth, model)
    assert data.resolved.marker.count == model.image_tokens == 3 and data.resolved.tokenizer is model.tokenizer
    assert tuple(data.resolved.preprocess.size) == (32, 32)


def test_packed_loss_equals_padded_loss(synth, model):
    data = make_data(synth, model)
    chunk, _ = samples(data)
    padded = collate_rows([[s] for s in chunk], model.tokenizer.pad_token_id)
    packed = collate_rows([chunk[:3], chunk[3:]], model.tokenizer.pad_token_id)
    assert packed.packed and not padded.packed and len(packed) == 2
    torch.testing.assert_close(model.training_loss(packed), model.training_loss(padded), atol=1e-5, rtol=1e-5)


def test_loss_is_on_text_tokens_only(synth, model):
    batch = next(iter(make_data(synth, model, pack=False).train_dataloader()))
    for row, spans in enumerate(batch.spans):
        for span in spans:
            begin, end = span.outer
            assert (batch.labels[row, begin:end] == IGNORE_INDEX).all()
    assert (batch.labels[batch.attention_mask == 0] == IGNORE_INDEX).all()
    embeds = model.sentence_embeds(batch.input_ids, batch.spans, batch.images)
    logits = model.language_model(embeds, batch.attention_mask).logits
    torch.testing.assert_close(model.training_loss(batch), causal_lm_loss(logits, batch.labels))


def test_image_spans_change_the_output_after_them_only(synth, model):
    batch = next(iter(make_data(synth, model, pack=False).train_dataloader()))
    row = next(r for r, spans in enumerate(batch.spans) if spans)
    first = batch.spans[row][0].start
    embeds = model.sentence_embeds(batch.input_ids, batch.spans, batch.images)
    other = model.sentence_embeds(batch.input_ids, batch.spans, batch.images.flip(0) + 1.0)
    a = model.language_model(embeds, batch.attention_mask).logits[row]
    b = model.language_model(other, batch.attention_mask).logits[row]
    torch.testing.assert_close(a[:first], b[:first])
    assert not torch.allclose(a[first:], b[first:])


def test_hf_lm_packed_loss_equals_padded_loss(synth, tiny_resnet, tiny_gpt2):
    """A transformers causal LM takes packed rows too (a 4D block-diagonal mask, positions restarting)."""
    model = make_model(synth, tiny_resnet, language_model=HFCausalLM(config=tiny_gpt2))
    chunk, _ = samples(make_data(synth, model))
    padded = collate_rows([[s] for s in chunk], model.tokenizer.pad_token_id)
    packed = collate_rows([chunk[:3], chunk[3:]], model.tokenizer.pad_token_id)
    assert packed.packed
    torch.testing.assert_close(model.training_loss(packed), model.training_loss(padded), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shots", [0, 2])
def test_k_shot_generation_gives_one_cut_answer_per_query(synth, model, shots):
    batch = next(iter(make_data(synth, model, shots=shots).val_dataloader()))
    texts = model.generate_text(batch)
    assert len(texts) == len(batch) and all(isinstance(t, str) and "." not in t for t in texts)
    assert model.cut(" red . blue") == "red"
    assert all(len(spans) == shots + 1 for spans in batch.prompt_spans)


def test_tiny_kosmos_learns_a_batch(synth, model):
    batch = next(iter(make_data(synth, model).train_dataloader()))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = float(model.training_loss(batch).detach())
    for _ in range(40):
        loss = model.training_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.5 * first
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.connector.parameters())
