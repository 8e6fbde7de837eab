"""Training losses shared by every model family.

Holds the language-model losses (token cross-entropy ignoring ``-100``, next-token loss), the
image–text contrastive loss (ITC, features gathered with grad across ranks), hard-negative
sampling and the image–text matching loss (ITM), so model files only compose them.

Shape legend: B batch (this rank), B_all batch gathered over all ranks, M query tokens, D width,
T text tokens, V vocabulary.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmlm.distributed import gather_padded, gather_sizes, gather_with_grad, rank_and_world

#: Label value that no loss counts (padding, prompts, image placeholders).
IGNORE_INDEX = -100


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of ``logits [B, T, V]`` against ``labels [B, T]`` over labels ``!= -100``.

    Computed in float32, on the target positions only (the float32 copy is ``[N, V]``, N targets). With no target
    at all the loss is 0 (still attached to the graph), not NaN. ``label_smoothing`` mixes each target with the
    uniform distribution over ``V`` (torch's ``label_smoothing``; BLIP-2's ITG uses 0.1).
    """
    keep = labels != IGNORE_INDEX
    total = F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum", label_smoothing=label_smoothing)
    return total / keep.sum().clamp(min=1)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Next-token loss: position ``t`` of ``logits [B, T, V]`` predicts ``labels [B, T]`` at ``t + 1``
    (``label_smoothing`` as in :func:`token_cross_entropy`)."""
    return token_cross_entropy(logits[:, :-1], labels[:, 1:], label_smoothing)


def _rows_cross_entropy(head: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor,
                        label_smoothing: float) -> Tensor:
    """Summed float32 cross-entropy of ``head(hidden [n, D]) → [n, V]`` against ``targets [n]``."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum", label_smoothing=label_smoothing)


def head_cross_entropy(hidden: Tensor, head: Callable[[Tensor], Tensor], labels: Tensor,
                       label_smoothing: float = 0.0, chunk_rows: int = 1024) -> Tensor:
    """:func:`token_cross_entropy` of ``head(hidden)`` with the head applied to the target positions only.

    Args:
        hidden: ``[B, T, D]`` what the output head reads (``head`` maps ``[n, D]`` to logits ``[n, V]`` row by row).
        head: the LM head (a module or function acting on each row alone: a final norm may be part of it).
        labels: ``[B, T]``, ``-100`` ignored; only the ``N`` labelled rows of ``hidden`` reach ``head``.
        label_smoothing: as in :func:`token_cross_entropy`.
        chunk_rows: most rows whose logits are held at once (1024: 200 MiB of float32 logits for a 50k
            vocabulary). With more targets, they go through the head ``chunk_rows`` at a time and each chunk's logits
            are recomputed in the backward pass (activation checkpointing), so peak memory is one chunk's
            ``[chunk_rows, V]`` instead of ``[N, V]``, for one more head pass over the targets.

    Returns:
        The scalar mean loss, equal (to float tolerance) to ``token_cross_entropy(head(hidden), labels)``, with the
        same gradients; 0 (attached to the graph) without targets.
    """
    keep = labels != IGNORE_INDEX
    rows, targets = hidden[keep], labels[keep]
    if len(rows) <= chunk_rows:
        total = _rows_cross_entropy(head, rows, targets, label_smoothing)
    else:
        total = sum(checkpoint(_rows_cross_entropy, head, rows[i:i + chunk_rows], targets[i:i + chunk_rows],
                               label_smoothing, use_reentrant=False) for i in range(0, len(rows), chunk_rows))
    return total / keep.sum().clamp(min=1)


def causal_head_loss(hidden: Tensor, head: Callable[[Tensor], Tensor], labels: Tensor,
                     label_smoothing: float = 0.0, chunk_rows: int = 1024) -> Tensor:
    """Next-token :func:`head_cross_entropy`: position ``t`` of ``hidden [B, T, D]`` predicts ``labels [B, T]`` at
    ``t + 1``; equals ``causal_lm_loss(head(hidden), labels, label_smoothing)`` with logits on the targets only."""
    return head_cross_entropy(hidden[:, :-1], head, labels[:, 1:], label_smoothing, chunk_rows)


# --------------------------------------------------------------------------- contrastive (ITC)


def stable_id(text: str) -> int:
    """A 63-bit id of ``text``, equal on every rank and run (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def image_id_tensor(ids: Sequence[Any], device: torch.device | str) -> Tensor:
    """``[B]`` long ids of the images named by ``ids`` (``Batch.ids`` of caption samples: image ids, of any type);
    equal ids give equal values on every rank, so they mark ITC positives and identify images in retrieval."""
    return torch.tensor([stable_id(str(i)) for i in ids], dtype=torch.long, device=device)


class ContrastiveOutput(NamedTuple):
    """Result of :func:`contrastive_loss`.

    Attributes:
        loss: scalar, mean of the image→text and text→image cross-entropies.
        sim_i2t: ``[B, B_all]`` logits (similarity / temperature) of this rank's images against
            every rank's texts; column ``j`` is sample ``j`` of the gathered batch (rank order).
        sim_t2i: ``[B, B_all]`` logits of this rank's texts against every rank's images.
        targets: ``[B, B_all]`` soft targets (rows sum to 1), shared by both directions.
    """

    loss: Tensor
    sim_i2t: Tensor
    sim_t2i: Tensor
    targets: Tensor


class Temperature(nn.Module):
    """A learnable contrastive temperature stored on a log scale (CLIP's ``logit_scale = log(1 / tau)``).

    ``forward()`` returns ``tau = exp(-log_scale)`` clamped to ``[min_value, max_value]`` (ALBEF's and BLIP's
    ``temp.clamp_(0.001, 0.5)``), ready for :func:`contrastive_loss`. LAVIS's BLIP-2 differs: it learns
    ``tau`` itself (``nn.Parameter(0.07)``), unclamped.

    ``log_scale`` has shape ``[1]`` (FSDP2 shards no 0-dim parameter); a checkpoint written with the earlier 0-dim
    one loads as is (reshaped on load).
    """

    def __init__(self, init: float = 0.07, min_value: float = 0.001, max_value: float = 0.5) -> None:
        super().__init__()
        if not min_value <= init <= max_value:
            raise ValueError(f"Temperature init {init} outside [{min_value}, {max_value}]")
        self.min_value, self.max_value = min_value, max_value
        self.log_scale = nn.Parameter(torch.tensor([math.log(1 / init)]))
        self.register_load_state_dict_pre_hook(one_dim_log_scale)

    def forward(self) -> Tensor:
        """The temperature ``tau`` (0-dim tensor, differentiable inside the clamp range)."""
        return torch.exp(-self.log_scale[0]).clamp(self.min_value, self.max_value)


def one_dim_log_scale(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook of :class:`Temperature`: a 0-dim ``log_scale`` (checkpoints before it became
    ``[1]``) is reshaped to ``[1]``."""
    key = f"{prefix}log_scale"
    if key in state_dict and state_dict[key].ndim == 0:
        state_dict[key] = state_dict[key].reshape(1)


def image_text_similarity(image_feats: Tensor, text_feats: Tensor) -> Tensor:
    """Dot-product similarity ``[Ni, Nt]`` of ``image_feats [Ni, D]`` or ``[Ni, M, D]`` and ``text_feats [Nt, D]``.

    With ``M`` query embeddings per image (BLIP-2's Q-Former output) the similarity of an image and
    a text is the maximum over the queries of ``query · text``.
    """
    if image_feats.dim() == 2:
        return image_feats @ text_feats.t()
    if image_feats.dim() != 3:
        raise ValueError(f"image_feats must be [N, D] or [N, M, D], got shape {tuple(image_feats.shape)}")
    return torch.einsum("imd,td->itm", image_feats, text_feats).amax(dim=-1)


def _sample_ids(image_ids: Tensor | None, batch_size: int, device: torch.device) -> Tensor:
    """``[B]`` long ids deciding positives: ``image_ids`` or, without them, one unique id per sample and rank."""
    if image_ids is None:
        rank, _ = rank_and_world()
        return torch.arange(batch_size, device=device) + (rank << 32)
    ids = image_ids.reshape(-1).to(device=device, dtype=torch.long)
    if ids.numel() != batch_size:
        raise ValueError(f"image_ids has {ids.numel()} entries for a batch of {batch_size} pairs")
    return ids


def positive_mask(image_ids: Tensor | None, batch_size: int, device: torch.device,
                  gather: bool = True) -> Tensor:
    """``[B, B_all]`` bool: local sample ``i`` and gathered sample ``j`` form a positive pair.

    Without ``image_ids`` the positives are the matching pairs only (the identity shifted to this
    rank's offset); with ``image_ids [B]`` every sample sharing the image id is a positive, so an
    image repeated with several captions in the (gathered) batch is never a negative of itself.
    """
    ids = _sample_ids(image_ids, batch_size, device)
    ids_all = gather_with_grad(ids) if gather else ids
    return ids[:, None] == ids_all[None, :]


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of ``-sum_j targets[i, j] * log_softmax(logits)[i, j]`` for ``logits, targets [B, C]``."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def contrastive_loss(
    image_feats: Tensor,
    text_feats: Tensor,
    temperature: Tensor | float,
    image_ids: Tensor | None = None,
    gather: bool = True,
    label_smoothing: float = 0.0,
) -> ContrastiveOutput:
    """Image–text contrastive loss (CLIP / ALBEF / BLIP-2 ITC) over the batch gathered from all ranks.

    Args:
        image_feats: ``[B, D]`` image embeddings, or ``[B, M, D]`` query embeddings (BLIP-2), whose
            similarity to a text is the maximum over the ``M`` queries.
        text_feats: ``[B, D]`` text embeddings; ``text_feats[i]`` is paired with ``image_feats[i]``.
        temperature: ``tau`` (float, or a 0-dim tensor such as ``Temperature()()`` or BLIP-2's raw
            ``temp`` parameter, through which gradients flow); logits are ``similarity / tau``.
        image_ids: optional ``[B]`` ids of the images; every gathered sample with the same id is a
            positive and the target mass is spread uniformly over them. Without ids the positive
            of sample ``i`` is its own pair.
        gather: gather features (with gradients) and ids from all ranks; no-op without a process group. LAVIS's
            BLIP-2 gathers without gradient (``concat_all_gather``: the other ranks' columns are constants), so
            with several ranks its gradients differ from these, which equal one process over the whole batch.
        label_smoothing: ``eps`` mixing the targets with the uniform distribution over ``B_all``
            (0 by default; BLIP-2 pre-training uses 0.1).

    Features are L2-normalised along ``D`` and the similarities are computed in float32. The loss
    is the mean of the image→text and text→image cross-entropies of this rank's rows; its mean over
    ranks equals the loss of one process over the concatenated batch.
    """
    if image_feats.shape[0] != text_feats.shape[0]:
        raise ValueError(f"{image_feats.shape[0]} images but {text_feats.shape[0]} texts in the contrastive batch")
    image = F.normalize(image_feats.float(), dim=-1)
    text = F.normalize(text_feats.float(), dim=-1)
    image_all = gather_with_grad(image) if gather else image
    text_all = gather_with_grad(text) if gather else text
    sim_i2t = image_text_similarity(image, text_all) / temperature
    sim_t2i = image_text_similarity(image_all, text).t() / temperature
    positives = positive_mask(image_ids, image.shape[0], image.device, gather)
    targets = positives.float() / positives.sum(dim=1, keepdim=True)
    if label_smoothing:
        targets = (1 - label_smoothing) * targets + label_smoothing / targets.shape[1]
    loss = (soft_cross_entropy(sim_i2t, targets) + soft_cross_entropy(sim_t2i, targets)) / 2
    return ContrastiveOutput(loss, sim_i2t, sim_t2i, targets)


# ----------------------------------------------------------------------------- matching (ITM)


def _sample_negatives(sim: Tensor, positives: Tensor, generator: torch.Generator | None) -> Tensor:
    """One column per row of ``sim [B, B_all]``, drawn from ``softmax(sim)`` over the non-positives."""
    no_negative = (~positives).sum(dim=1) == 0
    if no_negative.any():
        row = int(no_negative.nonzero()[0])
        raise ValueError(f"sample {row} has no negative: every gathered sample shares its image id")
    weights = sim.detach().float().masked_fill(positives, float("-inf")).softmax(dim=1)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: Tensor,
    sim_t2i: Tensor,
    image_ids: Tensor | None = None,
    generator: torch.Generator | None = None,
    gather: bool = True,
) -> tuple[Tensor, Tensor]:
    """Hard negatives for ITM (ALBEF / BLIP / BLIP-2): a likely-but-wrong partner for every local sample.

    Args:
        sim_i2t: ``[B, B_all]`` image→text logits (e.g. :attr:`ContrastiveOutput.sim_i2t`).
        sim_t2i: ``[B, B_all]`` text→image logits.
        image_ids: optional ``[B]`` image ids, as given to :func:`contrastive_loss`; samples with the
            same id are positives and never drawn. Without ids only the sample's own pair is excluded.
        generator: random generator on the device of the similarities.
        gather: whether the similarity columns span all ranks (as with ``contrastive_loss(gather=True)``).

    Returns:
        ``(neg_text_index [B], neg_image_index [B])``: indices into the gathered batch, drawn from
        the softmax of each row with its positives masked out, so more similar negatives are more likely.
    """
    positives = positive_mask(image_ids, sim_i2t.shape[0], sim_i2t.device, gather)
    if positives.shape != sim_i2t.shape or sim_t2i.shape != sim_i2t.shape:
        raise ValueError(f"similarities {tuple(sim_i2t.shape)} / {tuple(sim_t2i.shape)} do not match "
                         f"the positive mask {tuple(positives.shape)} (gather={gather})")
    return _sample_negatives(sim_i2t, positives, generator), _sample_negatives(sim_t2i, positives, generator)


def itm_labels(num_positives: int, num_negatives: int | None = None,
               device: torch.device | str | None = None) -> Tensor:
    """ITM labels ``[P + N]`` (long): ``num_positives`` ones, then ``num_negatives`` zeros (default ``2 * P``).

    The BLIP layout: ``B`` matching pairs, then ``B`` (image, hard-negative text) and ``B``
    (hard-negative image, text) pairs.
    """
    negatives = 2 * num_positives if num_negatives is None else num_negatives
    return torch.cat([torch.ones(num_positives, dtype=torch.long, device=device),
                      torch.zeros(negatives, dtype=torch.long, device=device)])


def matching_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """ITM cross-entropy of ``logits [N, 2]`` (class 1 = match) against ``labels [N]`` (see :func:`itm_labels`).

    Computed in float32; ``N`` is usually ``3B``.
    """
    if logits.dim() != 2 or logits.shape[1] != 2 or logits.shape[0] != labels.numel():
        raise ValueError(f"matching_loss needs logits [N, 2] and labels [N], got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    return F.cross_entropy(logits.float(), labels.reshape(-1).long())


#: ``itm_logits(images [P, …], ids [P, T], mask [P, T]) → [P, 2]``: a family's fusion pass + ITM head.
ItmLogits = Callable[[Tensor, Tensor, Tensor], Tensor]


def hard_negative_itm_loss(itm_logits: ItmLogits, images: Tensor, ids: Tensor, mask: Tensor, image_ids: Tensor,
                           itc: ContrastiveOutput, pad_id: int) -> Tensor:
    """ITM (ALBEF / BLIP-2 / VLMO) on ``B`` matching pairs, ``B`` (image, hard-negative text) and ``B`` (hard-negative
    image, text) pairs; the negatives are drawn from every rank's batch by the ITC similarities of ``itc``.

    Args:
        itm_logits: the family's matching pass (BLIP-2: bidirectional Q-Former + head; VLMO: fusion encoder + head).
        images: ``[B, …]`` what ``itm_logits`` reads for an image (frozen image tokens ``[B, N, Dv]``, or pixels).
        ids, mask: ``[B, T]`` the texts (right-padded).
        image_ids: ``[B]`` image ids of the samples (equal ids are positives, never negatives).
        itc: the contrastive output of the same batch (``gather=True``).
        pad_id: the text padding id.

    Returns:
        The matching cross-entropy; 0 when every gathered sample shows the same image (no negative exists; then
        true on every rank alike, so the ranks stay in step).
    """
    if bool(positive_mask(image_ids, ids.shape[0], ids.device, gather=True).all()):  # not itc.targets: smoothed
        return itc.loss * 0.0
    neg_text, neg_image = sample_hard_negatives(itc.sim_i2t, itc.sim_t2i, image_ids, gather=True)
    width = max(gather_sizes(ids.shape[1], ids.device))
    ids, mask = F.pad(ids, (0, width - ids.shape[1]), value=pad_id), F.pad(mask, (0, width - mask.shape[1]))
    images_all = gather_with_grad(images.detach())
    ids_all, mask_all = gather_padded(ids, pad_id, width), gather_padded(mask, 0, width)
    logits = itm_logits(torch.cat([images, images, images_all[neg_image]]),
                        torch.cat([ids, ids_all[neg_text], ids]), torch.cat([mask, mask_all[neg_text], mask]))
    return matching_loss(logits, itm_labels(images.shape[0], device=images.device))
