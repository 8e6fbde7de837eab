"""Self-distillation parts (DINO, Caron et al. 2021): projection head, loss with centring and sharpening, schedules,
the teacher's EMA update, per-parameter gradient clipping, and the batches the multi-crop pipeline yields.

Shape legend: B batch, V views (crops), K head outputs (prototypes), D width, L label sets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mmlm.batch import MovesTensors


@dataclass
class MultiCropBatch(MovesTensors):
    """Multi-crop views of ``B`` images: ``global_crops [B, G, 3, H, W]`` (the teacher's views, G = 2 in DINO) and
    ``local_crops [B, L, 3, h, w]`` (student only; ``L`` may be 0); sample ``keys``."""

    global_crops: Tensor
    local_crops: Tensor
    keys: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.global_crops.shape[0]

    @property
    def attention_mask(self) -> Tensor:
        """``[B, 0]``: no text tokens (the shared tokens/s logging reads 0)."""
        return self.global_crops.new_zeros(len(self), 0)


@dataclass
class LabelledImageBatch(MovesTensors):
    """Evaluation images with labels for k-NN: ``pixels [B, 3, H, W]``, ``labels [B, L]`` (``-1``: no label of that
    set), ``label_names`` (L names), ``role`` (``"bank"``: the labelled memory, ``"query"``: the images classified)."""

    pixels: Tensor
    labels: Tensor
    label_names: list[str]
    role: str
    keys: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.pixels.shape[0]

    @property
    def attention_mask(self) -> Tensor:
        return self.pixels.new_zeros(len(self), 0)


class NormalizedLinear(nn.Module):
    """A bias-free linear layer with weight normalisation ``W = g · V / ‖V‖`` (rows): ``[..., D] → [..., K]``.

    ``learn_norm=False`` fixes ``g`` to 1 (DINO's ``norm_last_layer=True``: the layer is a cosine classifier); with
    ``True`` the per-row ``g`` starts at 1 and trains (``torch.nn.utils.weight_norm`` with ``weight_g`` filled with 1).
    """

    def __init__(self, in_dim: int, out_dim: int, learn_norm: bool = False) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1)) if learn_norm else None

    @property
    def weight(self) -> Tensor:
        weight = self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return weight if self.weight_g is None else weight * self.weight_g

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class DinoHead(nn.Module):
    """DINO's projection head: MLP (``num_layers`` linear layers, GELU between) → bottleneck → L2 normalisation →
    :class:`NormalizedLinear` to ``out_dim`` prototypes. ``[B, D] → [B, K]``.

    Args:
        in_dim: backbone width ``D``.
        out_dim: ``K`` (65536 in the paper).
        hidden_dim: MLP width (2048).
        bottleneck_dim: width before the last layer (256).
        num_layers: linear layers of the MLP (3).
        norm_last_layer: fix the last layer's weight norm to 1 (more stable for ViT-S).
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, norm_last_layer: bool = True) -> None:
        super().__init__()
        widths = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers += [nn.Linear(a, b)] + ([nn.GELU()] if i < num_layers - 1 else [])
        self.mlp = nn.Sequential(*layers)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = NormalizedLinear(bottleneck_dim, out_dim, learn_norm=not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class DinoLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher distribution of each global view and the student's
    distribution of every other view, averaged over the ``G·V - G`` pairs (DINO's ``DINOLoss``).

    The centre is a persistent buffer ``[1, K]`` (saved in checkpoints), updated by :meth:`update_center` with an EMA
    of the teacher's batch mean, all-reduced over ranks when a process group is initialised.

    Args:
        out_dim: ``K``.
        student_temp: student softmax temperature (0.1).
        center_momentum: EMA momentum of the centre (0.9).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student: Tensor, teacher: Tensor, teacher_temp: float) -> Tensor:
        """``student [V, B, K]`` logits of every view (the G global views first), ``teacher [G, B, K]`` → scalar."""
        log_p = F.log_softmax(student.float() / self.student_temp, dim=-1)
        q = self.teacher_probs(teacher, teacher_temp)
        terms = [(-q[t] * log_p[v]).sum(-1).mean() for t in range(q.shape[0]) for v in range(log_p.shape[0]) if v != t]
        return torch.stack(terms).mean()

    @torch.no_grad()
    def teacher_probs(self, teacher: Tensor, teacher_temp: float) -> Tensor:
        """Centred, sharpened teacher targets: ``softmax((teacher − centre)/τ_t)``, ``[..., K]`` → ``[..., K]``."""
        return F.softmax((teacher.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher: Tensor) -> None:
        """EMA of the centre towards the mean of ``teacher [..., K]`` over this step's rows on every rank."""
        rows = teacher.reshape(-1, teacher.shape[-1]).float()
        total = rows.sum(0, keepdim=True)
        count = torch.tensor([float(rows.shape[0])], device=rows.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(total / count, alpha=1 - self.center_momentum)


@torch.no_grad()
def target_entropies(q: Tensor) -> tuple[Tensor, Tensor]:
    """Collapse monitor of teacher targets ``q [..., K]`` (rows sum to 1): the mean entropy of one row and the
    entropy of the mean row, in nats.

    Learning: the first low (each image its own sharp target), the second high (images spread over prototypes).
    Uniform collapse (centring wins): both reach ``ln K``. One-prototype collapse (sharpening wins): both reach 0.
    """
    rows = q.reshape(-1, q.shape[-1]).float()
    per_row = -(rows * rows.clamp_min(1e-12).log()).sum(-1).mean()
    mean = rows.mean(0)
    return per_row, -(mean * mean.clamp_min(1e-12).log()).sum()


def cosine_schedule(start: float, end: float, step: int, total: int) -> float:
    """``end + (start - end)·(1 + cos(π·step/total))/2``: ``start`` at step 0, ``end`` at ``total`` (DINO's
    ``cosine_scheduler`` without warm-up); steps past ``total`` stay at ``end``."""
    progress = min(1.0, max(0, step) / max(1, total))
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def linear_warmup(start: float, end: float, step: int, steps: int) -> float:
    """Linear from ``start`` (step 0) to ``end`` (step ``steps - 1``), then ``end`` (DINO's teacher temperature)."""
    if step >= steps - 1 or steps <= 1:
        return end
    return start + (end - start) * step / (steps - 1)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher ← momentum·teacher + (1 - momentum)·student``, parameter by parameter (matched by name).

    Raises:
        KeyError: the two modules do not have the same parameter names.
    """
    student_params = dict(student.named_parameters())
    for name, param in teacher.named_parameters():
        param.mul_(momentum).add_(student_params[name].detach().to(param.dtype), alpha=1 - momentum)


@torch.no_grad()
def clip_per_parameter_(parameters: list[nn.Parameter], max_norm: float) -> None:
    """Scale each gradient whose own L2 norm exceeds ``max_norm`` down to it (DINO's ``clip_gradients``: per
    parameter, not one global norm)."""
    for param in parameters:
        if param.grad is not None:
            param.grad.mul_((max_norm / (param.grad.norm() + 1e-6)).clamp(max=1.0))
