"""Image↔text retrieval of dual-encoder families (BLIP-2 stage 1, VLMO stage 3), with optional ITM re-ranking.

Per batch the module's ``retrieval_step(batch)`` gives its loss terms (logged as ``{stage}/{name}``) and the
contrastive features; at the end of the epoch R@1/5/10 in both directions and their mean are computed over the
whole evaluation set (:class:`mmlm.metrics.retrieval.RetrievalRecall`, gathered across ranks), and written to
``{stage}-retrieval-step{N}.json``. Beside it, ``{stage}-retrieval-step{N}.top.json`` holds what was retrieved
(:func:`top_matches`, by ITC similarity): ``{"k", "images": [...], "texts": [...]}``, per distinct image (ordered as
the similarity matrix: by image id) its ``id``, ``key``, own ``captions`` and its top-``k`` texts, per caption its
``text``, ``id``, ``key`` and its top-``k`` images; each hit with its ``score`` and ``match`` (a positive). The
caption texts are the batch's target tokens decoded with the module's ``tokenizer``; the rows of every rank are
gathered in rank order, the order of the metric's gathered features, and rank 0 writes.

Re-ranking (``rerank_k > 0``, as LAVIS's ``compute_sim_matrix``): the evaluator keeps, on the CPU, each distinct
image's ITM input (``RetrievalStep.images``: frozen image tokens ``[N, Dv]`` for BLIP-2, pixels for VLMO) and every
caption's ids; each image's top-``k`` texts by ITC similarity (and each text's top-``k`` images) are re-scored as
``itm_logit[match] + itc_similarity`` with the module's ``itm_logits(images, ids, mask)``, the rest rank below
(:func:`mmlm.metrics.retrieval.rerank`), logged as ``rerank_i2t_r1`` … Memory: ``Ni`` image inputs + ``Nt × T`` ids
(BLIP-2 ViT-g: 1.4 MiB per image, ~7 GiB for the 5k COCO test images); ``k × (Ni + Nt)`` ITM passes. Single process
only (each rank would re-rank its own shard of the set).

Shape legend: B batch, M queries, D embed dim, T text tokens, Ni/Nt images/texts of the evaluation set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from mmlm.distributed import any_rank, gather_objects, rank_and_world
from mmlm.evaluation.base import Evaluator, ResultFiles, StepOutput
from mmlm.losses import ItmLogits
from mmlm.metrics.retrieval import RetrievalRecall, rerank, retrieval_recall


@dataclass
class RetrievalStep:
    """What a dual-encoder family gives for one evaluation batch.

    Attributes:
        losses: loss terms to log (``{"itc": …, "itm": …, "loss": …}``).
        image_feats: ``[B, D]`` or ``[B, M, D]`` (max over the M queries) L2-normalised image embeddings.
        text_feats: ``[B, D]`` L2-normalised text embeddings.
        image_ids: ``[B]`` ids of the images (equal ids: the same image).
        images: ``[B, …]`` the ITM input of each image (for re-ranking), or ``None``.
        text_ids: ``[B, T]`` the ITM text ids (right-padded), or ``None``.
        text_mask: ``[B, T]`` their mask, or ``None``.
    """

    losses: dict[str, Tensor]
    image_feats: Tensor
    text_feats: Tensor
    image_ids: Tensor
    images: Tensor | None = None
    text_ids: Tensor | None = None
    text_mask: Tensor | None = None


@dataclass
class RerankStore:
    """Image ITM inputs by image id (first occurrence) and caption ids in update order, on the CPU."""

    images: dict[int, Tensor] = field(default_factory=dict)
    texts: list[Tensor] = field(default_factory=list)

    def add(self, step: RetrievalStep, rows: Tensor) -> None:
        """Keep the ``rows`` of ``step`` (their image inputs and texts)."""
        if step.images is None or step.text_ids is None or step.text_mask is None:
            raise ValueError("ITM re-ranking needs retrieval_step to return images, text_ids and text_mask")
        for row in rows.tolist():
            self.images.setdefault(int(step.image_ids[row]), step.images[row].detach().float().cpu())
            self.texts.append(step.text_ids[row][step.text_mask[row].bool()].detach().cpu())

    def rerank_recall(self, sim_i2t: Tensor, txt2img: Tensor, image_ids: Tensor, k: int, itm: ItmLogits,
                      pad_id: int, ks: tuple[int, ...], device: torch.device) -> dict[str, float]:
        """R@K after re-scoring the top ``k`` of each row of ``sim_i2t [Ni, Nt]`` (and of its transpose) with ITM.

        ``image_ids [Ni]`` orders the images as ``sim_i2t``'s rows; texts are in :meth:`add` order."""
        if sim_i2t.shape[1] != len(self.texts):
            raise ValueError(f"{sim_i2t.shape[1]} texts in the similarity matrix, {len(self.texts)} kept for ITM")
        images = [self.images[int(i)] for i in image_ids.tolist()]
        ids = pad_sequence(self.texts, batch_first=True, padding_value=pad_id)
        mask = pad_sequence([torch.ones_like(t) for t in self.texts], batch_first=True)
        sim = sim_i2t.float().cpu()

        def match(image_rows: Tensor, text_rows: Tensor) -> Tensor:
            width = int(mask[text_rows].sum(1).max())
            logits = itm(torch.stack([images[r] for r in image_rows.tolist()]).to(device),
                         ids[text_rows, :width].to(device), mask[text_rows, :width].to(device))
            return logits[:, 1].float().cpu() + sim[image_rows, text_rows]

        i2t = rerank(sim, k, lambda i, js: match(torch.full_like(js, i), js))
        t2i = rerank(sim.t(), k, lambda t, js: match(js, torch.full_like(js, t)))
        return retrieval_recall(i2t, txt2img.cpu(), ks=ks, sim_t2i=t2i)


def caption_texts(module: Any, batch: Any, rows: Tensor) -> list[str]:
    """The caption of each of ``rows``: its target tokens (``labels`` not ``-100``) decoded with ``module.tokenizer``
    (special tokens dropped); ``""`` when the module has no tokenizer."""
    tokenizer = getattr(module, "tokenizer", None)
    if tokenizer is None:
        return [""] * len(rows)
    labels = batch.labels.detach().cpu()
    return [tokenizer.decode(labels[r][labels[r] != -100].tolist(), skip_special_tokens=True).strip()
            for r in rows.tolist()]


def _hit(row: dict[str, Any], score: float, match: bool, text: bool) -> dict[str, Any]:
    """One retrieved item: a caption (``text``) or an image, with its similarity and whether it is a positive."""
    return {**({"text": row["text"]} if text else {}), "id": row["id"], "key": row["key"], "score": round(score, 6),
            "match": match}


def top_matches(sim_i2t: Tensor, txt2img: Tensor, texts: list[dict[str, Any]], k: int = 5) -> dict[str, Any]:
    """The top-``k`` texts of every image and images of every text (``.top.json``, see the module docstring).

    Args:
        sim_i2t: ``[Ni, Nt]`` image×text similarity (rows: the distinct images by id; columns: the texts).
        txt2img: ``[Nt]`` row of each text's image.
        texts: ``Nt`` rows ``{"id", "key", "text"}`` in column order (``id``, ``key``: the text's image sample).
    """
    sim, txt2img = sim_i2t.float().cpu(), txt2img.cpu()
    num_images, num_texts = sim.shape
    if len(texts) != num_texts:
        raise ValueError(f"{num_texts} texts in the similarity matrix, {len(texts)} text rows")
    first = {int(i): t for t, i in reversed(list(enumerate(txt2img.tolist())))}  # image row → its first caption
    i2t = sim.topk(min(k, num_texts), dim=1)
    t2i = sim.t().topk(min(k, num_images), dim=1)
    images = [{"id": texts[first[i]]["id"], "key": texts[first[i]]["key"],
               "captions": [texts[t]["text"] for t in (txt2img == i).nonzero()[:, 0].tolist()],
               "texts": [_hit(texts[t], s, int(txt2img[t]) == i, True)
                         for s, t in zip(i2t.values[i].tolist(), i2t.indices[i].tolist())]}
              for i in range(num_images)]
    ranked = [{**texts[t], "images": [_hit(texts[first[i]], s, int(txt2img[t]) == i, False)
                                      for s, i in zip(t2i.values[t].tolist(), t2i.indices[t].tolist())]}
              for t in range(num_texts)]
    return {"k": k, "images": images, "texts": ranked}


class RetrievalEvaluator(Evaluator):
    """Loss terms per batch and R@K over the evaluation set (see the module docstring).

    The module provides ``retrieval_step(batch) -> RetrievalStep`` and, for re-ranking, ``itm_logits(images, ids,
    mask) -> [P, 2]`` and ``pad_id``. Only caption examples count for retrieval (``batch.tasks``; all examples when
    the batch has no tasks).

    Args:
        ks: the K of R@K.
        rerank_k: > 0: also re-rank each image's top-k texts (and each text's top-k images) with ITM and log
            ``rerank_i2t_r1`` … (single process only).
        top_k: how many retrieved items per image and per text ``….top.json`` lists (0: no file).
    """

    main_metric = "r_mean"
    predicts = False

    def __init__(self, ks: tuple[int, ...] = (1, 5, 10), rerank_k: int = 0, top_k: int = 5) -> None:
        super().__init__()
        if rerank_k < 0 or top_k < 0:
            raise ValueError(f"rerank_k and top_k must be >= 0, got {rerank_k} and {top_k}")
        self.recall, self.rerank_k, self.top_k = RetrievalRecall(ks=ks), rerank_k, top_k
        self._store = RerankStore()
        self._texts: list[dict[str, Any]] = []

    def step(self, module: Any, batch: Any, stage: str) -> StepOutput:
        out = module.retrieval_step(batch)
        tasks = list(batch.tasks or [])
        rows = torch.tensor([i for i, t in enumerate(tasks) if t == "caption"] if tasks else range(len(batch)),
                            dtype=torch.long)
        if len(rows):
            rows_dev = rows.to(out.image_ids.device)
            ids = out.image_ids[rows_dev]
            self.recall.update(out.image_feats[rows_dev], ids, out.text_feats[rows_dev], ids)
            if self.top_k > 0:
                self._texts += [{"id": batch.ids[r] if batch.ids else batch.keys[r],
                                 "key": batch.keys[r] if batch.keys else "", "text": text}
                                for r, text in zip(rows.tolist(), caption_texts(module, batch, rows))]
            if self.rerank_k > 0:
                self._check_single_process()
                self._store.add(out, rows)
        return StepOutput(logs=out.losses)

    def _check_single_process(self) -> None:
        _, world = rank_and_world()
        if world > 1:
            raise RuntimeError(f"ITM re-ranking (rerank_k={self.rerank_k}) runs in a single process only (the image "
                               "inputs and texts are kept per rank); evaluate with devices=1 or rerank_k=0")

    @torch.no_grad()
    def finish(self, module: Any, stage: str, files: ResultFiles) -> dict[str, Tensor | float]:
        metrics: dict[str, Tensor | float] = {}
        texts, self._texts = gather_objects(self._texts), []
        if any_rank(bool(self.recall.update_called), module.device):
            with self.recall.sync_context():  # every rank: the features of the whole set, in rank order
                sim, txt2img, image_ids = self.recall.similarity()
            metrics = retrieval_recall(sim, txt2img, ks=self.recall.ks)
            if self._store.texts:
                reranked = self._store.rerank_recall(sim, txt2img, image_ids, self.rerank_k, module.itm_logits,
                                                     module.pad_id, self.recall.ks, module.device)
                metrics |= {f"rerank_{name}": value for name, value in reranked.items()}
            files.write_json("retrieval", metrics)
            if self.top_k > 0 and files.directory is not None:
                files.write_json("retrieval", top_matches(sim, txt2img, texts, self.top_k), ".top.json")
        self.recall.reset()
        self._store = RerankStore()
        return metrics
