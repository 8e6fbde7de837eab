"""Tokenizers: load by hub name or local directory, add special tokens, or train one on the fly."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mmlm.hub import require_local

IMAGE_TOKEN = "<image>"
SPECIALS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def load_tokenizer(name_or_path: str | Path, special_tokens: Iterable[str] = ()) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a hub id or a local directory and add ``special_tokens``.

    A tokenizer without a pad token (GPT-2, OPT-style) gets its eos token as pad.

    Raises:
        FileNotFoundError: ``name_or_path`` looks like a local path but does not exist.
    """
    require_local(name_or_path, "tokenizer directory")
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    new = [tok for tok in special_tokens if tok not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    return tokenizer


def train_word_tokenizer(texts: Iterable[str], out_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Train a lower-cased word-level tokenizer on ``texts`` (milliseconds for synthetic data).

    Words and punctuation become tokens; ``<pad> <s> </s> <unk>`` are ids 0–3. With ``out_dir``
    the tokenizer is saved there (``save_pretrained``) so ``load_tokenizer(out_dir)`` reloads it.
    """
    tok = Tokenizer(models.WordLevel(unk_token=SPECIALS["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIALS.values()))
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
