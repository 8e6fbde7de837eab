"""MetaLM: docking positions, loss masks, semi-causal information flow, learning, generation, checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from datamodules.pipeline.prefix_sentences import to_sentences
from mmlm.encoders import TimmEncoder
from mmlm.encoders.text import TransformerTextEncoder
from mmlm.fewshot import support_examples
from mmlm.language import GenerationConfig, HFCausalLM, SubLNDecoder
from mmlm.losses import IGNORE_INDEX
from mmlm.models.metalm import MetaLM, MetaLMPretraining
from mmlm.semicausal import semicausal_mask

TINY_VIT = {"patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2}


def build(shapes_data, cls=MetaLM, vision: bool = True, text: bool = True, hf: bool = False, tiny_gpt2=None,
          **kwargs) -> MetaLM:
    torch.manual_seed(0)
    lm = HFCausalLM(config=tiny_gpt2) if hf else SubLNDecoder(vocab_size=64, width=32, depth=2, num_heads=2)
    return cls(language_model=lm, tokenizer=str(shapes_data / "tokenizer"),
               vision_encoder=TimmEncoder("vit_tiny_patch16_224", img_size=32, model_kwargs=TINY_VIT) if vision else None,
               text_encoder=TransformerTextEncoder(vocab_size=64, width=24, depth=1, num_heads=2) if text else None,
               generation=GenerationConfig(max_new_tokens=3), **kwargs)


class Spy:
    """Records what the decoder receives in ``forward``."""

    def __init__(self, model: MetaLM) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        forward = model.language_model.forward

        def record(embeds, mask, labels=None):
            self.calls.append((embeds, mask, labels))
            return forward(embeds, mask, labels)

        model.language_model.forward = record


def test_finetuning_docks_image_and_encoded_question_and_scores_only_the_answer(shapes_data, shapes_batch):
    model = build(shapes_data).eval()
    batch, text = shapes_batch("vqa", size=4, model=model), shapes_batch("vqa", size=4)
    spy = Spy(model)
    model.training_loss(batch)
    embeds, mask, labels = spy.calls[0]
    images = model.encode_images(batch.images)
    m = images.shape[1]
    assert m == 5 and embeds.shape[1] == m + text.input_ids.shape[1]  # cls + 2x2 patches in front
    assert_close(embeds[:, :m], images)
    row = 0
    real = text.attention_mask[row].bool()
    ids = text.input_ids[row][real]
    question = (text.labels[row][real] == IGNORE_INDEX).nonzero().flatten()[1:]  # after bos
    span = question.tolist()
    encoded = model.text_connector(model.text_encoder(ids[span][None], torch.ones(1, len(span), dtype=torch.long)))
    assert_close(embeds[row, m + question[0]:m + question[-1] + 1], encoded[0], atol=1e-5, rtol=1e-5)
    bos = m  # the bos stays a causal token embedding
    assert_close(embeds[row, bos], model.language_model.embed(ids[:1])[0])
    assert torch.equal(labels[:, m:], text.labels) and bool((labels[:, :m] == IGNORE_INDEX).all())


def test_generation_docks_the_prompt_like_training(shapes_data, shapes_batch):
    model = build(shapes_data).eval()
    batch, text = shapes_batch("vqa", size=4, model=model), shapes_batch("vqa", size=4)
    calls = []
    generate = model.language_model.generate
    model.language_model.generate = lambda e, m, c: calls.append((e, m)) or generate(e, m, c)
    texts = model.generate_text(batch)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
    embeds, mask = calls[0]
    assert torch.equal(mask.sum(1), text.prompt_mask.sum(1) + 5) and bool(mask[:, -1].all())  # left-padded
    last = batch.prompt_ids[:, -1:]  # the prompt's last token ("Answer:" → ":") is encoded, not a token embedding
    assert not torch.allclose(embeds[:, -1], model.language_model.embed(last)[:, 0])


def test_pretraining_targets_every_causal_token_and_no_span_token(shapes_data, shapes_batch):
    model = build(shapes_data, cls=MetaLMPretraining, vision=False, span_ratio=0.5, min_span=1, max_span=3)
    batch = shapes_batch("caption", size=8, model=model)
    spy = Spy(model)
    torch.manual_seed(1)
    model.training_loss(batch)
    embeds, mask, labels = spy.calls[0]
    spans = (labels == IGNORE_INDEX) & batch.attention_mask.bool()
    spans[:, 0] = False  # bos: never a target of anything (nothing precedes it), never encoded
    assert int(spans.sum()) > 0, "no span was sampled"
    real = batch.attention_mask.bool() & ~spans
    assert torch.equal(labels[real], batch.input_ids[real])
    last = batch.attention_mask.sum(1) - 1
    assert torch.equal(labels[torch.arange(8), last], batch.input_ids[torch.arange(8), last])  # eos is a target
    changed = ~torch.isclose(embeds, model.language_model.embed(batch.input_ids)).all(-1)
    assert torch.equal(changed, spans), "exactly the span positions hold encoder vectors"


def test_information_flow_matches_the_semicausal_mask(shapes_data):
    """Changing token j changes decoder logits at t exactly where ``semicausal_mask[t, j]``: the encoder sees the
    future tokens of its span, the decoder never sees a later causal token."""
    model = build(shapes_data, vision=False).eval()
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11, 12, 2]])
    mask = torch.ones_like(ids)
    spans = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 2, 2, 0]])

    def logits(tokens):
        return model.language_model(model.docked_embeddings(tokens, [[]], spans, None), mask).logits[0]

    base = logits(ids)
    seen = torch.zeros(10, 10, dtype=torch.bool)
    for j in range(10):
        other = ids.clone()
        other[0, j] = 20 + j
        seen[:, j] = ~torch.isclose(logits(other), base, atol=1e-6).all(-1)
    assert torch.equal(seen, semicausal_mask(spans, mask)[0])
    assert bool(seen[2, 4]) and not bool(seen[5, 6])  # span look-ahead yes, causal look-ahead no


def test_finetuning_learns_a_fixed_batch(shapes_data, shapes_batch):
    model = build(shapes_data)
    batch = shapes_batch("vqa", size=8, model=model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model.training_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    grads = [p for p in model.text_encoder.parameters() if p.grad is not None]
    assert grads, "the text encoder is trained through the docked spans"


def test_baseline_without_encoders_is_a_plain_decoder(shapes_data, shapes_batch):
    model = build(shapes_data, vision=False, text=False).eval()
    batch = shapes_batch("vqa", size=4, model=model)
    assert model.image_preprocess is None
    spy = Spy(model)
    model.training_loss(batch)
    embeds, _, labels = spy.calls[0]
    assert_close(embeds, model.language_model.embed(batch.input_ids))
    assert torch.equal(labels, batch.labels)


def test_few_shot_prompts_put_encoded_demonstrations_before_the_query(shapes_data, shapes_batch):
    model = build(shapes_data).eval()
    batch = shapes_batch("caption", size=6, model=model, eval_shots=2)
    text = shapes_batch("caption", size=6)
    calls = []
    generate = model.language_model.generate
    model.language_model.generate = lambda e, m, c: calls.append((e, m)) or generate(e, m, c)
    assert len(model.generate_text(batch)) == 6
    embeds, mask = calls[0]
    for i in range(6):
        support = support_examples(text.pixels, i, 2)
        assert len(support) == 2 and i not in support
        demos = sum(5 + int(text.attention_mask[j].sum()) for j in support)  # image slots + bos prompt target eos
        assert int(mask[i].sum()) == demos + 5 + int(text.prompt_mask[i].sum())
    answers = batch.prompt_labels != IGNORE_INDEX  # the demonstrations' captions stay causal token embeddings
    assert bool(answers.any())
    assert_close(embeds[answers], model.language_model.embed(batch.prompt_ids)[answers])


def test_hf_causal_lm_decoder_trains_and_generates(shapes_data, shapes_batch, tiny_gpt2):
    model = build(shapes_data, hf=True, tiny_gpt2=tiny_gpt2)
    batch = shapes_batch("vqa", size=4, model=model)
    loss = model.training_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and model.vision_connector.net[0].weight.grad is not None
    assert len(model.eval().generate_text(batch)) == 4


def test_pretraining_checkpoint_starts_finetuning(shapes_data, tmp_path):
    pretrained = build(shapes_data, cls=MetaLMPretraining, spans="prefix")
    torch.save({"state_dict": pretrained.state_dict()}, tmp_path / "pre.ckpt")
    finetuned = build(shapes_data, init_from=str(tmp_path / "pre.ckpt"))
    for (name, a), b in zip(pretrained.state_dict().items(), finetuned.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="text_encoder"):
        build(shapes_data, cls=MetaLMPretraining, text=False)


def test_text_only_semicausal_pretraining_learns_from_a_text_corpus(shapes_data):
    from datamodules.text_corpora import TextDataModule

    dm = TextDataModule(val_urls=str(shapes_data / "val" / "captions-*.tar"), tokenizer=str(shapes_data / "tokenizer"),
                        batch_size=8)
    dm.setup("validate")
    model = build(shapes_data, cls=MetaLMPretraining, vision=False, span_ratio=0.3, min_span=1, max_span=2)
    batch = to_sentences(next(iter(dm.val_dataloader())), model.image_marker, model.tokenizer)  # as a trainer gives it
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(20):
        loss = model.training_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
