"""Image–text retrieval recall (R@K) in the COCO / Flickr30k Karpathy-split convention.

Each image has several captions. Image→text retrieval (text retrieval, "TR") scores a hit at ``K``
when any caption of the image is among its ``K`` best texts; text→image retrieval (image
retrieval, "IR") when the caption's image is among its ``K`` best images. Values are percentages,
as in the papers and LAVIS's ``report_metrics``.

Ties are counted against the model: the rank of a positive is the number of *negatives* scoring
at least as high, so a constant similarity matrix gets 0, not 100.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from mmlm.losses import image_text_similarity


def _positive_mask(txt2img: Tensor, num_images: int) -> Tensor:
    """``[Ni, Nt]`` bool: text ``t`` is a caption of image ``i``."""
    return torch.arange(num_images, device=txt2img.device)[:, None] == txt2img[None, :]


def _mask_from_img2txts(img2txts: Sequence[Sequence[int]], num_images: int, num_texts: int,
                        device: torch.device) -> Tensor:
    """``[Ni, Nt]`` bool from per-image caption lists; raises on a wrong count or an out-of-range index."""
    if len(img2txts) != num_images:
        raise ValueError(f"img2txts has {len(img2txts)} entries for {num_images} images")
    mask = torch.zeros(num_images, num_texts, dtype=torch.bool, device=device)
    for image, texts in enumerate(img2txts):
        if not texts or any(not 0 <= t < num_texts for t in texts):
            raise ValueError(f"image {image}: caption indices {list(texts)} must be non-empty and in [0, {num_texts})")
        mask[image, list(texts)] = True
    return mask


def _hits(ranks: Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Percentage of queries whose positive rank (0-based) is below each ``k``."""
    return {k: 100.0 * (ranks < k).float().mean().item() for k in ks}


def retrieval_recall(
    sim_i2t: Tensor,
    txt2img: Sequence[int] | Tensor,
    img2txts: Sequence[Sequence[int]] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    sim_t2i: Tensor | None = None,
) -> dict[str, float]:
    """Recall@K of both retrieval directions.

    Args:
        sim_i2t: ``[Ni, Nt]`` scores of every image against every text (higher = better).
        txt2img: ``[Nt]`` index of each text's image.
        img2txts: per image, the indices of its texts (defaults to the inverse of ``txt2img``).
        ks: the ``K`` values.
        sim_t2i: optional ``[Nt, Ni]`` text→image scores when they differ from ``sim_i2t.T``
            (e.g. after ITM re-ranking in each direction, see :func:`rerank`).

    Returns:
        ``{"i2t_r1": …, "i2t_r5": …, "i2t_r10": …, "t2i_r1": …, …, "r_mean": …}`` in percent;
        ``r_mean`` is the mean of all the others.
    """
    num_images, num_texts = sim_i2t.shape
    txt2img = torch.as_tensor(txt2img, dtype=torch.long, device=sim_i2t.device).reshape(-1)
    if txt2img.numel() != num_texts or (txt2img < 0).any() or (txt2img >= num_images).any():
        raise ValueError(f"txt2img must hold {num_texts} image indices in [0, {num_images}), got {txt2img.tolist()}")
    t2i_mask = _positive_mask(txt2img, num_images)
    i2t_mask = t2i_mask if img2txts is None else _mask_from_img2txts(img2txts, num_images, num_texts, sim_i2t.device)
    t2i = sim_i2t.t() if sim_t2i is None else sim_t2i
    if t2i.shape != (num_texts, num_images):
        raise ValueError(f"sim_t2i must be [{num_texts}, {num_images}], got {tuple(t2i.shape)}")
    best = sim_i2t.masked_fill(~i2t_mask, float("-inf")).amax(dim=1, keepdim=True)  # [Ni, 1]
    i2t_ranks = ((sim_i2t >= best) & ~i2t_mask).sum(dim=1)
    target = t2i.gather(1, txt2img[:, None])  # [Nt, 1]
    t2i_ranks = ((t2i >= target) & ~t2i_mask.t()).sum(dim=1)
    scores = {f"i2t_r{k}": v for k, v in _hits(i2t_ranks, ks).items()}
    scores |= {f"t2i_r{k}": v for k, v in _hits(t2i_ranks, ks).items()}
    scores["r_mean"] = sum(scores.values()) / len(scores)
    return scores


def rerank(sim: Tensor, k: int, score_fn: Callable[[int, Tensor], Tensor]) -> Tensor:
    """Re-score each row's top ``k`` candidates, e.g. with an ITM head (BLIP / BLIP-2 retrieval).

    Args:
        sim: ``[Nq, Nc]`` first-stage scores (queries × candidates).
        k: candidates kept per row (clipped to ``Nc``).
        score_fn: ``score_fn(i, js)`` → ``[k]`` new scores of query ``i`` with candidates ``js [k]``.

    Returns:
        ``[Nq, Nc]`` with the top-``k`` entries of each row replaced by ``score_fn`` and every other
        entry ``-inf``, so any re-scored candidate ranks above the rest (LAVIS fills them with -100).
        For text→image re-ranking pass ``sim_i2t.T`` and give the result as ``sim_t2i``.
    """
    k = min(k, sim.shape[1])
    out = torch.full_like(sim, float("-inf"))
    top = sim.topk(k, dim=1).indices
    for i in range(sim.shape[0]):
        scores = torch.as_tensor(score_fn(i, top[i]), dtype=sim.dtype, device=sim.device).reshape(-1)
        if scores.numel() != k:
            raise ValueError(f"score_fn returned {scores.numel()} scores for {k} candidates of row {i}")
        out[i, top[i]] = scores
    return out


def _is_empty(state: list[Tensor] | Tensor) -> bool:
    """A cat state with no rows (a list before sync, a tensor after)."""
    return len(state) == 0 if isinstance(state, list) else state.numel() == 0


class RetrievalRecall(Metric):
    """R@K of image↔text retrieval over everything seen, DDP-safe (tensor states cat-reduced).

    ``update`` takes image embeddings with their image ids and text embeddings with the id of their
    image; batches of (image, caption) pairs can pass the same image many times, duplicates (same
    id) are dropped in :meth:`compute` (first occurrence kept). Similarity is the dot product
    (normalise the embeddings first for cosine); image embeddings ``[B, M, D]`` use the maximum
    over the ``M`` queries (BLIP-2). ``compute()`` returns :func:`retrieval_recall`'s dict as
    float32 scalar tensors.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, ks: Sequence[int] = (1, 5, 10), **kwargs) -> None:
        super().__init__(**kwargs)
        self.ks = tuple(ks)
        for name in ("image_feats", "image_ids", "text_feats", "text_image_ids"):
            self.add_state(name, [], dist_reduce_fx="cat")

    def update(self, image_feats: Tensor, image_ids: Tensor, text_feats: Tensor, text_image_ids: Tensor) -> None:
        """Add ``image_feats [Bi, D]`` or ``[Bi, M, D]`` with ``image_ids [Bi]`` and ``text_feats [Bt, D]``
        with ``text_image_ids [Bt]`` (the id of each text's image). Either side may be empty (``[0, D]``)."""
        if image_feats.shape[0] != image_ids.numel() or text_feats.shape[0] != text_image_ids.numel():
            raise ValueError(f"{image_feats.shape[0]} image embeddings for {image_ids.numel()} ids, "
                             f"{text_feats.shape[0]} text embeddings for {text_image_ids.numel()} ids")
        self.image_feats.append(image_feats.detach().float())
        self.image_ids.append(image_ids.detach().reshape(-1).long())
        self.text_feats.append(text_feats.detach().float())
        self.text_image_ids.append(text_image_ids.detach().reshape(-1).long())

    def similarity(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(sim_i2t [Ni, Nt], txt2img [Nt], image_ids [Ni])`` over the distinct images (sorted by id).

        Raises:
            ValueError: nothing was added, or a text's image id has no image embedding.
        """
        if _is_empty(self.image_ids) or _is_empty(self.text_image_ids):
            raise ValueError("RetrievalRecall.compute() before any update")
        image_ids, text_image_ids = dim_zero_cat(self.image_ids), dim_zero_cat(self.text_image_ids)
        unique_ids, inverse = torch.unique(image_ids, sorted=True, return_inverse=True)
        first = torch.full((unique_ids.numel(),), image_ids.numel(), dtype=torch.long, device=image_ids.device)
        first = first.scatter_reduce(0, inverse, torch.arange(image_ids.numel(), device=image_ids.device), "amin")
        txt2img = torch.searchsorted(unique_ids, text_image_ids).clamp(max=unique_ids.numel() - 1)
        missing = unique_ids[txt2img] != text_image_ids
        if missing.any():
            raise ValueError(f"texts refer to image ids without an image embedding: "
                             f"{text_image_ids[missing].unique().tolist()[:10]}")
        image_feats = dim_zero_cat(self.image_feats)[first]
        return image_text_similarity(image_feats, dim_zero_cat(self.text_feats)), txt2img, unique_ids

    def compute(self) -> dict[str, Tensor]:
        """R@K in percent for both directions and their mean (``r_mean``)."""
        sim, txt2img, _ = self.similarity()
        scores = retrieval_recall(sim, txt2img, ks=self.ks)
        return {name: torch.tensor(value, dtype=torch.float32, device=self.device) for name, value in scores.items()}
