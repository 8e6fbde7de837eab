"""Donut (Kim et al. 2022): OCR-free document understanding with a Swin encoder and a BART-style decoder.

document image ─► encoder (DonutSwin) [B, N, Dv] ─► (linear when Dv ≠ D) ─► cross-attention of the decoder
(MBart) ─► task prompt + JSON-as-tokens (``<s_key>…</s_key>``, ``<sep/>``; :mod:`mmlm.json_tokens`)

One model serves every task: reading (pretraining, ``<s_synthdog>`` + the text), extraction (``<s_cord-v2>``),
classification and document VQA; the task is the prompt. Training is teacher forcing with the next-token loss
on the target (``labels`` hold ``-100`` on the prompt and padding); generation continues the prompt with a KV
cache. Half precision: train under Lightning's ``precision: bf16-mixed`` (autocast; the weights stay fp32).
Gradient checkpointing: ``grad_checkpointing`` of the encoder and decoder parts (or of :meth:`Donut.from_hf`).
Weight import/export of transformers' ``VisionEncoderDecoderModel``: :meth:`Donut.from_hf`, :meth:`Donut.to_hf`
(:mod:`mmlm.convert.donut_hf`).

Shape legend: B batch, N image tokens, Dv encoder width, D decoder width, T text tokens, P prompt tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from typing_extensions import Unpack

from mmlm.batch import Batch
from mmlm.checkpointing import load_checkpoint_file
from mmlm.convert.donut_hf import donut_from_hf, donut_to_hf, hf_exportable
from mmlm.data_spec import DataSpec
from mmlm.encoders.base import VisionEncoder
from mmlm.hub import load_state_dict_strict
from mmlm.language.base import LMOutput
from mmlm.language.cross_attention import CrossAttentionLM
from mmlm.lora import LoRA
from mmlm.models.base import ModuleSettings
from mmlm.models.documents import DocumentModule
from mmlm.tokenizers import load_tokenizer

ADDED_TOKENS_KEY = "donut_added_tokens"
#: what ``on_fit_end`` writes under ``export_dir`` for a model without a transformers layout (``init_from`` loads it)
WEIGHTS_FILE = "weights.pt"


def prompt_groups(prompt_mask: torch.Tensor) -> dict[int, torch.Tensor]:
    """``prompt_mask [B, P]`` → ``{prompt length: row indices}`` (rows of a group decode together)."""
    lengths = prompt_mask.sum(1)
    return {int(n): (lengths == n).nonzero().flatten() for n in lengths.unique()}


class Donut(DocumentModule):
    """Donut: image encoder + cross-attending text decoder, trained to emit a task's JSON as tokens.

    Args:
        encoder: the document encoder (``HFVisionEncoder`` over DonutSwin; its ``preprocess`` sets the input
            size, e.g. 2560×1920 or 1280×960, and mean/std).
        decoder: the text decoder with cross-attention (MBart for Donut).
        tokenizer: hub id or local directory (Donut: XLM-RoBERTa sentencepiece; a trained
            :func:`mmlm.piece_tokenizer.train_piece_tokenizer` one for tiny runs). Task and field tokens are added
            with :meth:`add_tokens` (the document datamodule calls it in ``setup``).
        align_long_axis: the datamodule rotates a document by 90° when its long axis disagrees with the input
            size's (Donut's ``do_align_long_axis``).
        suppress_unk: never generate ``<unk>`` (Donut's ``bad_words_ids``).
        export_dir: where ``on_fit_end`` writes the trained model: in transformers' layout (:meth:`to_hf`) when
            its parts have one, e.g. the reading-pretrained model that the extraction finetuning then loads with
            :meth:`from_hf`; otherwise (a timm CNN encoder) ``export_dir/weights.pt`` for ``init_from``
            (:meth:`save_weights`).
        init_from: a Lightning checkpoint (or :meth:`save_weights` file) of a Donut with the same parts whose
            weights start this module: its added tokens are added first, in their order, then its weights are
            loaded strictly.
        **kwargs: optimisation and evaluation settings of :class:`~mmlm.models.base.MultimodalModule`.
    """

    def __init__(self, encoder: VisionEncoder, decoder: CrossAttentionLM, tokenizer: str,
                 align_long_axis: bool = False, suppress_unk: bool = True, export_dir: str | None = None,
                 init_from: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()  # Donut.from_hf records its own arguments instead (record_builder)
        self.encoder, self.decoder = encoder, decoder
        self.enc_to_dec_proj = nn.Linear(encoder.width, decoder.width) if encoder.width != decoder.width else None
        self.align_long_axis, self.suppress_unk, self.export_dir = align_long_axis, suppress_unk, export_dir
        self.tokenizer = load_tokenizer(tokenizer)
        self.added_tokens: list[str] = []
        self._fit_vocabulary()
        if init_from is not None:
            checkpoint = load_checkpoint_file(init_from)
            self.add_tokens(checkpoint.get(ADDED_TOKENS_KEY, []))
            load_state_dict_strict(self, checkpoint["state_dict"], init_from)

    @classmethod
    def from_hf(cls, name_or_path: str, tokenizer: str | None = None, image_size: tuple[int, int] | None = None,
                grad_checkpointing: bool = False, align_long_axis: bool | None = None, suppress_unk: bool = True,
                export_dir: str | None = None, attn_implementation: str | None = None,
                quantization: str | None = None, lora: LoRA | None = None,
                **settings: Unpack[ModuleSettings]) -> Donut:
        """Build from a transformers ``VisionEncoderDecoderModel`` directory or hub id (naver-clova-ix/donut-base
        layout), strictly; see :func:`mmlm.convert.donut_hf.donut_from_hf`.

        Args:
            name_or_path: the checkpoint's directory or hub id.
            tokenizer: hub id or directory of the tokenizer (default: the checkpoint's).
            image_size: ``(H, W)`` instead of the checkpoint's.
            grad_checkpointing: recompute the encoder's and decoder's activations in the backward pass.
            align_long_axis: rotate portrait pages to landscape; ``None`` keeps the processor's setting.
            suppress_unk: see :class:`Donut`.
            export_dir: see :class:`Donut`.
            attn_implementation: the decoder's attention kernel (``"sdpa"``, ``"eager"``…); ``None`` keeps
                transformers' default.
            quantization: ``"4bit"``/``"8bit"`` bitsandbytes decoder weights (CUDA only; docs/lora.md).
            lora: LoRA adapters on the decoder (:class:`~mmlm.lora.LoRA`): they train, its base weights are frozen.
                Token rows added later (task and field tokens, :meth:`add_tokens`) are then frozen too, at their
                initial values.
            **settings: any :class:`~mmlm.models.base.ModuleSettings` key (``lr``, ``generation``, …); LightningCLI
                checks each one from YAML (``class_path: mmlm.models.Donut.from_hf``).
        """
        lora = LoRA(**lora) if isinstance(lora, dict) else lora  # a checkpoint records it as a dict
        kwargs = dict(settings, suppress_unk=suppress_unk, export_dir=export_dir)
        options = dict(attn_implementation=attn_implementation, quantization=quantization, lora=lora)
        model = donut_from_hf(cls, name_or_path, tokenizer=tokenizer, image_size=image_size,
                              grad_checkpointing=grad_checkpointing, **options, **kwargs)
        if align_long_axis is not None:
            model.align_long_axis = align_long_axis
        model.record_builder("from_hf", dict(name_or_path=name_or_path, tokenizer=tokenizer, image_size=image_size,
                                             grad_checkpointing=grad_checkpointing, align_long_axis=align_long_axis,
                                             **options, **kwargs))
        return model

    def to_hf(self, directory: str | Path, state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write a directory that ``VisionEncoderDecoderModel.from_pretrained`` and ``DonutProcessor`` load;
        ``state_dict``: this module's weights as gathered from FSDP2 shards, written instead of its own."""
        donut_to_hf(self, directory, state_dict)

    @property
    def exports_to_hf(self) -> bool:
        """Whether :meth:`to_hf` can write this model (its parts have a place in ``VisionEncoderDecoderModel``)."""
        return hf_exportable(self)

    def save_weights(self, directory: str | Path, state_dict: Mapping[str, torch.Tensor] | None = None) -> Path:
        """Write ``directory/weights.pt``: ``{"state_dict", "donut_added_tokens"}`` (``state_dict``'s tensors when
        given, as gathered from FSDP2 shards), which ``init_from`` loads with ``weights_only=True``; returns it."""
        state = self.state_dict() if state_dict is None else state_dict
        path = Path(directory) / WEIGHTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": {k: v.detach().cpu() for k, v in state.items()},
                    ADDED_TOKENS_KEY: list(self.added_tokens)}, path)
        return path

    def on_fit_end(self) -> None:
        """Export to ``export_dir`` when one is set: :meth:`to_hf`, or :meth:`save_weights` for parts without a
        transformers layout (rank zero writes; every rank gathers sharded weights)."""
        if self.export_dir is None:
            return
        state = self.gathered_state_dict()
        if self.trainer.is_global_zero:
            if self.exports_to_hf:
                self.to_hf(self.export_dir, state)
            else:
                self.save_weights(self.export_dir, state)

    # --- vocabulary ----------------------------------------------------------------------------
    def data_spec(self) -> DataSpec:
        """The base's spec plus the page alignment and :meth:`add_tokens` for the data's field tags."""
        return replace(super().data_spec(), align_long_axis=self.align_long_axis, add_tokens=self.add_tokens)

    def add_tokens(self, tokens: list[str]) -> None:
        """Add ``tokens`` (task prompts, ``<s_key>``/``</s_key>``, ``<sep/>``, categories) as special tokens, in
        the given order, skipping those the tokenizer has; grow the decoder's embeddings and head to fit.

        Idempotent, and deterministic for a given order; the added tokens are stored in Lightning checkpoints
        and added again on load, before the weights.
        """
        vocab = self.tokenizer.get_vocab()
        new = [token for token in dict.fromkeys(tokens) if token not in vocab]
        if not new:
            return
        self.tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
        self.added_tokens += new
        self._fit_vocabulary()

    def _fit_vocabulary(self) -> None:
        """Grow the decoder to the tokenizer; point generation at the tokenizer's eos and pad ids."""
        if len(self.tokenizer) > self.decoder.vocab_size:
            self.decoder.resize_token_embeddings(len(self.tokenizer))
        generation = self.decoder.model.generation_config
        generation.eos_token_id, generation.pad_token_id = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[ADDED_TOKENS_KEY] = list(self.added_tokens)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the checkpoint's tokens (in their order) before its weights are loaded.

        Raises:
            ValueError: this module already added other tokens first (ids would not match the weights).
        """
        saved = checkpoint.get(ADDED_TOKENS_KEY, [])
        if self.added_tokens[:len(saved)] != saved[:len(self.added_tokens)]:
            raise ValueError(f"the checkpoint's added tokens {saved[:8]}… differ from those already added "
                             f"{self.added_tokens[:8]}…: add the training tokens first, in the same order")
        self.add_tokens(saved)
        super().on_load_checkpoint(checkpoint)

    # --- model ---------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``pixels [B, 3, H, W]`` (or the frozen encoder's cached ``features``) → encoder tokens ``[B, N, D]``
        (projected when the widths differ)."""
        states = self.encoder_tokens(pixels, features)
        return states if self.enc_to_dec_proj is None else self.enc_to_dec_proj(states.to(self.enc_to_dec_proj.weight.dtype))

    def sequence_logits(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                        features: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits ``[B, T, V]`` of ``ids`` given the documents (per-field confidence)."""
        states = self.encode_images(pixels, features)
        return self.decoder(self.decoder.embed(ids), mask, None, encoder_states=states).logits

    @torch.no_grad()
    def token_attention(self, pixels: torch.Tensor, text: str) -> tuple[list[str], torch.Tensor]:
        """Where the decoder looked for each token of one document's decoded sequence ``text`` (prompt + generation,
        tags kept), teacher-forced: ``(tokens, attention [T, N])``, row ``j`` the cross-attention over the encoder's N
        tokens of the step that produced token ``j`` (averaged over layers and heads; row 0, never produced, is 0).
        ``pixels [1, 3, H, W]``."""
        from mmlm.language.cross_attention import recorded_cross_attention

        ids = self.tokenizer(text, add_special_tokens=False).input_ids or [self.tokenizer.pad_token_id]
        row = torch.tensor([ids], device=self.device)
        maps = recorded_cross_attention(self.decoder.model,
                                        lambda: self.sequence_logits(pixels, row, torch.ones_like(row)))
        steps = maps[0].mean(dim=(0, 1))  # [T, N]
        attention = torch.cat([torch.zeros_like(steps[:1]), steps[:-1]]).cpu()
        return self.tokenizer.convert_ids_to_tokens(ids), attention

    def forward(self, batch: Batch) -> LMOutput:
        """Teacher-forced pass: logits ``[B, T, V]`` over ``batch.input_ids`` (prompt + target + eos, right-padded)
        and the next-token loss on ``batch.labels``."""
        states = self.encode_images(batch.pixels, batch.features)
        embeds = self.decoder.embed(batch.input_ids)
        return self.decoder(embeds, batch.attention_mask, batch.labels, encoder_states=states)

    def training_loss(self, batch: Batch) -> torch.Tensor:
        """Cross-entropy of the target tokens (the JSON sequence + eos) given the image and the task prompt."""
        return self(batch).loss

    @torch.no_grad()
    def generate_ids(self, batch: Batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Continue each row's prompt (``batch.prompt_ids [B, P]``, left-padded) → per row ``(prompt ids, generated
        ids)`` (eos and padding included; :meth:`decode_rows` drops them). Rows are decoded in groups of equal prompt
        length, so left padding never shifts the decoder's learned positions (MBart takes no per-row position ids)."""
        states = self.encode_images(batch.pixels, batch.features)
        out: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(batch)  # type: ignore[list-item]
        for length, rows in prompt_groups(batch.prompt_mask).items():
            ids = batch.prompt_ids[rows, batch.prompt_ids.shape[1] - length:]
            new = self.decoder.generate(self.decoder.embed(ids), torch.ones_like(ids), self.generation,
                                        encoder_states=states[rows], **self._bad_words())
            for row, prompt, generated in zip(rows.tolist(), ids, new):
                out[row] = (prompt, generated)
        return out

    def _bad_words(self) -> dict[str, Any]:
        """``bad_words_ids`` keeping ``<unk>`` out of generations when ``suppress_unk``."""
        unk = self.tokenizer.unk_token_id
        return {"bad_words_ids": [[unk]]} if self.suppress_unk and unk is not None else {}
