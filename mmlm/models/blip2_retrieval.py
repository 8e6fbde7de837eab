"""ITM re-ranking of ITC retrieval for BLIP-2 stage 1 (as LAVIS's ``compute_sim_matrix``).

During evaluation :class:`EvalStore` keeps, on the CPU, the frozen image tokens of every distinct image
(``[N, Dv]`` each) and the ``[CLS] caption`` ids of every caption sample. At the end, each image's top-``k``
texts by ITC similarity (and each text's top-``k`` images) are re-scored with the ITM head:
``score = itm_logit[match] + itc_similarity`` (LAVIS adds both); the rest rank below (``metrics.retrieval.rerank``).

Memory: ``Ni × N × Dv`` image-token floats (fp32) + ``Nt × T`` ids, all on the CPU. Tiny shapes config
(65 tokens × 64 wide): 16 KiB per image. BLIP-2 ViT-g (257 × 1408): 1.4 MiB per image, so the 5k-image
COCO Karpathy test split needs ~7 GiB of host memory; re-ranking costs ``k × (Ni + Nt)`` ITM passes.
Single process only: under DDP every rank would re-rank its own shard of the set (refused, see
:func:`check_single_process`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.nn.utils.rnn import pad_sequence

from mmlm.metrics.retrieval import rerank, retrieval_recall

#: ``itm(image_tokens [P, N, Dv], ids [P, T], mask [P, T]) → match logits [P, 2]``
ItmFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check_single_process(k: int) -> None:
    """ITM re-ranking keeps the evaluation set per process; refuse it under a multi-rank process group."""
    if k > 0 and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(f"Blip2Stage1(itm_rerank_k={k}) runs in a single process only (the image tokens and "
                           f"texts are kept per rank); evaluate with devices=1 or itm_rerank_k=0")


class EvalStore:
    """Image tokens by image id (first occurrence) and caption ids in update order, on the CPU."""

    def __init__(self) -> None:
        self.images: dict[int, torch.Tensor] = {}
        self.texts: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, image_ids: torch.Tensor, image_tokens: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """``image_ids [B]``, ``image_tokens [B, N, Dv]``, text ``ids, mask [B, T]`` of caption samples."""
        for row, image_id in enumerate(image_ids.tolist()):
            if image_id not in self.images:
                self.images[image_id] = image_tokens[row].detach().float().cpu()
            self.texts.append(ids[row][mask[row].bool()].detach().cpu())

    def clear(self) -> None:
        self.images, self.texts = {}, []

    def rerank_recall(self, sim_i2t: torch.Tensor, txt2img: torch.Tensor, image_ids: torch.Tensor, k: int,
                      itm: ItmFn, pad_id: int, ks: tuple[int, ...]) -> dict[str, float]:
        """R@K after re-scoring the top ``k`` of each row of ``sim_i2t [Ni, Nt]`` (and of its transpose) with ITM.

        ``image_ids [Ni]`` orders the images as ``sim_i2t``'s rows; texts are in :meth:`add` order."""
        if sim_i2t.shape[1] != len(self.texts):
            raise ValueError(f"{sim_i2t.shape[1]} texts in the similarity matrix, {len(self.texts)} kept for ITM")
        images = [self.images[int(i)] for i in image_ids.tolist()]  # references, no copy of the whole set
        ids = pad_sequence(self.texts, batch_first=True, padding_value=pad_id)
        mask = pad_sequence([torch.ones_like(t) for t in self.texts], batch_first=True)
        sim = sim_i2t.float().cpu()

        def match(image_rows: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
            logits = itm(torch.stack([images[r] for r in image_rows.tolist()]), ids[text_rows], mask[text_rows])
            return logits[:, 1].float().cpu() + sim[image_rows, text_rows]

        i2t = rerank(sim, k, lambda i, js: match(torch.full_like(js, i), js))
        t2i = rerank(sim.t(), k, lambda t, js: match(js, torch.full_like(js, t)))
        return retrieval_recall(i2t, txt2img.cpu(), ks=ks, sim_t2i=t2i)
