"""VLMO stage 3, image–text pairs: ITC (dual encoder) + ITM with hard negatives (fusion) + MLM (fusion), as unilm's
``vlmo/modules/objectives.py`` (``compute_itc``, ``compute_itm_hardneg``, ``compute_mlm``).

* ITC: image-only pass → image ``[CLS]`` → ``itc_image_proj``; text-only pass → text ``[CLS]`` → ``itc_text_proj``;
  contrastive loss over the batch gathered from every rank with gradients, positives by image id. With ``itc_vl``
  (the default, as unilm) the same passes also run the blocks from ``vl_start`` on with the VL-FFN
  (:meth:`~mmlm.encoders.mome.MoMETransformer.branches`) → ``itc_vl_image_proj``/``itc_vl_text_proj``, own
  temperature; ITC is the mean of the two contrastive losses.
* ITM: fusion passes over B positives, B (image, hard-negative text) and B (hard-negative image, text) pairs,
  negatives drawn from the (expert) ITC similarities across ranks → text ``[CLS]`` → ``pooler`` → ``itm_head``.
* MLM: (whole-word) masked caption with its image in fusion mode → MLM head tied to the word embeddings; weight
  0.25 in the total, as unilm's ``compute_mlm``.

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
from mmlm.models.vlmo import VLMOModule, VLMOPooler, unused_by_modes

#: The VL-FFN contrastive heads (``itc_vl``), dropped by retrieval fine-tuning and the tasks.
ITC_VL_HEADS = ("itc_vl_image_proj.*", "itc_vl_text_proj.*", "vl_temperature.*")


@dataclass
class Stage3Output:
    """Loss terms (scalars, 0 when their weight is 0; ``itc`` already averages in the VL-FFN term with ``itc_vl``)
    and the expert ITC features ``image/text_feats [B, E]`` (L2-normalised)."""

    itc: Tensor
    itm: Tensor
    mlm: Tensor
    image_feats: Tensor
    text_feats: Tensor


class VLMOStage3(VLMOModule):
    """Stage 3 on image–text pairs (also retrieval fine-tuning: ``itm_weight: 0, mlm_weight: 0``).

    With the default weights every parameter but the mask token (masked image modelling's) trains: the image-only
    and text-only ITC passes run the V/L experts of every block (and the VL-FFNs with ``itc_vl``), the ITM and MLM
    fusion passes the VL-FFNs.

    Args:
        embed_dim: E of the contrastive space; ``None``: D (unilm's ``ITCHead``). Projections have no bias.
        mlm_prob: fraction of caption tokens masked for MLM.
        itc_weight: weight of the contrastive loss.
        itm_weight: weight of the matching loss (0 skips its fusion passes).
        mlm_weight: weight of the masked-language loss (0 skips its fusion pass); unilm's ``compute_mlm`` scales
            it by 0.25.
        itc_vl: ITC also contrasts the VL-FFN branch of the unimodal passes and averages the two losses (unilm's
            pre-training ``compute_itc``); False: expert features only (unilm's retrieval fine-tuning,
            ``compute_irtr``). Needs a VL-FFN (``vl_start < depth``).
        itm_rerank_k: > 0: evaluation also re-ranks each image's top-k texts (and each text's top-k images) by ITC
            with the ITM head (fusion passes over pixels) and logs ``{stage}/rerank_i2t_r1`` …; single process.
        **kwargs: :class:`~mmlm.models.VLMOModule` arguments (``init_from`` a stage-2 checkpoint).
    """

    NEW_KEYS = ("itc_image_proj.*", "itc_text_proj.*", "pooler.*", "itm_head.*", "temperature.*", *ITC_VL_HEADS)
    DROPPED_KEYS = ("mim_head.*", *ITC_VL_HEADS)

    def __init__(self, embed_dim: int | None = None, mlm_prob: float = 0.15, itc_weight: float = 1.0, itm_weight: float = 1.0,
                 mlm_weight: float = 0.25, itc_vl: bool = True, itm_rerank_k: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        dim = self.transformer.dim
        embed_dim = dim if embed_dim is None else embed_dim
        if itc_vl and self.transformer.vl_start >= self.transformer.depth:
            raise ValueError(f"VLMOStage3: itc_vl needs a VL-FFN, but vl_start={self.transformer.vl_start} = depth")
        self.itc_image_proj, self.itc_text_proj = (nn.Linear(dim, embed_dim, bias=False) for _ in range(2))
        self.temperature = Temperature(0.07)
        self.itc_vl = itc_vl
        if itc_vl:
            self.itc_vl_image_proj, self.itc_vl_text_proj = (nn.Linear(dim, embed_dim, bias=False) for _ in range(2))
            self.vl_temperature = Temperature(0.07)
        self.pooler = VLMOPooler(dim)
        self.itm_head = nn.Linear(dim, 2)
        self.mlm_head = TiedLMHead(dim, len(self.tokenizer), eps=1e-6)
        self.mlm_prob, self.weights = mlm_prob, {"itc": itc_weight, "itm": itm_weight, "mlm": mlm_weight}
        self.evaluation = Evaluation(RetrievalEvaluator(rerank_k=itm_rerank_k))

    def unused_patterns(self) -> list[str]:
        """The mask token always; without ITM, MLM and ``itc_vl`` (ITC only: retrieval fine-tuning) no pass reaches
        the VL-FFNs, and the ITM head (with the pooler) and the MLM head's own layers idle; a zero-weight head alone
        idles too."""
        fusion = self.itc_vl or self.weights["itm"] or self.weights["mlm"]
        modes = ("image", "text", "fusion") if fusion else ("image", "text")
        heads = [f"{name}_head.*" for name in ("itm", "mlm") if not self.weights[name]]
        pooler = [] if self.weights["itm"] else ["pooler.*"]
        return [*(f"transformer.{p}" for p in unused_by_modes(self.transformer, modes)), *heads, *pooler]

    def embed_pair(self, pixels: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Dual-encoder features: image-only and text-only passes → ``(image [B, E], text [B, E])``, L2-normalised."""
        image = self.transformer("image", pixels=pixels).image[:, 0]
        text = self.transformer("text", text_ids=ids, text_mask=mask).text[:, 0]
        return F.normalize(self.itc_image_proj(image), dim=-1), F.normalize(self.itc_text_proj(text), dim=-1)

    def embed_pair_with_vl(self, pixels: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """unilm's ``infer_image``/``infer_text``: the expert features of :meth:`embed_pair` and the VL-FFN branch's
        → ``(image, text, vl_image, vl_text)``, each ``[B, E]`` L2-normalised."""
        image = self.transformer.branches("image", pixels=pixels)
        text = self.transformer.branches("text", text_ids=ids, text_mask=mask)
        feats = (self.itc_image_proj(image.expert[:, 0]), self.itc_text_proj(text.expert[:, 0]),
                 self.itc_vl_image_proj(image.vl[:, 0]), self.itc_vl_text_proj(text.vl[:, 0]))
        return tuple(F.normalize(f, dim=-1) for f in feats)

    def itm_logits(self, pixels: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """Fusion pass over ``pixels [P, 3, H, W]`` and ``ids, mask [P, T]`` → pooled text ``[CLS]`` → match logits
        ``[P, 2]``."""
        return self.itm_head(self.pooler(self.transformer("fusion", pixels, ids, mask).text[:, 0]))

    def forward(self, batch: Batch) -> Stage3Output:
        """The three loss terms of a caption batch and its (expert) ITC features."""
        ids, mask = self.caption_inputs(batch)
        image_ids = image_id_tensor(batch.ids, batch.pixels.device)
        if self.itc_vl:
            image_feats, text_feats, vl_image, vl_text = self.embed_pair_with_vl(batch.pixels, ids, mask)
        else:
            image_feats, text_feats = self.embed_pair(batch.pixels, ids, mask)
        itc = contrastive_loss(image_feats, text_feats, self.temperature(), image_ids=image_ids, gather=True)
        itc_loss = itc.loss
        if self.itc_vl:
            vl = contrastive_loss(vl_image, vl_text, self.vl_temperature(), image_ids=image_ids, gather=True)
            itc_loss = (itc.loss + vl.loss) / 2  # unilm: itc_total_loss = (itc_loss + itc_vlffn_loss) * 0.5
        zero = itc_loss * 0.0
        itm = (hard_negative_itm_loss(self.itm_logits, batch.pixels, ids, mask, image_ids, itc, self.pad_id)
               if self.weights["itm"] else zero)
        mlm = self.mlm(batch.pixels, ids, mask) if self.weights["mlm"] else zero
        return Stage3Output(itc_loss, itm, mlm, image_feats, text_feats)

    def mlm(self, pixels: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """(Whole-word) masked caption tokens predicted in fusion mode with the image (unweighted)."""
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
