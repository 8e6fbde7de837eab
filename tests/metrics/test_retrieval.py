"""Retrieval R@K (Karpathy convention) on a hand-made 3-image / 6-caption matrix, the metric and re-ranking."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mmlm.metrics import RetrievalRecall, rerank, retrieval_recall

# Image i owns captions 2i and 2i + 1.
SIM = torch.tensor([
    [0.9, 0.1, 0.8, 0.2, 0.3, 0.00],  # image 0: best caption (0.9) first → rank 0
    [0.7, 0.6, 0.5, 0.1, 0.4, 0.30],  # image 1: best caption 0.5, behind 0.7 and 0.6 → rank 2
    [0.2, 0.9, 0.1, 0.8, 0.3, 0.35],  # image 2: best caption 0.35, behind 0.9 and 0.8 → rank 2
])
TXT2IMG = [0, 0, 1, 1, 2, 2]
IMG2TXTS = [[0, 1], [2, 3], [4, 5]]
# Text → image ranks by column: t0 0, t1 2, t2 1, t3 2, t4 2 (0.3 ties image 0's 0.3: ties count
# against the model), t5 0.
THIRD, HALF = 100 / 3, 50.0


def test_recall_hand_computed() -> None:
    scores = retrieval_recall(SIM, TXT2IMG, IMG2TXTS)
    expected = {"i2t_r1": THIRD, "i2t_r5": 100.0, "i2t_r10": 100.0, "t2i_r1": THIRD, "t2i_r5": 100.0,
                "t2i_r10": 100.0}
    assert scores == pytest.approx(expected | {"r_mean": (2 * THIRD + 400) / 6})
    small = retrieval_recall(SIM, torch.tensor(TXT2IMG), ks=(1, 2))  # img2txts derived from txt2img
    assert small == pytest.approx({"i2t_r1": THIRD, "i2t_r2": THIRD, "t2i_r1": THIRD, "t2i_r2": HALF,
                                   "r_mean": (3 * THIRD + HALF) / 4})


def test_recall_ties_and_errors() -> None:
    assert retrieval_recall(torch.zeros(3, 6), TXT2IMG, ks=(1,))["r_mean"] == 0.0  # all tied → no credit
    assert retrieval_recall(torch.eye(2), [0, 1], ks=(1,))["r_mean"] == 100.0
    with pytest.raises(ValueError, match="txt2img must hold 6"):
        retrieval_recall(SIM, [0, 1, 2])
    with pytest.raises(ValueError, match="img2txts has 2 entries"):
        retrieval_recall(SIM, TXT2IMG, [[0], [1]])
    with pytest.raises(ValueError, match="image 1: caption indices"):
        retrieval_recall(SIM, TXT2IMG, [[0], [9], [2]])


def test_rerank_replaces_top_k_with_toy_scores() -> None:
    txt2img = torch.tensor(TXT2IMG)

    def oracle_i2t(i: int, js: torch.Tensor) -> torch.Tensor:  # a perfect ITM head
        return (txt2img[js] == i).float()

    reranked = rerank(SIM, 2, oracle_i2t)
    assert reranked[0].tolist() == [1.0, float("-inf"), 0.0, float("-inf"), float("-inf"), float("-inf")]
    # top-2 holds a caption of image 0 only: R@1 1/3; with k = 3 every image has one in its top-3
    assert retrieval_recall(SIM, TXT2IMG, ks=(1,), sim_t2i=SIM.t())["i2t_r1"] == pytest.approx(THIRD)
    assert retrieval_recall(reranked, TXT2IMG, ks=(1,), sim_t2i=SIM.t())["i2t_r1"] == pytest.approx(THIRD)
    assert retrieval_recall(rerank(SIM, 3, oracle_i2t), TXT2IMG, ks=(1,), sim_t2i=SIM.t())["i2t_r1"] == 100.0
    sim_t2i = rerank(SIM.t(), 3, lambda t, js: (js == txt2img[t]).float())
    scores = retrieval_recall(SIM, TXT2IMG, ks=(1,), sim_t2i=sim_t2i)
    assert scores["t2i_r1"] == 100.0 and scores["i2t_r1"] == pytest.approx(THIRD)
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        rerank(SIM, 2, lambda i, js: torch.zeros(1))


def _pair_batches() -> list[tuple[torch.Tensor, ...]]:
    """Two batches of (image, caption) pairs reproducing ``SIM``; images repeat, ids are not in image order."""
    image_feats, text_feats = torch.eye(3), SIM.t().contiguous()  # image_i · text_t = SIM[i, t]
    ids = torch.tensor([30, 10, 20])  # image i has id ids[i]; sorted order is images 1, 2, 0
    img = torch.tensor(TXT2IMG)
    return [(image_feats[img[s]], ids[img[s]], text_feats[s], ids[img[s]]) for s in (slice(0, 3), slice(3, 6))]


def _sorted_reference(ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    order = torch.tensor([1, 2, 0])  # the metric sorts images by id
    return retrieval_recall(SIM[order], [order.tolist().index(i) for i in TXT2IMG], ks=ks)


def test_metric_accumulates_deduplicates_and_resets() -> None:
    metric = RetrievalRecall(ks=(1, 2))
    for batch in _pair_batches():
        metric.update(*batch)
    sim, txt2img, image_ids = metric.similarity()
    assert image_ids.tolist() == [10, 20, 30] and sim.shape == (3, 6)
    assert txt2img.tolist() == [2, 2, 0, 0, 1, 1]
    scores = metric.compute()
    assert {k: v.item() for k, v in scores.items()} == pytest.approx(_sorted_reference((1, 2)))
    assert scores["t2i_r2"].item() == pytest.approx(HALF)  # same numbers as the hand-computed case
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"), pytest.raises(ValueError, match="before any update"):
        metric.compute()


def test_metric_query_embeddings_and_missing_image() -> None:
    metric = RetrievalRecall(ks=(1,))
    queries = torch.stack([torch.eye(3), -torch.eye(3)], dim=1)  # [3, M=2, 3]: the max picks the first query
    metric.update(queries, torch.tensor([0, 1, 2]), torch.eye(3), torch.tensor([0, 1, 2]))
    assert metric.compute()["r_mean"].item() == 100.0
    metric.update(torch.zeros(0, 2, 3), torch.zeros(0), torch.eye(3)[:1], torch.tensor([7]))
    with pytest.raises(ValueError, match=r"without an image embedding: \[7\]"):
        metric.compute()


def _metric_worker(rank: int, store: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        metric = RetrievalRecall()
        metric.update(*_pair_batches()[rank])
        torch.save({k: v.item() for k, v in metric.compute().items()}, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_metric_gathers_embeddings_across_ranks(tmp_path) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(_metric_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2,
                       start_method="fork")
    for rank in range(2):
        assert torch.load(tmp_path / f"out.{rank}") == pytest.approx(_sorted_reference())
