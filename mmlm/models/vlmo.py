"""VLMO (Bao et al. 2022): one MoME transformer, stagewise pre-training. Shared module + stages 1 and 2.

* :class:`VLMOModule`: the MoME transformer (:mod:`mmlm.encoders.mome`), the tokenizer (with ``[MASK]``),
  image preprocessing, text inputs ``[CLS] text [SEP]`` built from any batch, (whole-word) MLM masking. Loading
  the previous stage (``init_from``, strict with named allow-lists; optional timm ViT initialisation) and freezing
  happen in one place, Lightning's :meth:`VLMOModule.configure_model`. Parameters that the stage's passes never
  reach (:func:`unused_by_modes`) are frozen too, so DDP runs without ``find_unused_parameters``.
* :class:`VLMOStage1`: image-only masked image modelling (SimMIM-style patch regression by default; a discrete
  visual tokenizer can be plugged in as the target, as BEiT/VLMO do).
* :class:`VLMOStage2`: text-only masked language modelling with attention, V-FFN and the image side frozen.

Stage 3 (ITC + ITM + MLM) is :mod:`mmlm.models.vlmo_stage3`; fine-tuning tasks are :mod:`mmlm.models.vlmo_tasks`.
Shape legend: B batch, N image tokens (1 + P patches), T text tokens, D width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Collection
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmlm.batch import Batch, ImageBatch, TextBatch
from mmlm.checkpointing import load_checkpoint_file
from mmlm.convert.vlmo_timm import load_timm_into_mome
from mmlm.encoders.base import ImagePreprocess
from mmlm.encoders.mome import MoMEConfig, MoMETransformer
from mmlm.fusion import move_to_front
from mmlm.heads import TiedLMHead
from mmlm.hub import load_state_dict_strict
from mmlm.losses import IGNORE_INDEX, token_cross_entropy
from mmlm.mlm_masking import mask_tokens, masked_patch_regression_loss, patchify, random_patch_mask
from mmlm.models.base import MultimodalModule
from mmlm.sizes import part_kwargs
from mmlm.tokenizers import load_tokenizer

MASK_TOKEN = "[MASK]"


def vlmo_tokenizer(name_or_path: str) -> Any:
    """A tokenizer with a mask token (``[MASK]`` added when missing), a ``[CLS]`` (else bos) and an eos
    (else ``[SEP]``, which the collators append)."""
    tokenizer = load_tokenizer(name_or_path)
    if tokenizer.mask_token is None:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    if tokenizer.eos_token is None and tokenizer.sep_token is not None:
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.cls_token is None and tokenizer.bos_token is None:
        raise ValueError(f"tokenizer {name_or_path} has neither a cls nor a bos token to start VLMO's text")
    return tokenizer


def continuation_pieces(tokenizer: Any) -> Tensor:
    """``[V]`` bool: the vocabulary entries that continue a word (WordPiece ``##…``), for whole-word masking.
    All False for a tokenizer without such pieces (word-level, BPE): masking is then per token."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return torch.tensor([isinstance(t, str) and t.startswith("##") for t in tokens], dtype=torch.bool)


class VLMOPooler(nn.Module):
    """BERT's (and unilm VLMO's ``heads.Pooler``) pooler: ``tanh(dense(cls))``, ``[B, D] → [B, D]``. Stage 3's ITM
    trains it; VQA and NLVR2 keep it from the stage-3 checkpoint."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, cls: Tensor) -> Tensor:
        return torch.tanh(self.dense(cls))


def freeze_matching(module: nn.Module, patterns: tuple[str, ...] | list[str], strict: bool = True) -> list[str]:
    """Turn off gradients of the parameters whose names match an ``fnmatch`` pattern; returns their names.

    Raises:
        ValueError: with ``strict``, a pattern matches no parameter (a typo must not leave a part training).
    """
    named = dict(module.named_parameters())
    for pattern in patterns if strict else ():
        if not any(fnmatchcase(name, pattern) for name in named):
            raise ValueError(f"freeze pattern {pattern!r} matches no parameter of {type(module).__name__}")
    frozen = [name for name in named if any(fnmatchcase(name, p) for p in patterns)]
    for name in frozen:
        named[name].requires_grad_(False)
    return frozen


def unused_by_modes(transformer: MoMETransformer, modes: Collection[str], masks_patches: bool = False) -> list[str]:
    """``fnmatch`` patterns (relative to ``transformer``) of the parameters that no pass in ``modes`` reaches: image
    embeddings without an image, text embeddings without text, the mask token without patch masking, and per block
    the experts its routing never picks (fusion: V/L-FFN in blocks without a VL-FFN, the VL-FFN in the others).
    Attention, ``norm1`` and the final norm serve every mode."""
    modes, fusion = set(modes), "fusion" in modes
    unused = [*(() if modes & {"image", "fusion"} else ("patch_embed.*", "cls_token", "pos_embed")),
              *(() if modes & {"text", "fusion"} else ("word_embed.*", "text_pos_embed")),
              *(() if masks_patches else ("mask_token",))]
    for i, block in enumerate(transformer.blocks):
        below_vl = fusion and not block.with_vl
        used = {"v": "image" in modes or below_vl, "l": "text" in modes or below_vl, "vl": fusion}
        unused += [f"blocks.{i}.experts.{name}.*" for name in block.experts if not used[name]]
    return unused


class VLMOModule(MultimodalModule):
    """What every VLMO stage and task shares. Subclasses build their heads in ``__init__``; loading and freezing
    wait for :meth:`configure_model` (Lightning calls it before the optimizer and DDP exist).

    Args:
        tokenizer: hub id or directory (``[MASK]`` is added when missing).
        transformer: the MoME transformer's size (:class:`~mmlm.encoders.MoMEConfig`; ``vocab_size`` defaults to the
            tokenizer's size).
        init_from: the previous stage's Lightning checkpoint (``.ckpt``), loaded strictly: only the subclass's
            ``NEW_KEYS`` may be missing and only its ``DROPPED_KEYS`` may be left over.
        init_allow_missing: further ``fnmatch`` patterns of keys that may be missing from ``init_from``.
        init_allow_unexpected: further patterns of ``init_from`` keys that may be ignored.
        timm_init: a timm ViT name or local state-dict file for attention, image embeddings and V-FFNs
            (:func:`mmlm.convert.vlmo_timm.load_timm_into_mome`); applied before ``init_from``.
        frozen: ``fnmatch`` patterns of parameters to freeze (``None``: the stage's ``FROZEN``). Whatever it says,
            the parameters :meth:`unused_patterns` names are frozen as well (listed in ``unused_parameters``).
        image_mean: per-channel mean of the image normalisation.
        image_std: per-channel std.
        whole_word_masking: MLM masks every WordPiece piece of a chosen word together (unilm VLMO's text-only and
            image-text pre-training: ``whole_word_masking = True``); no effect for tokenizers without ``##`` pieces.
        **kwargs: optimisation settings of :class:`MultimodalModule`.
    """

    NEW_KEYS: tuple[str, ...] = ()
    DROPPED_KEYS: tuple[str, ...] = ()
    FROZEN: tuple[str, ...] = ()
    #: the MoME modes the training loss runs and whether it masks patches (:meth:`unused_patterns`)
    MODES: tuple[str, ...] = ("image", "text", "fusion")
    MASKS_PATCHES: bool = False

    def __init__(self, tokenizer: str, transformer: MoMEConfig | None = None, init_from: str | None = None,
                 init_allow_missing: list[str] | None = None, init_allow_unexpected: list[str] | None = None,
                 timm_init: str | None = None, frozen: list[str] | None = None,
                 image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
                 image_std: tuple[float, float, float] = (0.5, 0.5, 0.5), whole_word_masking: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tokenizer = vlmo_tokenizer(tokenizer)
        self.transformer = MoMETransformer(**{"vocab_size": len(self.tokenizer), **part_kwargs(MoMEConfig, transformer)})
        size = self.transformer.patch_embed.img_size
        self._preprocess = ImagePreprocess(tuple(size), tuple(image_mean), tuple(image_std))
        self._init = (init_from, list(init_allow_missing or []), list(init_allow_unexpected or []), timm_init)
        self._frozen_patterns, self._strict_frozen = tuple(self.FROZEN if frozen is None else frozen), frozen is not None
        tok = self.tokenizer
        self.cls_id = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        self.pad_id, self.mask_id = tok.pad_token_id, tok.mask_token_id
        self.special_ids = sorted({i for i in (self.cls_id, self.pad_id, tok.eos_token_id, tok.bos_token_id,
                                               tok.sep_token_id) if i is not None})
        self.register_buffer("continuation", continuation_pieces(tok) if whole_word_masking else None,
                             persistent=False)
        #: names frozen by :meth:`configure_model` (never reached by the stage's passes / the stage's ``frozen``)
        self.unused_parameters: list[str] = []
        self.frozen_parameters: list[str] = []
        self._configured = False

    def configure_model(self) -> None:
        """The one place a stage starts from elsewhere, once per module (Lightning's hook: ``fit``, ``validate``,
        ``test`` and ``predict`` call it after ``__init__`` and before the optimizer, DDP and any ``ckpt_path``
        restore): load ``timm_init`` then ``init_from`` (strict, allow-listed), then freeze what the stage never
        uses and the stage's frozen parts (both stay in the state dict, so checkpoints keep every key). A module
        used outside a trainer calls it itself; ``load_from_checkpoint`` needs no call (the checkpoint has it all).
        """
        if not self._configured:
            self._configured = True
            self.load_previous_stage()
            self.unused_parameters = freeze_matching(self, self.unused_patterns(), strict=False)
            self.frozen_parameters = freeze_matching(self, self._frozen_patterns, self._strict_frozen)
        super().configure_model()

    def load_previous_stage(self) -> None:
        """``timm_init`` into the transformer, then the ``init_from`` checkpoint, strictly: only ``NEW_KEYS`` (and
        ``init_allow_missing``) may be missing, only ``DROPPED_KEYS`` (and ``init_allow_unexpected``) left over."""
        init_from, allow_missing, allow_unexpected, timm_init = self._init
        if timm_init is not None:
            load_timm_into_mome(self.transformer, timm_init)
        if init_from is not None:
            if not Path(init_from).is_file():
                raise FileNotFoundError(f"init_from checkpoint {init_from} does not exist")
            state = load_checkpoint_file(init_from)["state_dict"]
            load_state_dict_strict(self, state, init_from, allow_missing=[*self.NEW_KEYS, *allow_missing],
                                   allow_unexpected=[*self.DROPPED_KEYS, *allow_unexpected])

    def unused_patterns(self) -> list[str]:
        """Parameters the training loss can never reach (:func:`unused_by_modes` over ``MODES``): they would get no
        gradient, which DDP without ``find_unused_parameters`` refuses. Subclasses add heads a setting leaves idle."""
        return [f"transformer.{p}" for p in unused_by_modes(self.transformer, self.MODES, self.MASKS_PATCHES)]

    @property
    def image_preprocess(self) -> ImagePreprocess:
        """The transformer's image size with this module's mean/std (read by the datamodules)."""
        return self._preprocess

    # --- text inputs ----------------------------------------------------------------------------------
    def with_cls(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``[CLS]`` in front of ``ids, mask [B, T]``, cut to the transformer's ``max_text_len``."""
        limit = self.transformer.max_text_len
        start = torch.full_like(ids[:, :1], self.cls_id)
        return torch.cat([start, ids], 1)[:, :limit], torch.cat([torch.ones_like(start), mask], 1)[:, :limit]

    def caption_inputs(self, batch: Batch | TextBatch) -> tuple[Tensor, Tensor]:
        """``[CLS] text [SEP]`` of a caption :class:`~mmlm.batch.Batch` (its target span) or of a text-only
        batch (its ``input_ids``) → ``(ids, mask) [B, T]``."""
        if getattr(batch, "labels", None) is not None:
            ids, kept = move_to_front(batch.input_ids, batch.labels != IGNORE_INDEX, self.pad_id, min_width=1)
            mask = kept.long()
        else:
            ids, mask = batch.input_ids, batch.attention_mask
        return self.with_cls(ids, mask)

    def prompt_inputs(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """``[CLS] prompt`` (the question of a VQA :class:`~mmlm.batch.Batch`, never its answer) → ``[B, T]``."""
        keep = (batch.labels == IGNORE_INDEX) & (batch.attention_mask == 1)
        if self.tokenizer.bos_token_id is not None:
            keep[:, 0] = False  # the collator's bos; [CLS] takes its place
        ids, kept = move_to_front(batch.input_ids, keep, self.pad_id, min_width=1)
        return self.with_cls(ids, kept.long())

    def maskable(self, ids: Tensor, mask: Tensor) -> Tensor:
        """``[B, T]`` bool: real tokens that MLM may mask (no cls/sep/pad/bos/eos)."""
        special = torch.isin(ids, torch.tensor(self.special_ids, device=ids.device))
        return mask.bool() & ~special

    def mask_text(self, ids: Tensor, mask: Tensor, prob: float) -> tuple[Tensor, Tensor]:
        """BERT 80/10/10 masking (:func:`mmlm.mlm_masking.mask_tokens`), per whole word with ``whole_word_masking``
        → ``(masked_ids, labels) [B, T]``."""
        continuation = None if self.continuation is None else self.continuation[ids]
        return mask_tokens(ids, self.maskable(ids, mask), self.mask_id, len(self.tokenizer), prob,
                           continuation=continuation)

    # --- evaluation: the base's loss evaluator; stage 3 and the tasks compose their own --------------
    def generate_text(self, batch: Batch) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} does not generate text (VLMO is an encoder)")

    def log_terms(self, terms: dict[str, Tensor], stage: str, size: int) -> None:
        """Log each loss term as ``{stage}/{name}`` (no-op without a trainer)."""
        if self._trainer is not None:
            for name, value in terms.items():
                self.log(f"{stage}/{name}", value, batch_size=size, sync_dist=stage != "train")


class VLMOStage1(VLMOModule):
    """Stage 1, image only: masked image modelling on the V-FFN path. Text embeddings, L-FFNs and VL-FFNs are never
    reached by an image-only pass and stay frozen (``unused_parameters``): stage 2 trains the text side, stage 3 the
    VL-FFNs.

    Args:
        mask_ratio: fraction of patches replaced by the mask token.
        visual_tokenizer: optional discrete target (BEiT's dVAE in VLMO): a module mapping ``pixels [B, 3, H, W]``
            to ids ``[B, P]`` with a ``vocab_size`` attribute; the head then classifies each masked patch
            (cross-entropy). ``None``: SimMIM-style L1 regression of the masked patches' normalised pixels.
        **kwargs: :class:`VLMOModule` arguments.
    """

    NEW_KEYS = ("mim_head.*",)
    MODES, MASKS_PATCHES = ("image",), True

    def __init__(self, mask_ratio: float = 0.4, visual_tokenizer: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.mask_ratio, self.visual_tokenizer = mask_ratio, visual_tokenizer
        if visual_tokenizer is not None:
            visual_tokenizer.requires_grad_(False)
        p, dim = self.transformer.patch_size, self.transformer.dim
        outputs = visual_tokenizer.vocab_size if visual_tokenizer is not None else p * p * 3
        self.mim_head = nn.Linear(dim, outputs)

    def training_loss(self, batch: ImageBatch | Batch) -> Tensor:
        """Masked patch regression (or visual-token classification) loss of ``batch.pixels``."""
        pixels = batch.pixels
        patch_mask = random_patch_mask(pixels.shape[0], self.transformer.num_patches, self.mask_ratio,
                                       device=pixels.device)
        hidden = self.transformer("image", pixels=pixels, patch_mask=patch_mask).image[:, 1:]
        prediction = self.mim_head(hidden)  # [B, P, p·p·3] or [B, P, V]
        if self.visual_tokenizer is None:
            return masked_patch_regression_loss(prediction, patchify(pixels, self.transformer.patch_size), patch_mask)
        with torch.no_grad():
            targets = self.visual_tokenizer(pixels).long()
        return token_cross_entropy(prediction, targets.masked_fill(~patch_mask, IGNORE_INDEX))


#: Stage 2 trains L-FFNs, text embeddings (word, position, type), the relative position table (its text rows: a
#: text-only pass reads no other) and the MLM head; everything the image path uses stays as stage 1 left it, the layer
#: scales too (as unilm's run.py, which also trains the final norm: kept frozen here).
IMAGE_SIDE = ("transformer.patch_embed.*", "transformer.cls_token", "transformer.pos_embed", "transformer.mask_token",
              "transformer.blocks.*.norm1.*", "transformer.blocks.*.attn.*", "transformer.blocks.*.ls1.*",
              "transformer.blocks.*.ls2.*", "transformer.blocks.*.experts.v.*", "transformer.norm.*")


class VLMOStage2(VLMOModule):
    """Stage 2, text only: masked language modelling with attention, layer scales, V-FFN (and VL-FFN, image
    embeddings, final norm) frozen; L-FFNs, text embeddings, the relative position table and the MLM head (tied to
    the word embeddings) train. The MLM loss is unweighted (unilm's ``compute_textonly_mlm``).

    Args:
        mlm_prob: fraction of text tokens masked (BERT 80/10/10; whole words with ``whole_word_masking``).
        **kwargs: :class:`VLMOModule` arguments (``init_from`` a stage-1 checkpoint).
    """

    NEW_KEYS = ("mlm_head.*",)
    DROPPED_KEYS = ("mim_head.*",)
    FROZEN = (*IMAGE_SIDE, "transformer.blocks.*.experts.vl.*")
    MODES = ("text",)

    def __init__(self, mlm_prob: float = 0.15, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.mlm_prob = mlm_prob
        self.mlm_head = TiedLMHead(self.transformer.dim, len(self.tokenizer), eps=1e-6)

    def mlm_logits(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Text-only pass → ``[B, T, V]``."""
        hidden = self.transformer("text", text_ids=ids, text_mask=mask).text
        return self.mlm_head(hidden, self.transformer.word_embed.weight)

    def training_loss(self, batch: TextBatch | Batch) -> Tensor:
        """MLM cross-entropy on the masked tokens of ``[CLS] text [SEP]``."""
        ids, mask = self.caption_inputs(batch)
        masked, labels = self.mask_text(ids, mask, self.mlm_prob)
        return token_cross_entropy(self.mlm_logits(masked, mask), labels)
