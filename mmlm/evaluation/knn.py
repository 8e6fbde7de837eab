"""Weighted k-NN classification on frozen features (DINO's ``eval_knn.py``; Wu et al. 2018): the protocol of
self-supervised image encoders.

The module provides ``knn_features(pixels) -> [B, D]``. Evaluation batches (:class:`mmlm.ssl.LabelledImageBatch`)
come in two roles: ``"bank"`` (labelled memory, e.g. the training split without augmentation) and ``"query"``. At the
end of the epoch the features of every rank are gathered; each query's ``k`` most cosine-similar bank features vote
for their labels with weight ``exp(similarity / T)``, and ``{stage}/knn_top1_{label}`` / ``knn_top5_{label}`` are the
shares of queries whose label is the highest (among the five highest) voted. Labels ``-1`` are left out of both the bank
and the queries of that label set.

The same features also get a linear probe, ``{stage}/linear_top1_{label}``: an L2-regularised multinomial logistic
regression fitted by full-batch L-BFGS on the bank's standardised features and scored on the queries (the linear
probe of CLIP's evaluation, Radford et al. 2021). DINO's own ``eval_linear.py`` instead trains the linear layer for
100 epochs of SGD on augmented crops; that is a training run of its own, not a validation metric.
Shape legend: B batch, D width, N bank size, Q queries, C classes, L label sets.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmlm.distributed import gather_objects
from mmlm.evaluation.base import Evaluator, ResultFiles, StepOutput


@torch.no_grad()
def knn_classify(bank: Tensor, bank_labels: Tensor, queries: Tensor, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None, chunk: int = 256) -> Tensor:
    """Class votes ``[Q, C]`` of L2-normalised ``queries [Q, D]`` from their ``k`` nearest rows of the L2-normalised
    ``bank [N, D]`` (cosine similarity ``s``), each neighbour adding ``exp(s / temperature)`` to its label's vote
    (``bank_labels [N]``, ``0 ≤ label < C``); queries are scored ``chunk`` at a time."""
    num_classes = num_classes if num_classes is not None else int(bank_labels.max()) + 1
    k = min(k, bank.shape[0])
    votes = []
    for part in queries.split(chunk):
        similarity, index = (part @ bank.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        one_hot = F.one_hot(bank_labels[index], num_classes).to(weights.dtype)  # [q, k, C]
        votes.append((one_hot * weights.unsqueeze(-1)).sum(1))
    return torch.cat(votes) if votes else queries.new_zeros(0, num_classes)


def linear_probe(bank: Tensor, bank_labels: Tensor, queries: Tensor, num_classes: int,
                 weight_decay: float = 1e-4, max_iter: int = 200) -> Tensor:
    """Class logits ``[Q, C]`` of ``queries [Q, D]`` from a linear classifier fitted on ``bank [N, D]`` with
    ``bank_labels [N]``: features standardised with the bank's mean and std, weights from zero, cross-entropy plus
    ``weight_decay * ||W||²`` minimised by full-batch L-BFGS (strong-Wolfe line search, ``max_iter`` iterations);
    deterministic for given inputs."""
    # validation runs under inference mode: leave it (and no_grad) and copy the inputs out of it to fit
    with torch.inference_mode(False), torch.enable_grad():
        bank, queries, bank_labels = bank.clone().float(), queries.clone().float(), bank_labels.clone()
        mean, std = bank.mean(0), bank.std(0, unbiased=False).clamp_min(1e-6)
        x, q = (bank - mean) / std, (queries - mean) / std
        weight = torch.zeros(bank.shape[1], num_classes, device=bank.device, requires_grad=True)
        bias = torch.zeros(num_classes, device=bank.device, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(x @ weight + bias, bank_labels) + weight_decay * weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return (q @ weight + bias).detach()


def topk_accuracy(votes: Tensor, targets: Tensor, k: int) -> float:
    """Share of rows whose target is among the ``k`` highest votes (ties broken by ``topk``)."""
    if targets.numel() == 0:
        return float("nan")
    top = votes.topk(min(k, votes.shape[1]), dim=1).indices
    return float((top == targets[:, None]).any(1).float().mean())


class KnnEvaluator(Evaluator):
    """k-NN accuracy of ``module.knn_features`` (see the module docstring).

    Args:
        k: neighbours (20 in DINO's ImageNet protocol).
        temperature: vote temperature ``T`` (0.07).
        probe_weight_decay: L2 weight of the linear probe (:func:`linear_probe`).
    """

    predicts = False

    def __init__(self, k: int = 20, temperature: float = 0.07, probe_weight_decay: float = 1e-4) -> None:
        super().__init__()
        self.k, self.temperature, self.probe_weight_decay = k, temperature, probe_weight_decay
        self._store: dict[str, list[tuple[Tensor, Tensor]]] = {"bank": [], "query": []}
        self._names: list[str] = []

    @torch.no_grad()
    def step(self, module: Any, batch: Any, stage: str) -> StepOutput:
        if stage == "predict":
            return StepOutput()
        if batch.role not in self._store:
            raise ValueError(f"k-NN batches have role 'bank' or 'query', got {batch.role!r}")
        features = F.normalize(module.knn_features(batch.pixels).float(), dim=-1)
        self._store[batch.role].append((features.cpu(), batch.labels.cpu()))
        self._names = list(batch.label_names)
        self.main_metric = f"knn_top1_{self._names[0]}" if self._names else None
        return StepOutput()

    def _gathered(self, role: str) -> tuple[Tensor, Tensor] | None:
        """Every rank's ``(features [N, D], labels [N, L])`` of ``role`` (collective), ``None`` when there are none."""
        parts = gather_objects(self._store[role])
        self._store[role] = []
        if not parts:
            return None
        return torch.cat([f for f, _ in parts]), torch.cat([labels for _, labels in parts])

    def finish(self, module: Any, stage: str, files: ResultFiles) -> dict[str, Tensor | float]:
        bank, queries = self._gathered("bank"), self._gathered("query")
        names = gather_objects([self._names])
        names = next((n for n in names if n), [])
        if bank is None or queries is None:
            return {}
        device = module.device
        metrics: dict[str, Tensor | float] = {}
        for column, name in enumerate(names):
            bank_keep, query_keep = bank[1][:, column] >= 0, queries[1][:, column] >= 0
            if not bank_keep.any() or not query_keep.any():
                continue
            bank_labels, targets = bank[1][bank_keep, column].to(device), queries[1][query_keep, column].to(device)
            classes = int(max(bank_labels.max(), targets.max())) + 1
            votes = knn_classify(bank[0][bank_keep].to(device), bank_labels, queries[0][query_keep].to(device),
                                 self.k, self.temperature, classes)
            metrics[f"knn_top1_{name}"] = topk_accuracy(votes, targets, 1)
            metrics[f"knn_top5_{name}"] = topk_accuracy(votes, targets, 5)
            logits = linear_probe(bank[0][bank_keep].to(device), bank_labels, queries[0][query_keep].to(device), classes,
                                  self.probe_weight_decay)
            metrics[f"linear_top1_{name}"] = topk_accuracy(logits, targets, 1)
        files.write_json("knn", {**{k: float(v) for k, v in metrics.items()}, "k": self.k,
                                 "temperature": self.temperature,
                                 "probe_weight_decay": self.probe_weight_decay, "bank": len(bank[0]), "queries": len(queries[0])})
        return metrics
