"""VLMO stage 3, image–text pairs: ITC (dual encoder) + ITM with hard negatives (fusion) + MLM (fusion).

* ITC: image-only pass → image ``[CLS]`` → ``itc_image_proj``; text-only pass → text ``[CLS]`` → ``itc_text_proj``;
  contrastive loss over the batch gathered from every rank with gradients, positives by image id.
* ITM: fusion passes over B positives, B (image, hard-negative text) and B (hard-negative image, text) pairs,
  negatives drawn from the ITC similarities across ranks → text ``[CLS]`` → ``itm_head`` → 2 classes.
* MLM: BERT-masked caption with its image in fusion mode → MLM head tied to the word embeddings.

Validation logs the three losses and dual-encoder retrieval R@1/5/10 in both directions (``val/i2t_r1`` …), optionally
after ITM re-ranking of the top-k (:class:`~mmlm.evaluation.RetrievalEvaluator`, shared with BLIP-2 stage 1).
Shape legend: B batch, N image tokens, T text tokens, D width, E embed_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from mmlm.batch import Batch
from mmlm.evaluation import Evaluation, RetrievalEvaluator, RetrievalStep
from mmlm.heads import TiedLMHead
from mmlm.losses import (
    Temperature,
    contrastive_loss,
    hard_negative_itm_loss,
    image_id_tensor,
    token_cross_entropy,
)
from mmlm.models.vlmo import VLMOModule, unused_by_modes


def pooler_head(dim: int, out: int) -> nn.Sequential:
    """BERT's pooler (``tanh(Linear)``) then a linear classifier: ``[B, D] → [B, out]``."""
    return nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, out))


@dataclass
class Stage3Output:
    """Loss terms (scalars, 0 when their weight is 0) and the ITC features ``image/text_feats [B, E]`` (L2-normalised)."""

    itc: Tensor
    itm: Tensor
    mlm: Tensor
    image_feats: Tensor
    text_feats: Tensor


class VLMOStage3(VLMOModule):
    """Stage 3 on image–text pairs (also retrieval fine-tuning: ``itm_weight: 0, mlm_weight: 0``).

    With the default weights every parameter but the mask token (masked image modelling's) trains: the image-only
    and text-only ITC passes run the V/L experts of every block, the ITM and MLM fusion passes the VL-FFNs.

    Args:
        embed_dim: E of the contrastive space.
        mlm_prob: fraction of caption tokens masked for MLM.
        itc_weight: weight of the contrastive loss.
        itm_weight: weight of the matching loss (0 skips its fusion passes).
        mlm_weight: weight of the masked-language loss (0 skips its fusion pass).
        itm_rerank_k: > 0: evaluation also re-ranks each image's top-k texts (and each text's top-k images) by ITC
            with the ITM head (fusion passes over pixels) and logs ``{stage}/rerank_i2t_r1`` …; single process.
        **kwargs: :class:`~mmlm.models.VLMOModule` arguments (``init_from`` a stage-2 checkpoint).
    """

    NEW_KEYS = ("itc_image_proj.*", "itc_text_proj.*", "itm_head.*", "temperature.*")
    DROPPED_KEYS = ("mim_head.*",)

    def __init__(self, embed_dim: int = 256, mlm_prob: float = 0.15, itc_weight: float = 1.0, itm_weight: float = 1.0,
                 mlm_weight: float = 1.0, itm_rerank_k: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        dim = self.transformer.dim
        self.itc_image_proj, self.itc_text_proj = nn.Linear(dim, embed_dim), nn.Linear(dim, embed_dim)
        self.itm_head = pooler_head(dim, 2)
        self.mlm_head = TiedLMHead(dim, len(self.tokenizer), eps=1e-6)
        self.temperature = Temperature(0.07)
        self.mlm_prob, self.weights = mlm_prob, {"itc": itc_weight, "itm": itm_weight, "mlm": mlm_weight}
        self.evaluation = Evaluation(RetrievalEvaluator(rerank_k=itm_rerank_k))
        self.finish_init()

    def unused_patterns(self) -> list[str]:
        """The mask token always; without ITM and MLM (ITC only: retrieval fine-tuning) no fusion pass runs, so the
        VL-FFNs, the ITM head and the MLM head's own layers idle; a zero-weight head alone idles too."""
        modes = ("image", "text", "fusion") if self.weights["itm"] or self.weights["mlm"] else ("image", "text")
        heads = [f"{name}_head.*" for name in ("itm", "mlm") if not self.weights[name]]
        return [*(f"transformer.{p}" for p in unused_by_modes(self.transformer, modes)), *heads]

    def embed_pair(self, pixels: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Dual-encoder features: image-only and text-only passes → ``(image [B, E], text [B, E])``, L2-normalised."""
        image = self.transformer("image", pixels=pixels).image[:, 0]
        text = self.transformer("text", text_ids=ids, text_mask=mask).text[:, 0]
        return F.normalize(self.itc_image_proj(image), dim=-1), F.normalize(self.itc_text_proj(text), dim=-1)

    def itm_logits(self, pixels: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """Fusion pass over ``pixels [P, 3, H, W]`` and ``ids, mask [P, T]`` → match logits ``[P, 2]``."""
        return self.itm_head(self.transformer("fusion", pixels, ids, mask).text[:, 0])

    def forward(self, batch: Batch) -> Stage3Output:
        """The three loss terms of a caption batch and its ITC features."""
        ids, mask = self.caption_inputs(batch)
        image_ids = image_id_tensor(batch.ids, batch.pixels.device)
        image_feats, text_feats = self.embed_pair(batch.pixels, ids, mask)
        itc = contrastive_loss(image_feats, text_feats, self.temperature(), image_ids=image_ids, gather=True)
        zero = itc.loss * 0.0
        itm = (hard_negative_itm_loss(self.itm_logits, batch.pixels, ids, mask, image_ids, itc, self.pad_id)
               if self.weights["itm"] else zero)
        mlm = self.mlm(batch.pixels, ids, mask) if self.weights["mlm"] else zero
        return Stage3Output(itc.loss, itm, mlm, image_feats, text_feats)

    def mlm(self, pixels: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """Masked caption tokens predicted in fusion mode with the image."""
        masked, labels = self.mask_text(ids, mask, self.mlm_prob)
        hidden = self.transformer("fusion", pixels, masked, mask).text
        return token_cross_entropy(self.mlm_head(hidden, self.transformer.word_embed.weight), labels)

    def loss_of(self, out: Stage3Output) -> Tensor:
        """The weighted sum of the terms."""
        return sum(self.weights[name] * getattr(out, name) for name in self.weights)

    def training_loss(self, batch: Batch) -> Tensor:
        """Weighted ITC + ITM + MLM; each term logged as ``train/itc`` …"""
        out = self(batch)
        self.log_terms({"itc": out.itc, "itm": out.itm, "mlm": out.mlm}, "train", len(batch))
        return self.loss_of(out)

    def retrieval_step(self, batch: Batch) -> RetrievalStep:
        """Evaluation: the loss terms (and their weighted sum) and the ITC features of a caption batch, with the
        pixels and texts that ITM re-ranking reads (:class:`~mmlm.evaluation.RetrievalEvaluator`)."""
        out = self(batch)
        losses = {"itc": out.itc, "itm": out.itm, "mlm": out.mlm, "loss": self.loss_of(out)}
        ids, mask = self.caption_inputs(batch)
        image_ids = image_id_tensor(batch.ids, batch.pixels.device)
        return RetrievalStep(losses, out.image_feats, out.text_feats, image_ids, batch.pixels, ids, mask)
