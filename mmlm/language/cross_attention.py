"""A Hugging Face text decoder that cross-attends to image tokens (Donut's MBart, BART, any ``…ForCausalLM``
with ``add_cross_attention``), behind the :class:`~mmlm.language.base.LanguageModel` interface.

``forward`` and ``generate`` take the encoder's tokens as ``encoder_states``. Two measured sharp edges of
transformers 5.x are handled here:

* a BART/MBart causal decoder sizes its KV cache by ``num_hidden_layers``, which these configs map to
  ``encoder_layers`` (unused by a causal decoder): with ``decoder_layers > encoder_layers`` cached generation
  raises ``IndexError``. :func:`align_cache_layers` sets ``encoder_layers = decoder_layers``;
* ``generate(encoder_hidden_states=…)`` on a decoder-only model stores the cross-attention keys in the
  self-attention cache (wrong positions, then an index error); an explicit ``EncoderDecoderCache`` keeps
  them apart.

Shape legend: B batch, N image tokens, T text tokens, T_new generated tokens, D width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache, EncoderDecoderCache, PretrainedConfig

from mmlm.language.base import GenerationConfig, LMOutput
from mmlm.language.hf_base import HFLanguageModel
from mmlm.lora import LoRA


@torch.no_grad()
def recorded_cross_attention(model: torch.nn.Module, run: Callable[[], Any]) -> torch.Tensor:
    """The cross-attention weights of every ``*.encoder_attn`` module of ``model`` (transformers' BART-family
    decoders: MBart, Bart) during ``run()`` → ``[B, L, heads, T, N]`` (``L`` layers; rows sum to 1).

    Forward pre-hooks record each cross-attention's queries and the encoder states, and the weights
    ``softmax(q kᵀ · scaling)`` are recomputed from the module's own projections, so they are the same whatever
    attention kernel ran (SDPA returns none) and the forward is untouched. The encoder states must be unpadded (Donut's
    are).

    Raises:
        ValueError: ``model`` has no such module.
    """
    records: list[torch.Tensor] = []

    def record(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        states = kwargs.get("key_value_states")
        q = module.q_proj(hidden).unflatten(-1, (-1, module.head_dim)).transpose(1, 2)  # [B, heads, T, d]
        k = module.k_proj(states).unflatten(-1, (-1, module.head_dim)).transpose(1, 2)  # [B, heads, N, d]
        records.append((q.float() @ k.float().transpose(-1, -2) * module.scaling).softmax(-1))

    modules = [m for name, m in model.named_modules() if name.endswith("encoder_attn")]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no encoder_attn modules (a BART-family decoder has)")
    hooks = [module.register_forward_pre_hook(record, with_kwargs=True) for module in modules]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(records, dim=1)


def align_cache_layers(config: PretrainedConfig) -> None:
    """``encoder_layers = decoder_layers`` on a BART-style decoder config (no-op for other configs), so the
    cache transformers builds from ``num_hidden_layers`` has one entry per decoder layer."""
    if hasattr(config, "decoder_layers") and hasattr(config, "encoder_layers"):
        config.encoder_layers = config.decoder_layers


def _require_states(encoder_states: torch.Tensor | None) -> torch.Tensor:
    if encoder_states is None:
        raise ValueError("CrossAttentionLM needs encoder_states [B, N, D] (the image tokens it attends to)")
    return encoder_states


class CrossAttentionLM(HFLanguageModel):
    """A causal decoder with cross-attention (``AutoModelForCausalLM``; ``is_decoder`` and
    ``add_cross_attention`` are forced on for a from-scratch ``config``).

    Arguments: see :class:`~mmlm.language.hf_base.HFLanguageModel`, e.g. ``config={"model_type": "mbart",
    "d_model": 64, "decoder_layers": 2, "decoder_attention_heads": 4, "decoder_ffn_dim": 128, "vocab_size": 300,
    "max_position_embeddings": 256, "scale_embedding": True, "add_final_layer_norm": True, "pad_token_id": 1,
    "bos_token_id": 0, "eos_token_id": 2}``. The cross-attention width is ``D`` (the encoder tokens must be
    projected to it first when the widths differ).
    """

    auto_class = AutoModelForCausalLM
    peft_task_type = "CAUSAL_LM"

    def __init__(self, name_or_path: str | None = None, config: dict | None = None, freeze: bool = False,
                 dtype: str | None = None, grad_checkpointing: bool = False, attn_implementation: str | None = None,
                 quantization: str | None = None, lora: LoRA | None = None) -> None:
        if config is not None:
            config = {**config, "is_decoder": True, "add_cross_attention": True}
        super().__init__(name_or_path=name_or_path, config=config, freeze=freeze, dtype=dtype,
                         grad_checkpointing=grad_checkpointing, attn_implementation=attn_implementation,
                         quantization=quantization, lora=lora)

    def check_model(self) -> None:
        """Raise when the decoder has no cross-attention; align the cache size (see the module docstring)."""
        if not getattr(self.model.config, "add_cross_attention", False):
            raise ValueError(f"{type(self.model).__name__} has no cross-attention (config.add_cross_attention is "
                             "False): CrossAttentionLM needs a decoder that attends to encoder states")
        align_cache_layers(self.model.config)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                encoder_states: torch.Tensor | None = None) -> LMOutput:
        """Teacher-forced pass over ``inputs_embeds [B, T, D]`` (right padding), attending to ``encoder_states
        [B, N, D]``. ``labels [B, T]`` are aligned with the inputs (shifted inside, ``-100`` ignored) → logits
        ``[B, T, V]`` (computed when read) and the mean next-token loss, whose head runs on the target positions
        only (:meth:`~mmlm.language.hf_base.HFLanguageModel.causal_output`)."""
        return self.causal_output(labels, inputs_embeds=inputs_embeds.to(self.dtype), attention_mask=attention_mask,
                                  encoder_hidden_states=_require_states(encoder_states).to(self.dtype))

    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, config: GenerationConfig,
                 encoder_states: torch.Tensor | None = None, **extra: Any) -> torch.Tensor:
        """Greedy, sampled or beam search (KV cache) after the prompt ``inputs_embeds [B, P, D]`` → new ids ``[B, T_new]``.

        Positions count from the first prompt column (transformers' BART/MBart take no per-row positions), so
        rows of a batch should have prompts of equal length (``Donut`` groups them). ``extra``: further
        ``generate`` keywords (e.g. ``bad_words_ids``). Runs in the current mode: call ``.eval()`` first.
        """
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        return self.model.generate(inputs_embeds=inputs_embeds.to(self.dtype), attention_mask=attention_mask,
                                   encoder_hidden_states=_require_states(encoder_states).to(self.dtype), cache=cache,
                                   **self.generation_kwargs(config), **extra)
