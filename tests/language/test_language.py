"""Contract and parity tests for the Hugging Face LM adapters on tiny random configs (CPU, no downloads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from jsonargparse import ArgumentParser

from mmlm.language import GenerationConfig, HFCausalLM, HFSeq2SeqLM, LanguageModel
from mmlm.losses import causal_lm_loss
from mmlm.tokenizers import train_word_tokenizer

V = 50
IDS = {"vocab_size": V, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
CAUSAL = {
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64,
             "initializer_range": 0.3, **IDS},
    "opt": {"model_type": "opt", "hidden_size": 32, "word_embed_proj_dim": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "ffn_dim": 64, "max_position_embeddings": 64, "init_std": 0.3, **IDS},
    "llama": {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "intermediate_size": 64, "max_position_embeddings": 64,
              "initializer_range": 0.3, **IDS},
}
SEQ2SEQ = {
    "t5": {"model_type": "t5", "vocab_size": V, "d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2,
           "num_heads": 2, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
           "initializer_factor": 3.0},
    # decoder_layers == encoder_layers: BART's generation cache breaks otherwise (transformers 5).
    "bart": {"model_type": "bart", "vocab_size": V, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
             "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64,
             "decoder_ffn_dim": 64, "max_position_embeddings": 64, "init_std": 0.3},
}
ALL = [(HFCausalLM, c) for c in CAUSAL.values()] + [(HFSeq2SeqLM, c) for c in SEQ2SEQ.values()]
ALL_IDS = list(CAUSAL) + list(SEQ2SEQ)
GREEDY = GenerationConfig(max_new_tokens=6)


def build(cls: type[LanguageModel], config: dict, **kwargs) -> LanguageModel:
    """A tiny adapter with reproducible random weights, in eval mode."""
    torch.manual_seed(0)
    return cls(config=config, **kwargs).eval()


def prompt_ids(batch: int = 3, length: int = 5, seed: int = 0) -> torch.Tensor:
    """Random non-special token ids ``[B, T]``."""
    return torch.randint(3, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_pad(rows: list[torch.Tensor], width: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad ``[T_i, D]`` rows with random vectors → ``embeds [B, T, D]``, ``mask [B, T]``."""
    length = max(len(r) for r in rows)
    embeds = torch.randn(len(rows), length, width)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        embeds[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    return embeds, mask


def run_forward(lm: LanguageModel, ids: torch.Tensor, labels: torch.Tensor | None = None):
    """Adapter forward from token ids; seq2seq models decode ``labels`` (or ``ids``) as targets."""
    if isinstance(lm, HFSeq2SeqLM) and labels is None:
        labels = ids
    return lm(lm.embed(ids), torch.ones_like(ids), labels)


def hf_new_tokens(lm: LanguageModel, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """The underlying model's own ``generate(input_ids=…)``, new tokens only (no decoder start)."""
    out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, **kwargs)
    return out[:, 1:] if isinstance(lm, HFSeq2SeqLM) else out[:, ids.shape[1]:]


@pytest.mark.parametrize("cls,config", ALL, ids=ALL_IDS)
def test_shapes_and_attributes(cls, config):
    lm = build(cls, config)
    ids = prompt_ids()
    assert (lm.width, lm.vocab_size) == (32, V)
    assert lm.embed(ids).shape == (3, 5, 32)
    assert run_forward(lm, ids).logits.shape == (3, 5, V)


@pytest.mark.parametrize("config", CAUSAL.values(), ids=list(CAUSAL))
def test_causal_logits_and_loss_match_hf(config):
    lm = build(HFCausalLM, config)
    ids = prompt_ids()
    labels = ids.clone()
    labels[:, :2] = -100
    ours = run_forward(lm, ids, labels)
    ref = lm.model(input_ids=ids, labels=labels)
    torch.testing.assert_close(ours.logits, ref.logits)
    torch.testing.assert_close(ours.loss, ref.loss)


@pytest.mark.parametrize("config", SEQ2SEQ.values(), ids=list(SEQ2SEQ))
def test_seq2seq_logits_and_loss_match_hf(config):
    lm = build(HFSeq2SeqLM, config)
    ids, labels = prompt_ids(), prompt_ids(length=4, seed=1)
    labels[:, -1] = -100
    ours = run_forward(lm, ids, labels)
    ref = lm.model(input_ids=ids, labels=labels)
    torch.testing.assert_close(ours.logits, ref.logits)
    torch.testing.assert_close(ours.loss, ref.loss)


def expected_loss(lm: LanguageModel, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over the kept targets, computed by hand (shifted for causal LMs)."""
    if isinstance(lm, HFCausalLM):
        logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    return F.cross_entropy(logits[keep], labels[keep])


@pytest.mark.parametrize("cls,config", ALL, ids=ALL_IDS)
def test_loss_ignores_minus_100(cls, config):
    lm = build(cls, config)
    ids = prompt_ids()
    labels = prompt_ids(seed=2)
    masked = labels.clone()
    masked[:, 1:3] = -100
    full, out = run_forward(lm, ids, labels), run_forward(lm, ids, masked)
    torch.testing.assert_close(out.loss, expected_loss(lm, out.logits, masked))
    assert not torch.allclose(full.loss, out.loss)


def test_causal_loss_does_not_see_ignored_positions():
    logits, labels = torch.randn(2, 6, V), prompt_ids(2, 6)
    labels[:, 3] = -100  # target of position 2
    changed = logits.clone()
    changed[:, 2] += 5 * torch.randn(2, V)
    changed[:, -1] += 5 * torch.randn(2, V)  # the last position has no next token
    torch.testing.assert_close(causal_lm_loss(changed, labels), causal_lm_loss(logits, labels))
    changed[:, 0] += 1.0 * torch.randn(2, V)
    assert not torch.allclose(causal_lm_loss(changed, labels), causal_lm_loss(logits, labels))


@pytest.mark.parametrize("cls,config", ALL, ids=ALL_IDS)
def test_all_ignored_loss_is_zero_not_nan(cls, config):
    lm = build(cls, config)
    ids = prompt_ids()
    assert run_forward(lm, ids, torch.full_like(ids, -100)).loss.item() == 0.0


@pytest.mark.parametrize("cls,config", ALL, ids=ALL_IDS)
def test_greedy_generate_matches_hf(cls, config):
    lm = build(cls, config)
    ids = prompt_ids()
    ours = lm.generate(lm.embed(ids), torch.ones_like(ids), GREEDY)
    assert torch.equal(ours, hf_new_tokens(lm, ids, max_new_tokens=GREEDY.max_new_tokens))
    assert ours.shape[0] == 3 and 1 <= ours.shape[1] <= GREEDY.max_new_tokens


@pytest.mark.parametrize("cls,config", ALL, ids=ALL_IDS)
def test_beam_search_shape_and_parity(cls, config):
    lm = build(cls, config)
    ids = prompt_ids()
    beam = GenerationConfig(max_new_tokens=5, num_beams=3)
    ours = lm.generate(lm.embed(ids), torch.ones_like(ids), beam)
    assert ours.shape[0] == 3 and 1 <= ours.shape[1] <= 5 and ours.dtype == torch.long
    assert torch.equal(ours, hf_new_tokens(lm, ids, max_new_tokens=5, num_beams=3))


def strip_pad(row: torch.Tensor, pad_id: int) -> list[int]:
    """Token ids with trailing padding removed."""
    ids = row.tolist()
    while ids and ids[-1] == pad_id:
        ids.pop()
    return ids


@pytest.mark.parametrize("cls,config", ALL, ids=ALL_IDS)
def test_left_padding_invariance_generate(cls, config):
    lm = build(cls, config)
    rows = [lm.embed(prompt_ids(1, n, seed=n))[0] for n in (2, 5, 3)]
    embeds, mask = left_pad(rows)
    batched = lm.generate(embeds, mask, GREEDY)
    pad = lm.model.generation_config.pad_token_id
    for row, out in zip(rows, batched):
        alone = lm.generate(row[None], torch.ones(1, len(row), dtype=torch.long), GREEDY)[0]
        assert strip_pad(out, pad) == strip_pad(alone, pad)


@pytest.mark.parametrize("config", CAUSAL.values(), ids=list(CAUSAL))
def test_left_padding_invariance_causal_logits(config):
    lm = build(HFCausalLM, config)
    rows = [lm.embed(prompt_ids(1, n, seed=n))[0] for n in (2, 5)]
    embeds, mask = left_pad(rows)
    logits = lm(embeds, mask).logits
    for row, out in zip(rows, logits):
        alone = lm(row[None], torch.ones(1, len(row), dtype=torch.long)).logits[0]
        torch.testing.assert_close(out[-len(row):], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config", SEQ2SEQ.values(), ids=list(SEQ2SEQ))
def test_padding_side_invariance_seq2seq_logits(config):
    lm = build(HFSeq2SeqLM, config)
    rows = [lm.embed(prompt_ids(1, n, seed=n))[0] for n in (2, 5)]
    embeds, mask = left_pad(rows)
    labels = prompt_ids(2, 3, seed=9)
    logits = lm(embeds, mask, labels).logits
    for i, row in enumerate(rows):
        alone = lm(row[None], torch.ones(1, len(row), dtype=torch.long), labels[i:i + 1]).logits[0]
        torch.testing.assert_close(logits[i], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cls,config", ALL, ids=ALL_IDS)
def test_save_and_reload_give_identical_logits(cls, config, tmp_path):
    lm = build(cls, config)
    ids = prompt_ids()
    lm.save_pretrained(str(tmp_path))
    again = cls(name_or_path=str(tmp_path)).eval()
    torch.testing.assert_close(run_forward(again, ids).logits, run_forward(lm, ids).logits, rtol=0, atol=0)
    assert torch.equal(again.generate(again.embed(ids), torch.ones_like(ids), GREEDY),
                       lm.generate(lm.embed(ids), torch.ones_like(ids), GREEDY))


@pytest.mark.parametrize("cls,config", ALL, ids=ALL_IDS)
def test_frozen_stays_eval_and_passes_grads_to_embeds(cls, config):
    lm = build(cls, config, freeze=True).train()
    assert not lm.training and not lm.model.training
    ids = prompt_ids()
    embeds = lm.embed(ids).detach().requires_grad_(True)
    labels = ids if isinstance(lm, HFCausalLM) else prompt_ids(seed=3)
    lm(embeds, torch.ones_like(ids), labels).loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in lm.parameters())
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0 and embeds.grad.isfinite().all()


@pytest.mark.parametrize("cls,config", ALL, ids=ALL_IDS)
def test_trainable_gets_grads_with_checkpointing(cls, config):
    lm = build(cls, config, grad_checkpointing=True).train()
    ids = prompt_ids()
    run_forward(lm, ids, ids).loss.backward()
    grads = [p.grad for p in lm.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.isfinite().all() for g in grads)


@pytest.mark.parametrize("cls,config", ALL, ids=ALL_IDS)
def test_bfloat16(cls, config):
    lm = build(cls, config, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in lm.parameters())
    ids = prompt_ids()
    out = lm(lm.embed(ids).float(), torch.ones_like(ids), ids)  # float32 inputs are cast
    assert out.logits.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32 and out.loss.isfinite()
    assert lm.generate(lm.embed(ids), torch.ones_like(ids), GREEDY).shape[0] == 3


@pytest.mark.parametrize("cls,config", ALL, ids=ALL_IDS)
def test_resize_token_embeddings_keeps_freezing(cls, config):
    lm = build(cls, config, freeze=True)
    lm.resize_token_embeddings(V + 3)
    assert lm.vocab_size == V + 3
    assert run_forward(lm, torch.tensor([[3, V + 2]])).logits.shape[-1] == V + 3
    assert not any(p.requires_grad for p in lm.parameters())


@pytest.mark.parametrize("cls", [HFCausalLM, HFSeq2SeqLM])
def test_exactly_one_of_name_or_path_and_config(cls, tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        cls()
    with pytest.raises(ValueError, match="exactly one"):
        cls(name_or_path=str(tmp_path), config=CAUSAL["gpt2"])


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="model_type"):
        HFCausalLM(config={"vocab_size": V})
    small_gpt2 = {k: v for k, v in CAUSAL["gpt2"].items() if not k.endswith("token_id")}
    with pytest.raises(ValueError, match="bos_token_id=50256"):  # GPT2Config's default
        HFCausalLM(config=small_gpt2)
    no_start = {k: v for k, v in SEQ2SEQ["t5"].items() if k != "decoder_start_token_id"}
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        HFSeq2SeqLM(config=no_start)
    with pytest.raises(ValueError, match="labels"):
        build(HFSeq2SeqLM, SEQ2SEQ["t5"])(torch.zeros(1, 2, 32), torch.ones(1, 2))


def test_word_tokenizer_with_small_gpt2():
    tok = train_word_tokenizer(["a red square left of a blue circle .", "what colour is the circle ?"])
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    config = {**CAUSAL["gpt2"], "vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
              "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    lm = build(HFCausalLM, config)
    batch = tok(["a red square", "what colour is the circle ?"], padding=True, return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    out = lm(lm.embed(batch.input_ids), batch.attention_mask, labels)
    assert out.logits.shape == (2, batch.input_ids.shape[1], len(tok)) and out.loss.isfinite()
    tok.padding_side = "left"
    prompt = tok(["a red square", "what colour is the circle ?"], padding=True, return_tensors="pt")
    new = lm.generate(lm.embed(prompt.input_ids), prompt.attention_mask, GREEDY)
    assert new.max() < len(tok) and isinstance(tok.batch_decode(new, skip_special_tokens=True)[0], str)


@pytest.mark.parametrize("cls,config", ALL, ids=ALL_IDS)
def test_builds_from_class_path_config(cls, config):
    parser = ArgumentParser()
    parser.add_argument("--lm", type=LanguageModel)
    parsed = parser.parse_object({"lm": {"class_path": f"{cls.__module__}.{cls.__name__}",
                                         "init_args": {"config": config, "freeze": True}}})
    lm = parser.instantiate(parsed).lm
    assert type(lm) is cls and lm.frozen and lm.width == 32


def test_generate_hides_only_the_padding_note_transformers_provokes_itself():
    """Prompts of one length (an all-ones mask, which transformers' ``generate`` drops) and a row that ends early
    (its later ids are pad ids fed back unmasked): transformers' own ``generate`` notes "We strongly recommend passing
    in an `attention_mask`"; mmlm's ``generate`` gives the same tokens without the note, and a forward of padded ids
    without a mask outside ``generate`` still notes it."""
    import logging

    import transformers.utils.logging as hf_logging

    from mmlm.language.hf_causal import UNMASKED_PADDING_NOTE

    lm = build(HFCausalLM, CAUSAL["gpt2"])
    ids = prompt_ids()
    first = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].argmax(-1)
    lm.model.generation_config.eos_token_id = int(first[0])  # row 0 ends at its first token, then pads
    notes = []
    handler = logging.Handler()
    handler.emit = lambda record: notes.append(record.getMessage())
    log = logging.getLogger("transformers.modeling_utils")
    log.addHandler(handler)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # other tests in the process may have quietened transformers
    try:
        def noted(run, fresh: bool = True) -> bool:
            notes.clear()
            if fresh:
                hf_logging.warning_once.cache_clear()
            out = run()
            return any(n.startswith(UNMASKED_PADDING_NOTE) for n in notes), out

        ours_noted, ours = noted(lambda: lm.generate(lm.embed(ids), torch.ones_like(ids), GREEDY))
        padded = ids.clone()
        padded[:, 0] = 0
        forward_noted, _ = noted(lambda: lm.model(input_ids=padded), fresh=False)  # not swallowed by the cache
        theirs_noted, theirs = noted(lambda: hf_new_tokens(lm, ids, max_new_tokens=GREEDY.max_new_tokens))
    finally:
        log.removeHandler(handler)
        hf_logging.set_verbosity(verbosity)
        hf_logging.warning_once.cache_clear()
    assert theirs_noted and not ours_noted and forward_noted


@pytest.mark.parametrize("config", CAUSAL.values(), ids=list(CAUSAL))
def test_packed_rows_give_each_sample_its_own_logits_and_loss(config):
    """Two samples packed in one row (segments 1 and 2, then padding) give the logits each has alone, and the
    packed loss equals the loss of the two rows padded."""
    from mmlm.losses import causal_lm_loss

    lm = build(HFCausalLM, config)
    a, b = prompt_ids(1, 5, seed=1), prompt_ids(1, 7, seed=2)
    row = torch.cat([a, b, torch.zeros(1, 2, dtype=torch.long)], dim=1)
    segments = torch.tensor([[1] * 5 + [2] * 7 + [0] * 2])
    labels = torch.where(segments > 0, row, -100)
    labels[0, 0] = labels[0, 5] = -100  # a sample's first token is not predicted from the one before
    out = lm(lm.embed(row), (segments > 0).long(), labels, segment_ids=segments)
    alone = [lm(lm.embed(ids), torch.ones_like(ids)).logits[0] for ids in (a, b)]
    torch.testing.assert_close(out.logits[0, :5], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[0, 5:12], alone[1], rtol=1e-5, atol=1e-5)
    padded = torch.cat([torch.cat([a, torch.zeros(1, 2, dtype=torch.long)], 1), b])
    mask = torch.tensor([[1] * 5 + [0] * 2, [1] * 7])
    padded_labels = torch.where(mask > 0, padded, -100)
    padded_labels[:, 0] = -100
    torch.testing.assert_close(out.loss, lm(lm.embed(padded), mask, padded_labels).loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, causal_lm_loss(out.logits, labels), rtol=1e-5, atol=1e-5)
