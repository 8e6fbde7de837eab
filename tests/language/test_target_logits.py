"""Logits only where the loss is: the LM adapters' loss runs the output head on the target positions only, and its
value and every parameter gradient equal the full-logits computation; full logits are still there when read."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmlm.attention_masks import positions_from_mask
from mmlm.language import CrossAttentionLM, HFCausalLM, HFSeq2SeqLM, SubLNDecoder
from mmlm.language.base import LMOutput
from mmlm.losses import (
    IGNORE_INDEX,
    causal_head_loss,
    causal_lm_loss,
    head_cross_entropy,
    token_cross_entropy,
)

V, D = 50, 32
IDS = {"vocab_size": V, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
CAUSAL = {
    "gpt2": {"model_type": "gpt2", "n_embd": D, "n_layer": 2, "n_head": 2, "n_positions": 64, **IDS},
    "opt": {"model_type": "opt", "hidden_size": D, "word_embed_proj_dim": D, "num_hidden_layers": 2,
            "num_attention_heads": 2, "ffn_dim": 64, "max_position_embeddings": 64, **IDS},
}
MBART = {"model_type": "mbart", "d_model": D, "decoder_layers": 2, "decoder_attention_heads": 2, "decoder_ffn_dim": 64,
         "vocab_size": V, "max_position_embeddings": 64, "scale_embedding": True, "add_final_layer_norm": True,
         "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}
T5 = {"model_type": "t5", "vocab_size": V, "d_model": D, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_heads": 2,
      "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}


def short_answers(batch: int = 4, length: int = 12, answer: int = 3, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``embeds [B, T, D]``, right-padded ``mask [B, T]`` and ``labels [B, T]`` with ``answer`` targets at the end
    of each row (rows of different lengths, so the targets sit at different columns)."""
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, length, D, generator=g)
    mask = torch.zeros(batch, length, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX)
    for i in range(batch):
        n = length - i
        mask[i, :n] = 1
        labels[i, n - answer:n] = torch.randint(3, V, (answer,), generator=g)
    return embeds, mask, labels


def grads(module: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every parameter gradient of ``loss`` (zeros where a parameter gets none)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True, retain_graph=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, got)}


def assert_same_loss_and_grads(module: nn.Module, ours: torch.Tensor, full: torch.Tensor) -> None:
    torch.testing.assert_close(ours, full)
    want, got = grads(module, full), grads(module, ours)
    assert want.keys() == got.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, name=name: f"{name}: {m}")


class CountingHead(nn.Module):
    """Wraps a head and records the number of rows each call sees."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head, self.rows = head, []

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.rows.append(hidden.shape[:-1].numel())
        return self.head(hidden)


@pytest.mark.parametrize("name", list(CAUSAL))
def test_hf_causal_loss_and_every_gradient_equal_the_full_logits(name):
    torch.manual_seed(0)
    lm = HFCausalLM(config=CAUSAL[name]).eval()  # no dropout
    embeds, mask, labels = short_answers()
    ours = lm(embeds, mask, labels)
    assert ours._logits is None  # nothing [B, T, V] was computed for the loss
    full = lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask),
                    use_cache=False).logits
    assert_same_loss_and_grads(lm, ours.loss, causal_lm_loss(full, labels))
    torch.testing.assert_close(ours.logits, full)


@pytest.mark.parametrize("name", list(CAUSAL))
def test_hf_causal_head_sees_only_the_target_rows(name):
    torch.manual_seed(0)
    lm = HFCausalLM(config=CAUSAL[name])
    counting = CountingHead(lm.model.get_output_embeddings())
    lm.model.set_output_embeddings(counting)
    embeds, mask, labels = short_answers()
    out = lm(embeds, mask, labels)
    assert counting.rows == [int((labels[:, 1:] != IGNORE_INDEX).sum())] == [12]
    assert out.logits.shape == (*labels.shape, V) and counting.rows[-1] == labels.numel()  # full ones when read


def test_subln_loss_and_every_gradient_equal_the_full_logits():
    torch.manual_seed(0)
    lm = SubLNDecoder(vocab_size=V, width=D, depth=2, num_heads=2, tie_embeddings=False).train()
    embeds, mask, labels = short_answers()
    ours = lm(embeds, mask, labels).loss
    assert_same_loss_and_grads(lm, ours, causal_lm_loss(lm(embeds, mask).logits, labels))


def test_cross_attention_loss_and_every_gradient_equal_the_full_logits():
    torch.manual_seed(0)
    lm = CrossAttentionLM(config=MBART).eval()  # no dropout
    embeds, mask, labels = short_answers()
    states = torch.randn(len(embeds), 5, D)
    ours = lm(embeds, mask, labels, encoder_states=states)
    assert ours._logits is None
    full = lm.model(inputs_embeds=embeds, attention_mask=mask, encoder_hidden_states=states, use_cache=False).logits
    assert_same_loss_and_grads(lm, ours.loss, causal_lm_loss(full, labels))
    torch.testing.assert_close(ours.logits, full)


def test_seq2seq_loss_reads_the_decoder_targets_only():
    """The seq2seq decoder's positions are the answer's own (padding aside): its loss keeps the model's logits,
    with the float32 cross-entropy on the targets only; value and gradients as before."""
    torch.manual_seed(0)
    lm = HFSeq2SeqLM(config=T5).eval()
    embeds, mask, _ = short_answers()
    labels = torch.tensor([[5, 6, 7], [8, 9, IGNORE_INDEX], [10, IGNORE_INDEX, IGNORE_INDEX], [11, 12, 13]])
    out = lm(embeds, mask, labels)
    full = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten(),
                                             ignore_index=IGNORE_INDEX)
    assert_same_loss_and_grads(lm, out.loss, full)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk_rows", [1024, 2, 5])
def test_chunked_head_loss_equals_the_full_loss(label_smoothing, chunk_rows):
    torch.manual_seed(0)
    head = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, V))
    hidden = torch.randn(3, 9, D, requires_grad=True)
    labels = torch.randint(0, V, (3, 9)).masked_fill(torch.rand(3, 9) < 0.3, IGNORE_INDEX)
    ours = causal_head_loss(hidden, head, labels, label_smoothing, chunk_rows=chunk_rows)
    full = causal_lm_loss(head(hidden), labels, label_smoothing)
    torch.testing.assert_close(ours, full)
    params = [hidden, *head.parameters()]
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(full, params)):
        torch.testing.assert_close(a, b)


def test_no_target_gives_zero_attached_to_the_graph():
    head = nn.Linear(D, V)
    hidden = torch.randn(2, 4, D, requires_grad=True)
    labels = torch.full((2, 4), IGNORE_INDEX)
    loss = head_cross_entropy(hidden, head, labels)
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert token_cross_entropy(head(hidden), labels).item() == 0


def test_deferred_logits_keep_the_forward_grad_mode():
    head = nn.Linear(D, V)
    with torch.no_grad():
        out = LMOutput(loss=None, hidden=torch.randn(1, 2, D), head=head)
    assert not out.logits.requires_grad and out.logits is out.logits  # computed once
    with pytest.raises(ValueError, match="hidden and head"):
        LMOutput(loss=None)
