"""Strict key maps between :class:`mmlm.connectors.qformer.QFormer` and upstream formats.

* transformers' ``Blip2QFormerModel`` (+ the top-level ``query_tokens`` and, for the ITM/retrieval
  models, ``embeddings.word_embeddings`` / ``embeddings.position_embeddings``):
  :func:`qformer_from_hf` / :func:`qformer_to_hf`, one-to-one and exact both ways.
* ``transformers.BertModel`` (BLIP-2's initialisation): :func:`qformer_from_bert`; the MLM head of a
  ``BertForMaskedLM``/``BertForPreTraining`` checkpoint (BLIP-2's ITG head): :func:`bert_lm_head_state`.

Every key must be covered by a rule or an explicit ignore list, else ``RuntimeError`` names the keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from mmlm.hub import check_hf_loading_info, check_keys, load_state_dict_strict

if TYPE_CHECKING:
    from mmlm.connectors.qformer import QFormer

_HF_ATTENTION = [("attention.query", "q"), ("attention.key", "k"), ("attention.value", "v"),
                 ("output.dense", "out"), ("output.LayerNorm", "norm")]
_HF_FFN = [("intermediate{s}.dense", "fc1"), ("output{s}.dense", "fc2"), ("output{s}.LayerNorm", "norm")]

# (transformers module path, our module path); ``{i}`` is the layer index, parameters keep their names.
HF_QFORMER_MODULES: list[tuple[str, str]] = [
    ("query_tokens", "query_tokens"),
    ("layernorm", "embeddings.norm"),
    ("embeddings.word_embeddings", "embeddings.word"),
    ("embeddings.position_embeddings", "embeddings.position"),
    *[(f"encoder.layer.{{i}}.{kind}.{hf}", f"layers.{{i}}.{ours}_attn.{part}")
      for kind, ours in (("attention", "self"), ("crossattention", "cross")) for hf, part in _HF_ATTENTION],
    *[(f"encoder.layer.{{i}}.{hf.format(s=s)}", f"layers.{{i}}.{ours}_ffn.{part}")
      for s, ours in (("", "text"), ("_query", "query")) for hf, part in _HF_FFN],
]

# BertModel module path → ours; the text FFN is then copied to the query FFN.
BERT_MODULES: list[tuple[str, str]] = [
    ("embeddings.word_embeddings", "embeddings.word"),
    ("embeddings.position_embeddings", "embeddings.position"),
    ("embeddings.LayerNorm", "embeddings.norm"),
    *[(f"encoder.layer.{{i}}.attention.self.{hf}", f"layers.{{i}}.self_attn.{part}")
      for hf, part in (("query", "q"), ("key", "k"), ("value", "v"))],
    ("encoder.layer.{i}.attention.output.dense", "layers.{i}.self_attn.out"),
    ("encoder.layer.{i}.attention.output.LayerNorm", "layers.{i}.self_attn.norm"),
    *[(f"encoder.layer.{{i}}.{hf.format(s='')}", f"layers.{{i}}.text_ffn.{part}") for hf, part in _HF_FFN],
]
BERT_IGNORED = ("pooler.*",)
#: Pre-training heads a BERT checkpoint may carry besides the encoder (``bert-base-uncased`` has both).
BERT_HEADS = ("cls.predictions.*", "cls.seq_relationship.*")
BERT_TOKEN_TYPE = "embeddings.token_type_embeddings.weight"
BERT_NEW_KEYS = ("query_tokens", "layers.*.cross_attn.*", "vision_norm.*")
#: ``BertForMaskedLM`` MLM-head keys → :class:`mmlm.heads.TiedLMHead` keys (the decoder is the tied word table).
BERT_LM_HEAD = {"cls.predictions.transform.dense.weight": "dense.weight",
                "cls.predictions.transform.dense.bias": "dense.bias",
                "cls.predictions.transform.LayerNorm.weight": "norm.weight",
                "cls.predictions.transform.LayerNorm.bias": "norm.bias",
                "cls.predictions.bias": "bias"}


def _pattern(template: str) -> re.Pattern[str]:
    """``"encoder.layer.{i}.x"`` → a regex matching that module path plus an optional ``.param`` suffix."""
    body = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)")
    return re.compile(body + r"(?P<param>\.[A-Za-z_]+)?")


def _rename(key: str, rules: Sequence[tuple[str, str]]) -> str | None:
    """The key with the first matching rule applied (source → target), or ``None`` when none matches."""
    for source, target in rules:
        match = _pattern(source).fullmatch(key)
        if match:
            return target.format(i=match.group("i") if "{i}" in source else "") + (match.group("param") or "")
    return None


def rename_strict(state_dict: Mapping[str, torch.Tensor], rules: Sequence[tuple[str, str]], source: str,
                  ignore: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Rename every key by ``rules``; keys matching no rule and no ``ignore`` pattern raise (named)."""
    renamed = {key: _rename(key, rules) for key in state_dict}
    check_keys([], [key for key, new in renamed.items() if new is None], source, allow_unexpected=ignore)
    return {new: state_dict[key] for key, new in renamed.items() if new is not None}


def qformer_from_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``Blip2QFormerModel`` keys (+ ``query_tokens``, optional ``embeddings.*``) → our QFormer keys."""
    return rename_strict(state_dict, HF_QFORMER_MODULES, "Blip2QFormerModel state dict")


def qformer_to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our QFormer keys → ``Blip2QFormerModel`` keys (+ ``query_tokens``, ``embeddings.*`` with text)."""
    inverse = [(ours, hf) for hf, ours in HF_QFORMER_MODULES]
    return rename_strict(state_dict, inverse, "QFormer state dict")


def qformer_kwargs_from_hf(config: Any, num_query_tokens: int = 32) -> dict[str, Any]:
    """:class:`QFormer` arguments equal to a ``Blip2QFormerConfig`` (``with_text`` = ``use_qformer_text_input``) or an
    ``InstructBlipQFormerConfig`` (always with text).

    ``vision_norm=False``: ``Blip2QFormerModel`` reads image tokens that the vision model has already normalised
    (its ``post_layernorm``, LAVIS's ``ln_vision``); :func:`mmlm.convert.blip2_hf.blip2_from_hf` moves that norm
    into the Q-Former.
    """
    if config.hidden_act != "gelu":
        raise ValueError(f"QFormer uses exact GELU; Blip2QFormerConfig.hidden_act is {config.hidden_act!r}")
    return dict(encoder_width=config.encoder_hidden_size, num_query_tokens=num_query_tokens,
                hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
                num_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
                cross_attention_freq=config.cross_attention_frequency, vocab_size=config.vocab_size,
                max_position_embeddings=config.max_position_embeddings, layer_norm_eps=config.layer_norm_eps,
                dropout=config.hidden_dropout_prob,
                with_text=getattr(config, "use_qformer_text_input", True),  # InstructBLIP's always reads text
                initializer_range=config.initializer_range, vision_norm=False)


def qformer_from_bert(state_dict: Mapping[str, torch.Tensor], source: str = "BertModel state dict",
                      ) -> dict[str, torch.Tensor]:
    """``BertModel`` keys → our QFormer keys (no query tokens, no cross-attention).

    The pooler is ignored; token-type row 0 is folded into the position embeddings (text-only outputs
    then equal BERT's with ``token_type_ids = 0``); each query FFN is a copy of its layer's text FFN.
    """
    state = dict(state_dict)
    token_type = state.pop(BERT_TOKEN_TYPE, None)
    if token_type is None:
        raise RuntimeError(f"loading {source}: missing keys [{BERT_TOKEN_TYPE!r}]")
    ours = rename_strict(state, BERT_MODULES, source, ignore=BERT_IGNORED)
    ours["embeddings.position.weight"] = ours["embeddings.position.weight"] + token_type[0]
    for key in [k for k in ours if ".text_ffn." in k]:
        ours[key.replace(".text_ffn.", ".query_ffn.")] = ours[key].clone()
    return ours


def _bert_kwargs(config: Any) -> dict[str, Any]:
    """:class:`QFormer` size arguments equal to a ``BertConfig``."""
    if config.hidden_act != "gelu":
        raise ValueError(f"QFormer uses exact GELU; the BERT checkpoint's hidden_act is {config.hidden_act!r}")
    return dict(hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
                num_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
                vocab_size=config.vocab_size, max_position_embeddings=config.max_position_embeddings,
                layer_norm_eps=config.layer_norm_eps, dropout=config.hidden_dropout_prob,
                initializer_range=config.initializer_range)


def load_bert_into_qformer(cls: type[QFormer], name_or_path: str, encoder_width: int, num_query_tokens: int,
                           **options: Any) -> QFormer:
    """Build ``cls`` with BERT's sizes (and ``options``: the arguments BERT does not set, such as
    ``cross_attention_freq``) and load BERT strictly: only query tokens, cross-attention and the vision norm are
    new; a pooler may be absent and pre-training heads (``cls.*``) present."""
    from transformers import BertModel

    bert, info = BertModel.from_pretrained(name_or_path, output_loading_info=True)
    check_hf_loading_info(info, name_or_path, allow_missing=BERT_IGNORED, allow_unexpected=BERT_HEADS)
    model = cls(encoder_width, num_query_tokens=num_query_tokens, **{**_bert_kwargs(bert.config), **options})
    state = qformer_from_bert(bert.state_dict(), source=name_or_path)
    load_state_dict_strict(model, state, name_or_path, allow_missing=BERT_NEW_KEYS)
    return model


def bert_text_side(name_or_path: str) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The text side of a Q-Former (word and position embeddings, each layer's text FFN; :data:`TEXT_SIDE_KEYS`)
    from a BERT checkpoint, under our QFormer keys, with its ``vocab_size`` and ``max_position_embeddings``: what a
    queries-only Q-Former (transformers' BLIP-2 checkpoints drop the text side) needs to read instructions. BERT's
    self-attention, embedding norm and query FFNs are not taken: the checkpoint's own stay."""
    from transformers import BertModel

    from mmlm.connectors.qformer import TEXT_SIDE_KEYS

    bert, info = BertModel.from_pretrained(name_or_path, output_loading_info=True)
    check_hf_loading_info(info, name_or_path, allow_missing=BERT_IGNORED, allow_unexpected=BERT_HEADS)
    state = qformer_from_bert(bert.state_dict(), source=name_or_path)
    text = {k: v for k, v in state.items() if any(part in k for part in TEXT_SIDE_KEYS)}
    return text, dict(vocab_size=bert.config.vocab_size, max_position_embeddings=bert.config.max_position_embeddings)


def bert_lm_head_state(name_or_path: str, vocab_size: int) -> dict[str, torch.Tensor] | None:
    """The MLM head of a BERT checkpoint (``cls.predictions.*``, as LAVIS's ``BertLMHeadModel`` loads it) under
    :class:`mmlm.heads.TiedLMHead` keys, its bias zero-padded to ``vocab_size`` (rows added for ``[DEC]``);
    ``None`` when the checkpoint has no MLM head at all (a bare ``BertModel``, e.g. a sentence-transformers one).

    Raises:
        RuntimeError: the head is there only in part, or the checkpoint has keys of neither BERT nor its heads.
    """
    from transformers import BertForMaskedLM

    mlm, info = BertForMaskedLM.from_pretrained(name_or_path, output_loading_info=True)
    check_hf_loading_info(info, name_or_path, allow_missing=("cls.predictions.*",),  # the decoder is tied
                          allow_unexpected=("pooler.*", "bert.pooler.*", "cls.seq_relationship.*"))
    missing = sorted(k for k in info["missing_keys"] if k in BERT_LM_HEAD)
    if len(missing) == len(BERT_LM_HEAD):
        return None
    if missing:
        raise RuntimeError(f"loading the MLM head of {name_or_path}: missing keys {missing}")
    state = {ours: mlm.state_dict()[key].detach().clone() for key, ours in BERT_LM_HEAD.items()}
    if vocab_size < state["bias"].numel():
        raise ValueError(f"{name_or_path}: MLM head has {state['bias'].numel()} outputs, more than vocab_size {vocab_size}")
    state["bias"] = torch.cat([state["bias"], state["bias"].new_zeros(vocab_size - state["bias"].numel())])
    return state
