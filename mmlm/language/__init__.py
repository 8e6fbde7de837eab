"""Language-model adapters: Hugging Face causal and seq2seq LMs and the built-in Sub-LN decoder behind one interface."""

from mmlm.language.base import GenerationConfig, LanguageModel, LMOutput
from mmlm.language.cross_attention import CrossAttentionLM
from mmlm.language.hf_base import HFLanguageModel
from mmlm.language.hf_causal import HFCausalLM
from mmlm.language.hf_seq2seq import HFSeq2SeqLM
from mmlm.language.subln import (
    RelativePositions,
    Rotation,
    SubLNAttention,
    SubLNBlock,
    SubLNDecoder,
    SubLNFeedForward,
)

__all__ = [
    "CrossAttentionLM",
    "GenerationConfig",
    "HFCausalLM",
    "HFLanguageModel",
    "HFSeq2SeqLM",
    "LanguageModel",
    "LMOutput",
    "RelativePositions",
    "Rotation",
    "SubLNAttention",
    "SubLNBlock",
    "SubLNDecoder",
    "SubLNFeedForward",
]
