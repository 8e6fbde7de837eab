"""Contrastive (ITC), hard-negative and matching (ITM) losses against hand-computed values; gather on 2 ranks."""

from __future__ import annotations

import datetime
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmlm.distributed import gather_with_grad, rank_and_world
from mmlm.losses import (
    Temperature,
    contrastive_loss,
    image_text_similarity,
    itm_labels,
    matching_loss,
    sample_hard_negatives,
)

# ----------------------------------------------------------------------------------- contrastive


def test_contrastive_two_by_two_hand_computed() -> None:
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    out = contrastive_loss(image, text, temperature=0.5)
    # sims [[1, .6], [0, .8]] / 0.5 → i2t logits [[2, 1.2], [0, 1.6]], t2i logits [[2, 0], [1.2, 1.6]]
    torch.testing.assert_close(out.sim_i2t, torch.tensor([[2.0, 1.2], [0.0, 1.6]]))
    torch.testing.assert_close(out.sim_t2i, torch.tensor([[2.0, 0.0], [1.2, 1.6]]))
    # CE of a 2-way softmax whose target logit leads by d is log(1 + e^-d)
    i2t = (math.log1p(math.exp(-0.8)) + math.log1p(math.exp(-1.6))) / 2
    t2i = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-0.4))) / 2
    assert out.loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    torch.testing.assert_close(out.targets, torch.eye(2))


def test_contrastive_normalises_features() -> None:
    image = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    text = torch.tensor([[10.0, 0.0], [6.0, 8.0]])
    reference = contrastive_loss(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), text / text.norm(dim=1, keepdim=True), 0.5)
    torch.testing.assert_close(contrastive_loss(image, text, 0.5).loss, reference.loss)


def test_aligned_features_low_temperature_give_near_zero_loss() -> None:
    feats = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    assert contrastive_loss(feats, feats.clone(), temperature=0.01).loss.item() < 1e-4
    assert contrastive_loss(feats, feats.flip(0), temperature=0.01).loss.item() > 1.0  # mismatched pairs


def test_duplicate_image_ids_give_soft_targets() -> None:
    # sims = identity, tau 1; samples 0 and 1 show the same image (id 7).
    # Rows 0 and 1: targets [.5, .5, 0] on logits with one 1 → L - 0.5 with L = log(e + 2); row 2: L - 1.
    # Both directions are the same, so the loss is (2 (L - .5) + L - 1) / 3 = L - 2/3.
    out = contrastive_loss(torch.eye(3), torch.eye(3), 1.0, image_ids=torch.tensor([7, 7, 9]))
    torch.testing.assert_close(out.targets, torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))
    assert out.loss.item() == pytest.approx(math.log(math.e + 2) - 2 / 3, rel=1e-6)
    distinct = contrastive_loss(torch.eye(3), torch.eye(3), 1.0, image_ids=torch.tensor([1, 2, 3]))
    assert distinct.loss.item() == pytest.approx(math.log(math.e + 2) - 1, rel=1e-6)  # = identity targets


def test_label_smoothing_matches_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(1)
    image, text = torch.randn(5, 8, generator=gen), torch.randn(5, 8, generator=gen)
    out = contrastive_loss(image, text, 0.1, label_smoothing=0.1)
    targets = torch.arange(5)
    expected = (F.cross_entropy(out.sim_i2t, targets, label_smoothing=0.1)
                + F.cross_entropy(out.sim_t2i, targets, label_smoothing=0.1)) / 2
    torch.testing.assert_close(out.loss, expected)


def test_max_over_queries_similarity() -> None:
    queries = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one image, two queries
    text = torch.tensor([[0.6, 0.8], [1.0, 0.0], [-1.0, 0.0]])
    torch.testing.assert_close(image_text_similarity(queries, text), torch.tensor([[0.8, 1.0, 0.0]]))
    image = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[0.0, -3.0], [-1.0, 0.0]]])  # [B=2, M=2, D=2]
    out = contrastive_loss(image, text[:2], temperature=0.5)
    # image 0: max(.6, .8)=.8 and max(1, 0)=1; image 1: max(-.8, -.6)=-.6 and max(0, -1)=0
    torch.testing.assert_close(out.sim_i2t, torch.tensor([[0.8, 1.0], [-0.6, 0.0]]) / 0.5)
    torch.testing.assert_close(out.sim_t2i, out.sim_i2t.t())


def test_temperature_is_learnable_on_log_scale() -> None:
    temp = Temperature(0.07)
    assert temp().item() == pytest.approx(0.07)
    assert temp.log_scale.item() == pytest.approx(math.log(1 / 0.07))
    feats = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    contrastive_loss(feats, feats.roll(1, 0), temp()).loss.backward()
    assert temp.log_scale.grad is not None and temp.log_scale.grad.abs() > 0
    with pytest.raises(ValueError, match="outside"):
        Temperature(1.0)


def test_contrastive_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="3 images but 2 texts"):
        contrastive_loss(torch.randn(3, 4), torch.randn(2, 4), 1.0)
    with pytest.raises(ValueError, match="image_ids has 2 entries"):
        contrastive_loss(torch.randn(3, 4), torch.randn(3, 4), 1.0, image_ids=torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------- hard negatives


def test_hard_negatives_never_positive_and_prefer_similar() -> None:
    batch = 4
    # Positives score highest (10) and must never be drawn; negative (i + 1) % B leads the others by 3.
    sim = torch.zeros(batch, batch)
    sim[torch.arange(batch), torch.arange(batch)] = 10.0
    sim[torch.arange(batch), (torch.arange(batch) + 1) % batch] = 3.0
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([torch.stack(sample_hard_negatives(sim, sim.t().clone(), generator=gen)) for _ in range(500)])
    texts, images = draws[:, 0], draws[:, 1]  # [draws, B]
    rows = torch.arange(batch)
    assert not (texts == rows).any() and not (images == rows).any()
    share = (texts == (rows + 1) % batch).float().mean().item()
    assert share == pytest.approx(math.exp(3) / (math.exp(3) + 2), abs=0.05)  # ≈ 0.91
    share_t2i = (images == (rows - 1) % batch).float().mean().item()  # sim.T puts the 3 at column i - 1
    assert share_t2i == pytest.approx(math.exp(3) / (math.exp(3) + 2), abs=0.05)


def test_hard_negatives_skip_every_sample_of_the_same_image() -> None:
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    gen = torch.Generator().manual_seed(1)
    sim = torch.randn(6, 6, generator=gen) + 5 * (ids[:, None] == ids[None, :])  # positives look best
    for _ in range(300):
        texts, images = sample_hard_negatives(sim, sim.t(), image_ids=ids, generator=gen)
        assert not (ids[texts] == ids).any() and not (ids[images] == ids).any()
    with pytest.raises(ValueError, match="no negative"):
        sample_hard_negatives(sim[:2, :2], sim[:2, :2], image_ids=torch.tensor([3, 3]))


def test_itm_labels_and_matching_loss() -> None:
    labels = itm_labels(2)
    assert labels.tolist() == [1, 1, 0, 0, 0, 0] and labels.dtype == torch.long
    assert itm_labels(2, num_negatives=1).tolist() == [1, 1, 0]
    logits = torch.tensor([[0.0, 2.0], [1.0, 1.0], [3.0, 0.0], [0.0, 0.0], [0.5, -0.5], [2.0, 1.0]])
    expected = sum(math.log1p(math.exp(-d)) for d in (2.0, 0.0, 3.0, 0.0, 1.0, 1.0)) / 6
    assert matching_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match=r"logits \[N, 2\]"):
        matching_loss(torch.zeros(6, 3), labels)


# ------------------------------------------------------------------------------- two ranks (gloo)


def _full_batch() -> dict[str, torch.Tensor]:
    """A 6-pair batch (ranks take 3 each): [B, M, D] queries, texts, ids with an image shared across ranks."""
    gen = torch.Generator().manual_seed(3)
    return {"image": torch.randn(6, 2, 8, generator=gen), "text": torch.randn(6, 8, generator=gen),
            "ids": torch.tensor([0, 1, 2, 2, 3, 0])}


def _loss_and_grads(image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    temp = torch.tensor(0.2, requires_grad=True)
    out = contrastive_loss(image, text, temp, image_ids=ids)
    out.loss.backward()
    return {"loss": out.loss.detach(), "image": image.grad, "text": text.grad, "temp": temp.grad,
            "sim": out.sim_i2t.detach()}


def _gather_worker(rank: int, store: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))  # a lost peer fails the test, never hangs it
    try:
        batch, local = _full_batch(), slice(3 * rank, 3 * rank + 3)
        result = {"rank_world": rank_and_world()}
        for name, ids in (("plain", None), ("ids", batch["ids"][local])):
            result[name] = _loss_and_grads(batch["image"][local], batch["text"][local], ids)
        sim = result["ids"]["sim"]
        result["negatives"] = sample_hard_negatives(sim, sim, image_ids=batch["ids"][local],
                                                    generator=torch.Generator().manual_seed(rank))
        x = torch.arange(rank + 2, dtype=torch.float32).requires_grad_()  # unequal sizes: 2 and 3 rows
        weights = torch.arange(1.0, 6.0)
        gathered = gather_with_grad(x)
        (gathered * weights).sum().backward()
        result["uneven"] = {"gathered": gathered.detach(), "grad": x.grad}
        torch.save(result, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_gather_with_grad_on_two_ranks_matches_one_process(tmp_path) -> None:
    import torch.multiprocessing as mp

    # spawn, not fork: a forked child cannot run backward once this process has (pytest-xdist runs other tests'
    # backward passes in the same worker first)
    mp.start_processes(_gather_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"out.{rank}") for rank in range(2)]
    batch = _full_batch()
    assert [r["rank_world"] for r in ranks] == [(0, 2), (1, 2)]
    for name, ids in (("plain", None), ("ids", batch["ids"])):
        full = _loss_and_grads(batch["image"], batch["text"], ids)
        # DDP's view: the mean of the rank losses, parameter gradients averaged over ranks
        torch.testing.assert_close((ranks[0][name]["loss"] + ranks[1][name]["loss"]) / 2, full["loss"])
        for key in ("image", "text"):
            torch.testing.assert_close(torch.cat([r[name][key] for r in ranks]) / 2, full[key])
        torch.testing.assert_close((ranks[0][name]["temp"] + ranks[1][name]["temp"]) / 2, full["temp"])
        torch.testing.assert_close(torch.cat([r[name]["sim"] for r in ranks]), full["sim"])
    for rank, result in enumerate(ranks):  # never a sample of the same image, on either rank's slice
        local_ids = batch["ids"][3 * rank: 3 * rank + 3]
        for index in result["negatives"]:
            assert not (batch["ids"][index] == local_ids).any()
        torch.testing.assert_close(result["uneven"]["gathered"], torch.tensor([0.0, 1.0, 0.0, 1.0, 2.0]))
    # each rank's rows get the summed gradient (weights) from both ranks' losses
    torch.testing.assert_close(ranks[0]["uneven"]["grad"], 2 * torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(ranks[1]["uneven"]["grad"], 2 * torch.tensor([3.0, 4.0, 5.0]))


def test_gather_is_identity_without_process_group() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    assert rank_and_world() == (0, 1)


def test_temperature_loads_a_checkpoint_of_the_earlier_0_dim_log_scale() -> None:
    temp = Temperature(0.07)
    assert temp.log_scale.shape == (1,)  # FSDP2 shards no 0-dim parameter
    temp.load_state_dict({"log_scale": torch.tensor(math.log(1 / 0.05))})
    assert temp.log_scale.shape == (1,) and float(temp()) == pytest.approx(0.05)
