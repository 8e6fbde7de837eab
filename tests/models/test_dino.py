"""DINO: the loss against a hand computation, centre and EMA updates (with a process group), schedules, the teacher
without gradient, last-layer freezing and per-parameter clipping, k-NN on hand-made features, the timm export round
trip, the multi-crop pipeline, and the tiny config fitting a few steps through the CLI."""

from __future__ import annotations

import copy
import math
import socket
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file

from datamodules.multicrop import CaptionLabels, MultiCropTransform, unique_word
from mmlm.encoders import TimmEncoder
from mmlm.evaluation import KnnEvaluator, knn_classify, linear_probe
from mmlm.evaluation.base import ResultFiles
from mmlm.models import Dino
from mmlm.ssl import (
    DinoHead,
    DinoLoss,
    LabelledImageBatch,
    MultiCropBatch,
    cosine_schedule,
    ema_update_,
    linear_warmup,
    target_entropies,
)

TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "dino.yaml"
VIT = {"name": "vit_tiny_patch16_224", "img_size": 32,
       "model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "dynamic_img_size": True}}


def tiny_dino(**kwargs) -> Dino:
    torch.manual_seed(0)
    return Dino(TimmEncoder(**VIT), out_dim=16, hidden_dim=32, bottleneck_dim=8, **kwargs)


def crops(batch: int = 3, local: int = 2) -> MultiCropBatch:
    return MultiCropBatch(torch.randn(batch, 2, 3, 32, 32), torch.randn(batch, local, 3, 16, 16))


def log_softmax(row: list[float]) -> list[float]:
    top = math.log(sum(math.exp(x) for x in row))
    return [x - top for x in row]


def test_loss_equals_a_hand_computation():
    student = [[1.0, 0.0, -1.0], [0.5, 0.2, 0.1], [-0.3, 0.4, 0.0]]  # 2 global views + 1 local, one image, K = 3
    teacher = [[0.2, 0.1, 0.0], [0.0, 0.3, -0.1]]
    center = [0.05, -0.05, 0.1]
    loss_fn = DinoLoss(3, student_temp=0.1)
    loss_fn.center.copy_(torch.tensor([center]))
    # by hand: q_t = softmax((t - c) / 0.04); p_v = log_softmax(s / 0.1); mean over pairs v != t of -sum q_t p_v
    terms = []
    for t, row in enumerate(teacher):
        logq = log_softmax([(x - c) / 0.04 for x, c in zip(row, center)])
        for v, srow in enumerate(student):
            if v != t:
                terms.append(-sum(math.exp(q) * p for q, p in zip(logq, log_softmax([x / 0.1 for x in srow]))))
    expected = sum(terms) / len(terms)
    got = loss_fn(torch.tensor(student)[:, None], torch.tensor(teacher)[:, None], teacher_temp=0.04)
    assert len(terms) == 4 and got.item() == pytest.approx(expected, rel=1e-5)


def test_target_entropies_tell_learning_from_either_collapse():
    k = 8
    uniform = torch.full((2, 4, k), 1 / k)  # centring won: every target is uniform
    one_hot = torch.nn.functional.one_hot(torch.tensor([[3, 3, 3, 3]] * 2), k).float()  # sharpening won
    spread = torch.nn.functional.one_hot(torch.tensor([[0, 1, 2, 3]] * 2), k).float()  # each image its own target
    for q, (per_image, mean) in [(uniform, (math.log(k), math.log(k))), (one_hot, (0.0, 0.0)),
                                 (spread, (0.0, math.log(4)))]:
        got = target_entropies(q)
        assert got[0].item() == pytest.approx(per_image, abs=1e-5) and got[1].item() == pytest.approx(mean, abs=1e-5)
    loss_fn = DinoLoss(k)
    loss_fn.center.fill_(0.5)
    teacher = torch.randn(2, 4, k)
    assert torch.allclose(loss_fn.teacher_probs(teacher, 0.02), torch.softmax((teacher - 0.5) / 0.02, -1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("with_group", [False, True])
def test_centre_is_an_ema_of_the_teacher_batch_mean(with_group):
    if with_group:  # the all-reduce branch (a world of one: the sum of one rank)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        loss_fn = DinoLoss(2, center_momentum=0.9)
        teacher = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])  # [G=2, B=2, K=2], mean (4, 5)
        loss_fn.update_center(teacher)
        assert torch.allclose(loss_fn.center, torch.tensor([[0.4, 0.5]]))
        loss_fn.update_center(teacher)
        assert torch.allclose(loss_fn.center, torch.tensor([[0.4 * 0.9 + 0.4, 0.5 * 0.9 + 0.5]]))
    finally:
        if with_group:
            dist.destroy_process_group()


def test_training_loss_moves_the_centre_only_in_training_mode():
    model = tiny_dino()
    model.eval()
    model.training_loss(crops())
    assert model.loss.center.abs().sum() == 0
    model.train()
    model.training_loss(crops())
    assert model.loss.center.abs().sum() > 0


def test_ema_update_and_schedules():
    student, teacher = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = {n: 0.9 * p.detach() + 0.1 * dict(student.named_parameters())[n].detach()
                for n, p in teacher.named_parameters()}
    ema_update_(teacher, student, 0.9)
    assert all(torch.allclose(p, expected[n]) for n, p in teacher.named_parameters())
    assert cosine_schedule(0.996, 1.0, 0, 100) == pytest.approx(0.996)
    assert cosine_schedule(0.996, 1.0, 50, 100) == pytest.approx(0.998)
    assert cosine_schedule(0.996, 1.0, 100, 100) == pytest.approx(1.0)
    assert cosine_schedule(0.04, 0.4, 50, 100) == pytest.approx(0.22)
    assert [linear_warmup(0.04, 0.07, s, 4) for s in (0, 1, 3, 10)] == pytest.approx([0.04, 0.05, 0.07, 0.07])


def test_teacher_gets_no_gradient_and_follows_the_student_by_ema():
    model = tiny_dino()
    model.train()
    model.training_loss(crops()).backward()
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is not None for p in model.encoder.parameters()) and model.head.mlp[0].weight.grad is not None
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    before = model.teacher.encoder.model.cls_token.clone()
    model.update_teacher(0.75)
    after = model.teacher.encoder.model.cls_token
    assert torch.allclose(after, 0.75 * before + 0.25 * model.encoder.model.cls_token)


def test_head_last_layer_is_weight_normalised_with_norm_one():
    head = DinoHead(8, out_dim=5, hidden_dim=16, bottleneck_dim=4)
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(5))
    assert head.last_layer.weight_g is None and head(torch.randn(3, 8)).shape == (3, 5)
    assert DinoHead(8, 5, 16, 4, norm_last_layer=False).last_layer.weight_g.requires_grad


def test_last_layer_frozen_early_and_gradients_clipped_per_parameter():
    model = tiny_dino(freeze_last_layer_steps=1, clip_grad=0.01)
    model.train()
    (model.training_loss(crops()) * 1000).backward()
    model.on_before_optimizer_step(torch.optim.SGD(model.parameters(), lr=0.1))
    assert model.head.last_layer.weight_v.grad is None
    norms = [p.grad.norm().item() for p in model.parameters() if p.grad is not None]
    assert norms and max(norms) <= 0.01 * (1 + 1e-4)


def test_knn_on_hand_made_features():
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 2])
    query = torch.tensor([[0.6, 0.8]])  # similarities 0.6, 0.96, 0.8, -0.6
    votes = knn_classify(bank, labels, query, k=3, temperature=0.1, num_classes=3)
    expected = [math.exp(6.0) + math.exp(9.6), math.exp(8.0), 0.0]
    assert votes[0].tolist() == pytest.approx(expected, rel=1e-5)

    class Identity:
        device = torch.device("cpu")

        def knn_features(self, pixels):
            return pixels

    evaluator = KnnEvaluator(k=3, temperature=0.1)
    two = torch.stack([labels, torch.tensor([-1, 1, 0, 0])], dim=1)  # a second label set; -1: not in its bank
    evaluator.step(Identity(), LabelledImageBatch(bank, two, ["a", "b"], "bank"), "val")
    queries = torch.tensor([[0.6, 0.8], [-0.9, 0.1]])
    evaluator.step(Identity(), LabelledImageBatch(queries, torch.tensor([[1, 1], [2, 0]]), ["a", "b"], "query"), "val")
    metrics = evaluator.finish(Identity(), "val", ResultFiles(None, "val", 0))
    # set a: query 0 → class 0 (wrong), query 1 → nearest (-1, 0) is class 2 (right); set b: bank rows 1-3 only
    assert metrics["knn_top1_a"] == 0.5 and metrics["knn_top5_a"] == 1.0
    assert metrics["knn_top1_b"] == 1.0 and evaluator.main_metric == "knn_top1_a"
    assert set(metrics) == {f"{kind}_{name}" for kind in ("knn_top1", "knn_top5", "linear_top1") for name in "ab"}


def test_linear_probe_reads_a_direction_that_cosine_neighbours_miss():
    """The class is the sign of coordinate 0 (spread ±0.3) while 15 other coordinates carry noise of std 3: cosine
    k-NN sees mostly the noise, a linear classifier finds the direction; shuffled bank labels leave it at chance."""
    generator = torch.Generator().manual_seed(0)

    def features(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, 2, (n,), generator=generator)
        x = torch.randn(n, 16, generator=generator) * 3.0
        x[:, 0] = (labels * 2 - 1) * (0.3 + 0.05 * torch.rand(n, generator=generator))
        return x, labels

    (bank, labels), (queries, targets) = features(400), features(200)
    logits = linear_probe(bank, labels, queries, num_classes=2)
    assert logits.shape == (200, 2)
    linear = float((logits.argmax(1) == targets).float().mean())
    votes = knn_classify(F.normalize(bank, dim=-1), labels, F.normalize(queries, dim=-1), k=20, num_classes=2)
    knn = float((votes.argmax(1) == targets).float().mean())
    assert linear > 0.95 and knn < 0.7, (linear, knn)
    shuffled = labels[torch.randperm(400, generator=generator)]
    chance = float((linear_probe(bank, shuffled, queries, num_classes=2).argmax(1) == targets).float().mean())
    assert chance < 0.65, chance
    assert torch.equal(logits, linear_probe(bank, labels, queries, num_classes=2))  # deterministic


def test_exported_backbone_loads_strictly_into_timm_encoder_and_timm(tmp_path):
    model = tiny_dino()
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(torch.randn_like(p))
    path = model.export_backbone(tmp_path / "backbone.safetensors")
    loaded = TimmEncoder(**VIT, pretrained=str(path))
    pixels = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(loaded.eval()(pixels), model.teacher.encoder(pixels))
    plain = timm.create_model(VIT["name"], num_classes=0, img_size=32, **VIT["model_kwargs"])
    plain.load_state_dict(load_file(str(path)), strict=True)
    assert torch.allclose(plain.forward_features(pixels)[:, 0], model.knn_features(pixels))


def test_multicrop_transform_and_caption_labels(shapes_data):
    import webdataset as wds

    sample = next(iter(wds.WebDataset(str(shapes_data / "train" / "captions-00000.tar"), shardshuffle=False)))
    globals_, locals_ = MultiCropTransform(32, local_size=16, local_crops=3)(sample["jpg"])
    assert globals_.shape == (2, 3, 32, 32) and locals_.shape == (3, 3, 16, 16)
    assert MultiCropTransform(32, local_crops=0)(sample["jpg"])[1].shape == (0, 3, 96, 96)
    assert unique_word("two green triangles.", ("circle", "square", "triangle")) == 2
    assert unique_word("a red circle left of a blue square.", ("circle", "square", "triangle")) == -1
    rule = CaptionLabels({"colour": ("red", "green", "blue"), "shape": ("circle", "square", "triangle")})
    assert rule({"txt": b"a blue circle and a blue square."}) == [2, -1] and rule.names == ["colour", "shape"]


def test_tiny_config_fits_through_the_cli(shapes_data, tmp_path, monkeypatch):
    from mmlm.app.cli import main

    monkeypatch.setattr(sys, "argv", ["mmlm"])
    backbone = tmp_path / "backbone.safetensors"
    code = main(["fit", "--config", str(TINY_CONFIG), "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
                 "--trainer.limit_val_batches", "2", "--trainer.logger", "false", "--trainer.enable_progress_bar",
                 "false", "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(tmp_path),
                 "--data.init_args.batch_size", "8", "--data.init_args.local_crops", "2",
                 "--data.init_args.train_urls", str(shapes_data / "train" / "captions-*.tar"),
                 "--data.init_args.bank_urls", str(shapes_data / "train" / "captions-*.tar"),
                 "--data.init_args.val_urls", str(shapes_data / "val" / "captions-*.tar"),
                 "--model.init_args.backbone_file", str(backbone)])
    assert code == 0 and backbone.is_file()
    assert list(tmp_path.rglob("val-knn-step3.json"))


def test_optimizer_groups_decay_what_main_dino_decays():
    """``utils.get_params_groups``: biases and 1-d parameters undecayed, everything else (class token and position
    embeddings included, which timm exempts elsewhere) decayed; the teacher in neither group."""
    model = tiny_dino()
    decayed, undecayed = ({id(p) for p in group["params"]} for group in model.optimizer_groups())
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in decayed} == {n for n, p in model.named_parameters()
                                            if p.requires_grad and p.ndim > 1 and not n.endswith(".bias")}
    assert {"encoder.model.cls_token", "encoder.model.pos_embed"} <= {names[i] for i in decayed}
    assert {names[i] for i in undecayed} == {n for n, p in model.named_parameters()
                                              if p.requires_grad and (p.ndim == 1 or n.endswith(".bias"))}
    assert not any(names[i].startswith("teacher.") for i in decayed | undecayed)


class ReferenceHead(torch.nn.Module):
    """``main_dino.py``'s ``DINOHead`` (3 layers, no BN, ``norm_last_layer=True``) re-derived: an MLP, L2
    normalisation, then a weight-normalised bias-free linear layer whose norm ``g`` is fixed to 1."""

    def __init__(self, mlp: torch.nn.Sequential, prototypes: torch.Tensor) -> None:
        super().__init__()
        self.mlp = mlp
        last = torch.nn.Linear(prototypes.shape[1], prototypes.shape[0], bias=False)
        last.weight.data.copy_(prototypes)
        self.last_layer = torch.nn.utils.parametrizations.weight_norm(last)
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(torch.nn.functional.normalize(self.mlp(x), dim=-1, p=2))


def reference_dino_steps(backbone, head, batches, *, lr, min_lr, wd, wd_end, momentum, teacher_temp, clip,
                         freeze_last_layer, student_temp=0.1, center_momentum=0.9):
    """facebookresearch/dino ``train_one_epoch`` re-derived from ``main_dino.py`` and ``utils.py`` (one process, no
    warm-ups, one iteration per batch): schedules indexed by the global iteration, ``MultiCropWrapper`` (crops of one
    resolution batched together, the backbone's class token, one head call), ``DINOLoss`` (centre updated after the
    loss), ``clip_gradients`` then ``cancel_gradients_last_layer``, AdamW over ``get_params_groups``, then the EMA.
    Returns the student, the teacher and the centre."""
    import numpy as np

    def cosine(base, final, total):
        iters = np.arange(total)
        return final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))

    class Wrapper(torch.nn.Module):
        def __init__(self, backbone, head):
            super().__init__()
            self.backbone, self.head = backbone, head

        def forward(self, crops):
            sizes = torch.tensor([c.shape[-1] for c in crops])
            ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0)
            out, start = [], 0
            for end in ends.tolist():
                out.append(self.backbone.forward_features(torch.cat(crops[start:end]))[:, 0])
                start = end
            return self.head(torch.cat(out))

    student = Wrapper(backbone, head)
    teacher = copy.deepcopy(student)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    regularized = [p for n, p in student.named_parameters() if p.requires_grad and not (n.endswith(".bias")
                                                                                         or p.ndim == 1)]
    not_regularized = [p for n, p in student.named_parameters() if p.requires_grad and (n.endswith(".bias")
                                                                                          or p.ndim == 1)]
    optimizer = torch.optim.AdamW([{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}])
    total = len(batches)
    lr_schedule, wd_schedule = cosine(lr, min_lr, total), cosine(wd, wd_end, total)
    momentum_schedule = cosine(momentum, 1, total)
    center = torch.zeros(1, head.last_layer.weight.shape[0])
    for it, batch in enumerate(batches):
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = lr_schedule[it]
            if i == 0:
                group["weight_decay"] = wd_schedule[it]
        images = [*batch.global_crops.unbind(1), *batch.local_crops.unbind(1)]
        teacher_output = teacher(images[:2])
        student_output = student(images)
        student_out = (student_output / student_temp).chunk(len(images))
        teacher_out = torch.softmax((teacher_output - center) / teacher_temp, dim=-1).detach().chunk(2)
        terms = [torch.sum(-q * torch.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                 for iq, q in enumerate(teacher_out) for v in range(len(student_out)) if v != iq]
        loss = sum(terms) / len(terms)
        center = center * center_momentum + teacher_output.mean(0, keepdim=True) * (1 - center_momentum)
        optimizer.zero_grad()
        loss.backward()
        for p in student.parameters():
            if p.grad is not None:
                clip_coef = clip / (p.grad.norm(2) + 1e-6)
                if clip_coef < 1:
                    p.grad.mul_(clip_coef)
        if it < freeze_last_layer:
            for n, p in student.named_parameters():
                if "last_layer" in n:
                    p.grad = None
        optimizer.step()
        with torch.no_grad():
            for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                param_k.data.mul_(momentum_schedule[it]).add_((1 - momentum_schedule[it]) * param_q.detach().data)
    return student, teacher, center


def test_training_steps_equal_the_reference_dino_loop(tmp_path):
    """Three optimizer steps of ``Dino`` through Lightning equal three iterations of the reference loop: student,
    teacher and centre, with every schedule, the per-parameter clip and the frozen last layer acting."""
    import pytorch_lightning as pl

    settings = {"lr": 1e-3, "min_lr_ratio": 0.1, "weight_decay": 0.04, "weight_decay_end": 0.4,
                "momentum_teacher": 0.9, "teacher_temp": 0.04, "warmup_teacher_temp": 0.04, "clip_grad": 0.3,
                "freeze_last_layer_steps": 1}
    model = tiny_dino(warmup_steps=0, betas=(0.9, 0.999), **settings)
    initial = copy.deepcopy(model)
    reference_head = ReferenceHead(copy.deepcopy(model.head.mlp), model.head.last_layer.weight_v.detach().clone())
    reference_backbone = copy.deepcopy(model.encoder.model)
    torch.manual_seed(1)
    batches = [MultiCropBatch(torch.randn(4, 2, 3, 32, 32), torch.randn(4, 3, 3, 16, 16)) for _ in range(3)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=loader)

    student, teacher, center = reference_dino_steps(
        reference_backbone, reference_head, batches, lr=1e-3, min_lr=1e-4, wd=0.04, wd_end=0.4, momentum=0.9,
        teacher_temp=0.04, clip=0.3, freeze_last_layer=1)
    assert torch.allclose(model.loss.center, center, atol=1e-5)
    for ours, theirs in ((model.encoder.model, student.backbone), (model.teacher.encoder.model, teacher.backbone),
                         (model.head.mlp, student.head.mlp), (model.teacher.head.mlp, teacher.head.mlp)):
        theirs = dict(theirs.named_parameters())
        for name, param in ours.named_parameters():
            assert torch.allclose(param, theirs[name], atol=1e-5), name
    for ours, theirs in ((model.head, student.head), (model.teacher.head, teacher.head)):
        assert torch.allclose(ours.last_layer.weight, theirs.last_layer.weight, atol=1e-5)
    assert not torch.allclose(model.encoder.model.cls_token, initial.encoder.model.cls_token)  # it trained


@pytest.mark.parametrize("change", [{"clip": 1e9}, {"freeze_last_layer": 0}, {"wd_end": 0.04}, {"momentum": 0.95},
                                    {"teacher_temp": 0.05}, {"min_lr": 1e-3}])
def test_the_reference_comparison_sees_each_setting(change, tmp_path):
    """The equality above is not vacuous: the reference loop with any one setting changed ends elsewhere."""
    settings = {"lr": 1e-3, "min_lr": 1e-4, "wd": 0.04, "wd_end": 0.4, "momentum": 0.9, "teacher_temp": 0.04,
                "clip": 0.3, "freeze_last_layer": 1}
    model = tiny_dino()
    torch.manual_seed(1)
    batches = [MultiCropBatch(torch.randn(4, 2, 3, 32, 32), torch.randn(4, 3, 3, 16, 16)) for _ in range(3)]
    runs = []
    for overrides in ({}, change):
        head = ReferenceHead(copy.deepcopy(model.head.mlp), model.head.last_layer.weight_v.detach().clone())
        runs.append(reference_dino_steps(copy.deepcopy(model.encoder.model), head, batches,
                                         **{**settings, **overrides}))
    (student_a, teacher_a, _), (student_b, teacher_b, _) = runs
    differs = [not torch.allclose(a, b, atol=1e-5) for a, b in zip(
        [*student_a.parameters(), *teacher_a.parameters()], [*student_b.parameters(), *teacher_b.parameters()])]
    assert any(differs)


def test_linear_probe_equals_scikit_learns_logistic_regression():
    """The reference: scikit-learn's multinomial ``LogisticRegression`` (lbfgs) on the same standardised features.
    Its objective ``½‖W‖² + C Σ CE`` equals ours, ``mean CE + wd ‖W‖²``, at ``C = 1 / (2 wd N)``; the bias is not
    penalised in either. Class probabilities agree to 1e-3."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    generator = torch.Generator().manual_seed(1)
    bank, labels = torch.randn(300, 8, generator=generator), torch.randint(0, 3, (300,), generator=generator)
    bank[:, 0] += labels.float()
    queries, weight_decay = torch.randn(50, 8, generator=generator), 1e-2
    mean, std = bank.mean(0), bank.std(0, unbiased=False)
    reference = sklearn.LogisticRegression(C=1 / (2 * weight_decay * 300), max_iter=5000, tol=1e-10)
    reference.fit(((bank - mean) / std).numpy(), labels.numpy())
    expected = torch.from_numpy(reference.predict_proba(((queries - mean) / std).numpy())).float()
    ours = linear_probe(bank, labels, queries, 3, weight_decay=weight_decay, max_iter=500).softmax(1)
    assert torch.allclose(ours, expected, atol=1e-3), (ours - expected).abs().max()
