"""VLMO stage 3, image–text pairs: ITC (dual encoder) + ITM with hard negatives (fusion) + MLM (fusion).

* ITC: image-only pass → image ``[CLS]`` → ``itc_image_proj``; text-only pass → text ``[CLS]`` → ``itc_text_proj``;
  contrastive loss over the batch gathered from every rank with gradients, positives by image id.
* ITM: fusion passes over B positives, B (image, hard-negative text) and B (hard-negative image, text) pairs,
  negatives drawn from the ITC similarities across ranks → text ``[CLS]`` → ``itm_head`` → 2 classes.
* MLM: BERT-masked caption with its image in fusion mode → MLM head tied to the word embeddings.

Validation logs the three losses and dual-encoder retrieval R@1/5/10 in both directions (``val/i2t_r1`` …).
Shape legend: B batch, N image tokens, T text tokens, D width, E embed_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmlm.distributed import gather_sizes, gather_with_grad
from mmlm.losses import (
    ContrastiveOutput,
    Temperature,
    contrastive_loss,
    itm_labels,
    matching_loss,
    sample_hard_negatives,
    token_cross_entropy,
)
from mmlm.metrics.retrieval import RetrievalRecall
from mmlm.models.blip2_stage1 import TiedLMHead, gather_padded, stable_id
from mmlm.models.vlmo import VLMOModule


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

    Args:
        embed_dim: E of the contrastive space.
        mlm_prob: fraction of caption tokens masked for MLM.
        itc_weight: weight of the contrastive loss.
        itm_weight: weight of the matching loss (0 skips its fusion passes).
        mlm_weight: weight of the masked-language loss (0 skips its fusion pass).
        **kwargs: :class:`~mmlm.models.vlmo.VLMOModule` arguments (``init_from`` a stage-2 checkpoint).
    """

    NEW_KEYS = ("itc_image_proj.*", "itc_text_proj.*", "itm_head.*", "temperature.*")
    DROPPED_KEYS = ("mim_head.*",)

    def __init__(self, embed_dim: int = 256, mlm_prob: float = 0.15, itc_weight: float = 1.0, itm_weight: float = 1.0,
                 mlm_weight: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        dim = self.transformer.dim
        self.itc_image_proj, self.itc_text_proj = nn.Linear(dim, embed_dim), nn.Linear(dim, embed_dim)
        self.itm_head = pooler_head(dim, 2)
        self.mlm_head = TiedLMHead(dim, len(self.tokenizer), eps=1e-6)
        self.temperature = Temperature(0.07)
        self.mlm_prob, self.weights = mlm_prob, {"itc": itc_weight, "itm": itm_weight, "mlm": mlm_weight}
        self.retrieval = RetrievalRecall()
        self.finish_init()

    def image_ids(self, batch: Any) -> Tensor:
        """``[B]`` ids of the images (``batch.ids``: image ids of caption samples); equal ids are ITC positives."""
        return torch.tensor([stable_id(str(i)) for i in batch.ids], dtype=torch.long, device=batch.pixels.device)

    def embed_pair(self, pixels: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Dual-encoder features: image-only and text-only passes → ``(image [B, E], text [B, E])``, L2-normalised."""
        image = self.transformer("image", pixels=pixels).image[:, 0]
        text = self.transformer("text", text_ids=ids, text_mask=mask).text[:, 0]
        return F.normalize(self.itc_image_proj(image), dim=-1), F.normalize(self.itc_text_proj(text), dim=-1)

    def itm_logits(self, pixels: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """Fusion pass over ``pixels [P, 3, H, W]`` and ``ids, mask [P, T]`` → match logits ``[P, 2]``."""
        return self.itm_head(self.transformer("fusion", pixels, ids, mask).text[:, 0])

    def forward(self, batch: Any) -> Stage3Output:
        """The three loss terms of a caption batch and its ITC features."""
        ids, mask = self.caption_inputs(batch)
        image_ids = self.image_ids(batch)
        image_feats, text_feats = self.embed_pair(batch.pixels, ids, mask)
        itc = contrastive_loss(image_feats, text_feats, self.temperature(), image_ids=image_ids, gather=True)
        zero = itc.loss * 0.0
        itm = self.itm(batch.pixels, ids, mask, image_ids, itc) if self.weights["itm"] else zero
        mlm = self.mlm(batch.pixels, ids, mask) if self.weights["mlm"] else zero
        return Stage3Output(itc.loss, itm, mlm, image_feats, text_feats)

    def itm(self, pixels: Tensor, ids: Tensor, mask: Tensor, image_ids: Tensor, itc: ContrastiveOutput) -> Tensor:
        """ITM on positives and hard negatives from every rank; 0 when no gathered sample is a negative."""
        if bool((itc.targets > 0).all()):
            return itc.loss * 0.0
        neg_text, neg_image = sample_hard_negatives(itc.sim_i2t, itc.sim_t2i, image_ids, gather=True)
        width = max(gather_sizes(ids.shape[1], ids.device))
        ids, mask = F.pad(ids, (0, width - ids.shape[1]), value=self.pad_id), F.pad(mask, (0, width - mask.shape[1]))
        pixels_all = gather_with_grad(pixels)
        ids_all, mask_all = gather_padded(ids, self.pad_id, width), gather_padded(mask, 0, width)
        logits = self.itm_logits(torch.cat([pixels, pixels, pixels_all[neg_image]]),
                                 torch.cat([ids, ids_all[neg_text], ids]), torch.cat([mask, mask_all[neg_text], mask]))
        return matching_loss(logits, itm_labels(pixels.shape[0], device=pixels.device))

    def mlm(self, pixels: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """Masked caption tokens predicted in fusion mode with the image."""
        masked, labels = self.mask_text(ids, mask, self.mlm_prob)
        hidden = self.transformer("fusion", pixels, masked, mask).text
        return token_cross_entropy(self.mlm_head(hidden, self.transformer.word_embed.weight), labels)

    def loss_of(self, out: Stage3Output) -> Tensor:
        """The weighted sum of the terms."""
        return sum(self.weights[name] * getattr(out, name) for name in self.weights)

    def training_loss(self, batch: Any) -> Tensor:
        """Weighted ITC + ITM + MLM; each term logged as ``train/itc`` …"""
        out = self(batch)
        self.log_terms({"itc": out.itc, "itm": out.itm, "mlm": out.mlm}, "train", len(batch))
        return self.loss_of(out)

    # --- evaluation: losses + dual-encoder retrieval ---------------------------------------------------
    def _evaluate(self, batch: Any, stage: str) -> None:
        out = self(batch)
        self.log_terms({"itc": out.itc, "itm": out.itm, "mlm": out.mlm, "loss": self.loss_of(out)}, stage, len(batch))
        ids = self.image_ids(batch)
        self.retrieval.update(out.image_feats, ids, out.text_feats, ids)

    def _finish_evaluation(self, stage: str) -> None:
        used = torch.tensor([float(self.retrieval.update_called)], device=self.device)
        if self.all_gather(used).amax() > 0:
            for name, value in self.retrieval.compute().items():
                self.log(f"{stage}/{name}", value, prog_bar=name == "r_mean")
        self.retrieval.reset()
        self._log_skipped()
