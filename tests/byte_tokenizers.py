"""A tiny byte-level BPE tokenizer for tests that need any text, special-token strings included, to round-trip
(the word-level test tokenizers map unknown characters to ``<unk>``)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

#: Special tokens in the order of their ids 0-3 (KOSMOS-1 / fairseq order).
SPECIALS = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}


def byte_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 400,
                       out_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (decode(encode(x)) == x for any x); saved to ``out_dir``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
