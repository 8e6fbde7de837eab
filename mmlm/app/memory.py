"""``mmlm memory --config C [--gpu-memory 24GB] [--batch-size N] [--seq-len T] [--json]``: what fits before you rent
the GPU.

* **Weights, gradients, optimizer state** are exact, per direct child of the model, from the model built on the meta
  device (no weights read: a Hugging Face part named by ``name_or_path`` is built from its ``config.json``; a part that
  cannot be built there is named in one line and the model is built on the CPU instead). Gradients: one tensor per
  trainable parameter in its dtype. AdamW state: ``exp_avg`` and ``exp_avg_sq`` are ``zeros_like(param)`` (2 × 4 bytes
  per fp32 parameter, as ``torch.optim.AdamW`` allocates them). Under Lightning's ``bf16-mixed``/``16-mixed`` the
  parameters stay in their own dtype (fp32: they are the master weights), so no copy is added; ``--master-weights``
  adds 4 bytes per trainable non-fp32 parameter (strategies that keep fp32 masters of half-precision parameters).
* **Activations** are measured: one training step (forward, backward, AdamW step) of random inputs shaped like the
  config's data at two small batch sizes, on this machine (CPU: ``torch.profiler`` memory events, the running sum of
  tensor allocations; CUDA: ``torch.cuda.max_memory_allocated``), and scaled linearly to ``--batch-size`` and, for the
  language model's share, to the sentence length. Supported families: the generative prefix families (Frozen,
  BLIP-2); others say so.
* **Total** = weights + optimizer state + max(gradients + activations, gradients + the optimizer step's temporaries):
  the steady-state peak (the optimizer state lives through every later step; gradients are set to ``None`` before each
  forward, as Lightning does). The CUDA context and allocator fragmentation are not included.
* **Knobs** when the total does not fit ``--gpu-memory``, each with its predicted total: LoRA, a 4-bit LM, activation
  checkpointing, a smaller batch with gradient accumulation, cached encoder features, FSDP over N GPUs.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

GIB = 1024**3
#: Bytes per parameter of a 4-bit (NF4) weight; quantisation constants (~0.5 % with double quantisation) left out.
INT4_BYTES = 0.5
PROBE_BATCHES = (2, 4)
PROBE_TEXT_TOKENS = 16
FSDP_SIZES = (2, 4, 8, 16, 32, 64)
ASSUMPTIONS = (
    "AdamW state: exp_avg + exp_avg_sq = zeros_like(param) per trainable parameter (fp32 param: 8 bytes)",
    "mixed precision (bf16-mixed/16-mixed) keeps parameters in their own dtype: fp32 params are the master weights",
    "activations: measured by one training step at small batches on this machine, linear in batch size; the "
    "language model's share linear in sentence length",
    "total = weights + optimizer + max(grads + activations, grads + optimizer-step temporaries); CUDA context and "
    "fragmentation not included",
)


@dataclass
class PartMemory:
    """Memory of one direct child of the model (bytes)."""

    name: str
    params: int
    trainable: int
    dtype: str
    weights: int
    grads: int
    optimizer: int

    @property
    def status(self) -> str:
        if self.trainable == self.params:
            return "trainable"
        return "frozen" if self.trainable == 0 else f"partly ({self.trainable:,} trainable)"


@dataclass
class Probe:
    """Measured peaks of one training step above the static memory (weights + optimizer state), bytes.

    Attributes:
        slope, intercept: gradients + activations at batch ``b`` ≈ ``intercept + slope * b`` (forward + backward).
        cached_slope, cached_intercept: the same with cached encoder features (``None``: not measured).
        step_peak: peak of the optimizer step above static memory (gradients + its temporaries).
        text_tokens, image_tokens: the probe's text length and image placeholders per sentence.
        device: where it ran.
    """

    slope: float
    intercept: float
    cached_slope: float | None
    cached_intercept: float | None
    step_peak: float
    text_tokens: int
    image_tokens: int
    device: str


@dataclass
class Estimate:
    """The predicted peak of one training step and its parts (bytes)."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    step_temporaries: float

    @property
    def total(self) -> float:
        return self.weights + self.optimizer + self.grads + max(self.activations, self.step_temporaries)


@dataclass
class Report:
    """What ``mmlm memory`` prints (``--json``: this as a dict)."""

    config: str
    batch_size: int
    seq_len: int
    budget: float | None
    parts: list[PartMemory]
    estimate: Estimate | None
    knobs: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    assumptions: tuple[str, ...] = ASSUMPTIONS

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["parts"] = [{**asdict(p), "status": p.status} for p in self.parts]
        if self.estimate is not None:
            out["estimate"]["total"] = self.estimate.total
        out["fits"] = None if self.budget is None or self.estimate is None else self.estimate.total <= self.budget
        return out


# --- sizes -----------------------------------------------------------------------------------------------------
def parse_size(text: str) -> float:
    """``"24GB"``, ``"80GiB"``, ``"512MB"``, ``"24"`` (GiB) → bytes (GB and GiB both 1024³: what GPU sizes mean)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not match:
        raise ValueError(f"--gpu-memory {text!r}: expected a size such as 24GB, 80GiB or 512MB")
    scale = {"": GIB, "k": 1024, "m": 1024**2, "g": GIB, "t": 1024**4}[match.group(2)]
    return float(match.group(1)) * scale


def human(nbytes: float) -> str:
    """Bytes as KiB/MiB/GiB with 2 decimals."""
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes:.0f} B"


def part_memory(name: str, module: nn.Module, seen: set[int], master_weights: bool) -> PartMemory | None:
    """Exact weights / gradients / AdamW-state bytes of ``module``'s parameters not in ``seen`` (tied weights once)."""
    params = [p for p in module.parameters() if id(p) not in seen]
    seen.update(id(p) for p in params)
    if not params:
        return None
    trainable = [p for p in params if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    masters = sum(4 * p.numel() for p in trainable if p.dtype != torch.float32) if master_weights else 0
    return PartMemory(name=name, params=sum(p.numel() for p in params), trainable=sum(p.numel() for p in trainable),
                      dtype="/".join(sorted({str(p.dtype).removeprefix("torch.") for p in params})),
                      weights=sum(p.numel() * p.element_size() for p in params), grads=grads,
                      optimizer=2 * grads + masters)


def model_parts(model: nn.Module, master_weights: bool = False) -> list[PartMemory]:
    """One :class:`PartMemory` per direct child with parameters (and ``(own)`` for the model's own parameters)."""
    seen: set[int] = set()
    parts = [part_memory(name, child, seen, master_weights) for name, child in model.named_children()]
    parts.append(part_memory("(own)", model, seen, master_weights))
    return [p for p in parts if p is not None]


# --- building ---------------------------------------------------------------------------------------------------
def dtype_name(dtype: Any) -> str | None:
    """A transformers config's dtype as an mmlm ``dtype`` string (``None`` when unset)."""
    text = str(dtype).removeprefix("torch.") if dtype is not None else None
    return text if text in ("float32", "float16", "bfloat16") else None


def offline_section(section: Any) -> Any:
    """A ``model:`` config section whose Hugging Face parts (``init_args.name_or_path``) become their ``config.json``
    (``config:``, the checkpoint's dtype, no quantization) and timm parts ``pretrained: false``: built without reading
    any weights. Raises ``OSError``/``ValueError`` when a config cannot be read here."""
    if isinstance(section, list):
        return [offline_section(item) for item in section]
    if not isinstance(section, dict):
        return section
    out = {key: offline_section(value) for key, value in section.items()}
    args = out.get("init_args")
    if isinstance(args, dict) and args.get("name_or_path") and "class_path" in out \
            and not str(out["class_path"]).endswith(".from_hf"):
        from transformers import AutoConfig

        from mmlm.hub import config_kwargs, require_local

        require_local(args["name_or_path"], f"{out['class_path']} name_or_path")
        config = AutoConfig.from_pretrained(args["name_or_path"])
        dtype = args.get("dtype") or dtype_name(getattr(config, "dtype", None))
        out["init_args"] = {**args, "name_or_path": None, "config": config_kwargs(config), "quantization": None,
                            "dtype": dtype}
    if isinstance(args, dict) and args.get("pretrained") is True:
        out["init_args"] = {**out["init_args"], "pretrained": False}
    return out


def write_offline_config(config: str | Path, directory: Path) -> Path:
    """``config`` with its model section made offline (:func:`offline_section`), written under ``directory``."""
    section = yaml.safe_load(Path(config).read_text()) or {}
    section["model"] = offline_section(section.get("model"))
    path = directory / "offline.yaml"
    path.write_text(yaml.safe_dump(section, sort_keys=False))
    return path


def build(config: str | Path, device: str) -> nn.Module:
    """The config's model (``mmlm.app.features.load_model``, seeded as ``fit`` is) built on ``device``."""
    from mmlm.app.features import load_model

    with torch.device(device):
        return load_model(config)


def first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and "Union subtypes" not in line]
    errors = [line.lstrip("- ") for line in lines if line.startswith("- ") and "NoneType" not in line]
    return f"{type(err).__name__}: {(errors or lines or [''])[0]}"


# --- synthetic batches and measuring -------------------------------------------------------------------------------
def supported(model: nn.Module) -> str | None:
    """``None`` when the activation probe knows the family's inputs, else why not."""
    from mmlm.models import Blip2, Frozen

    if isinstance(model, (Frozen, Blip2)):
        return None
    return (f"activation memory of {type(model).__name__} is not supported yet (the probe synthesises batches of the "
            "generative prefix families: Frozen, BLIP-2); weights, gradients and optimizer state above are exact")


def synthetic_batch(model: nn.Module, batch_size: int, text_tokens: int, seed: int = 0) -> Any:
    """Random inputs like the family's data: ``pixels [B, 3, H, W]`` of the encoder's size, ``text_tokens`` ids (half
    prompt, half target) → the :class:`~mmlm.batch.SentenceBatch` of its datamodule (image placeholders prepended)."""
    from datamodules.pipeline.prefix_sentences import to_sentences
    from mmlm.batch import Batch

    spec = model.data_spec()
    generator = torch.Generator().manual_seed(seed)
    height, width = spec.image_preprocess.size
    vocab = min(len(spec.tokenizer), model.language_model.vocab_size)
    special = set(model.placeholder_ids.values()) if isinstance(model.placeholder_ids, dict) else set()
    ids = torch.randint(0, vocab, (batch_size, text_tokens), generator=generator)
    for value in special:  # no placeholder outside the image span
        ids[ids == value] = 0 if value != 0 else 1
    prompt = text_tokens // 2
    labels = ids.clone()
    labels[:, :prompt] = -100
    mask = torch.ones_like(ids)
    batch = Batch(pixels=torch.randn(batch_size, 3, height, width, generator=generator), input_ids=ids,
                  attention_mask=mask, labels=labels, prompt_ids=ids[:, :prompt].clone(),
                  prompt_mask=mask[:, :prompt].clone(), keys=[str(i) for i in range(batch_size)])
    return to_sentences(batch, spec.markers[0], spec.tokenizer)


def with_features(model: nn.Module, batch: Any) -> Any:
    """``batch`` with the encoder's features in place of its pixels (as ``mmlm data cache-features`` gives them)."""
    with torch.no_grad():
        features = model.encoder(batch.images).detach()
    return replace(batch, features=features, images=batch.images.new_empty(len(batch), 0))


def measure(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """Run ``fn``; returns (peak, end) of memory allocated while it ran, relative to the start, in bytes. CUDA:
    ``max_memory_allocated``; CPU: the running sum of the profiler's allocation and free events (tensors allocated
    before are not counted, and freeing them is not seen)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start, torch.cuda.memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return float(peak), float(running)


def autocast(precision: str | None, device: torch.device) -> Any:
    """The trainer's mixed precision as an autocast context (none for full or ``*-true`` precision)."""
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type,
                                                                                             enabled=False)


def optimizer_of(model: nn.Module) -> torch.optim.Optimizer:
    """The family's AdamW (its ``optimizer_groups()``, as in training), at a negligible learning rate."""
    return torch.optim.AdamW(model.optimizer_groups(), lr=1e-12, betas=getattr(model, "betas", (0.9, 0.999)))


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, precision: str | None,
                  device: torch.device) -> tuple[float, float]:
    """One steady-state step (gradients set to ``None`` first, so the optimizer state exists from an earlier step);
    returns (forward+backward peak, optimizer-step peak) above the memory live before it."""
    optimizer.zero_grad(set_to_none=True)

    def forward_backward() -> None:
        with autocast(precision, device):
            loss = model.training_loss(batch)
        loss.backward()

    peak, grads = measure(forward_backward, device)
    step_peak, _ = measure(optimizer.step, device)
    optimizer.zero_grad(set_to_none=True)
    return peak, grads + step_peak


def prepared(model: nn.Module, device: torch.device, precision: str | None) -> torch.optim.Optimizer:
    """``model`` in training mode on ``device`` with an AdamW whose state exists (one warm-up step)."""
    model.to(device).train()
    optimizer = optimizer_of(model)
    training_step(model, optimizer, synthetic_batch(model, 1, PROBE_TEXT_TOKENS).to(device), precision, device)
    return optimizer


def line_fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(slope, intercept) through the first and last point."""
    (b0, y0), (b1, y1) = points[0], points[-1]
    slope = (y1 - y0) / (b1 - b0)
    return slope, y0 - slope * b0


def probe(model: nn.Module, device: torch.device, precision: str | None,
          batches: Sequence[int] = PROBE_BATCHES, text_tokens: int = PROBE_TEXT_TOKENS) -> Probe:
    """Measure steady-state training steps at ``batches`` (with pixels, and with cached features when the model has
    an encoder) and fit them linearly in the batch size."""
    optimizer = prepared(model, device, precision)
    full, cached, steps = [], [], []
    has_encoder = isinstance(getattr(model, "encoder", None), nn.Module)
    for b in batches:
        batch = synthetic_batch(model, b, text_tokens).to(device)
        peak, step = training_step(model, optimizer, batch, precision, device)
        full.append((b, peak))
        steps.append(step)
        if has_encoder:
            cached.append((b, training_step(model, optimizer, with_features(model, batch), precision, device)[0]))
    slope, intercept = line_fit(full)
    cached_slope, cached_intercept = line_fit(cached) if cached else (None, None)
    return Probe(slope=slope, intercept=intercept, cached_slope=cached_slope, cached_intercept=cached_intercept,
                 step_peak=max(steps), text_tokens=text_tokens, image_tokens=model.data_spec().markers[0].count,
                 device=str(device))


# --- predictions ----------------------------------------------------------------------------------------------------
def sum_parts(parts: list[PartMemory], key: str, skip: Sequence[str] = ()) -> float:
    return float(sum(getattr(p, key) for p in parts if p.name not in skip))


def activations(result: Probe, batch_size: int, seq_len: int, cached: bool = False) -> tuple[float, float]:
    """(gradients + activations at ``batch_size`` and text length ``seq_len``, the language model's share of it):
    the per-sample growth without the encoder (the cached-features probe) scales with the sentence length."""
    scale = (result.image_tokens + seq_len) / (result.image_tokens + result.text_tokens)
    lm_slope = result.cached_slope if result.cached_slope is not None else result.slope
    encoder_slope = 0.0 if cached else result.slope - lm_slope
    intercept = result.cached_intercept if cached and result.cached_intercept is not None else result.intercept
    lm = batch_size * lm_slope * scale
    return intercept + batch_size * encoder_slope + lm, lm


def estimate(parts: list[PartMemory], result: Probe | None, batch_size: int, seq_len: int) -> Estimate:
    """The predicted steady-state peak of a training step at ``batch_size`` × ``seq_len``."""
    grads = sum_parts(parts, "grads")
    weights, optimizer = sum_parts(parts, "weights"), sum_parts(parts, "optimizer")
    if result is None:
        return Estimate(weights, grads, optimizer, 0.0, 0.0)
    live, _ = activations(result, batch_size, seq_len)
    return Estimate(weights, grads, optimizer, max(live - grads, 0.0), max(result.step_peak - grads, 0.0))


def lora_params(model: nn.Module, rank: int = 8) -> int:
    """Parameters of rank-``rank`` LoRA adapters on the language model's attention projections (``A``: r×in,
    ``B``: out×r per adapted layer)."""
    lm = getattr(model, "language_model", None)
    try:
        root, targets = lm.lora_root(), lm.lora_targets()
    except (AttributeError, ValueError, NotImplementedError):
        return 0
    total = 0
    for name, module in root.named_modules():
        weight = getattr(module, "weight", None)
        if any(name == t or name.endswith(f".{t}") for t in targets) and weight is not None and weight.ndim == 2:
            total += rank * sum(weight.shape)
    return total


def lm_blocks(model: nn.Module) -> int:
    """Blocks of the language model that activation checkpointing would recompute (0: none found)."""
    from mmlm.language.recompute import hf_blocks

    lm = getattr(model, "language_model", None)
    inner = getattr(lm, "model", None)
    try:
        return len(hf_blocks(inner)) if isinstance(inner, nn.Module) else len(getattr(lm, "layers", []))
    except ValueError:
        return 0


def knobs(model: nn.Module, parts: list[PartMemory], result: Probe, batch_size: int, seq_len: int,
          budget: float) -> list[dict[str, Any]]:
    """Each knob's predicted total (``fits`` against ``budget``); the ones that do not apply say why."""
    base = estimate(parts, result, batch_size, seq_len)
    by_name = {p.name: p for p in parts}
    out = [lora_knob(model, by_name, base), int4_knob(model, by_name, base),
           checkpointing_knob(model, result, base, batch_size, seq_len),
           accumulation_knob(parts, result, batch_size, seq_len, budget),
           cached_knob(by_name, parts, result, batch_size, seq_len), fsdp_knob(base, budget)]
    return [{**k, "fits": k.get("total") is not None and k["total"] <= budget} for k in out]


def without_training(base: Estimate, part: PartMemory, adapters: int, weights: float | None = None) -> Estimate:
    """``base`` with ``part``'s gradients and optimizer state replaced by fp32 adapters' (and its weights changed)."""
    grads = base.grads - part.grads + 4 * adapters
    step = base.step_temporaries * (grads / base.grads) if base.grads else 0.0
    return replace(base, grads=grads, optimizer=base.optimizer - part.optimizer + 8 * adapters,
                   step_temporaries=step, weights=base.weights if weights is None else weights)


def lora_knob(model: nn.Module, parts: dict[str, PartMemory], base: Estimate) -> dict[str, Any]:
    lm, adapters = parts.get("language_model"), lora_params(model)
    name = "LoRA r=8 on the LM's attention projections"
    if lm is None or lm.trainable == 0:
        return {"knob": name, "total": None, "detail": "the language model is not trained: nothing to save"}
    total = without_training(base, lm, adapters).total
    return {"knob": name, "total": total, "detail": f"LM trainable parameters {lm.trainable:,} → {adapters:,} (adapters)"}


def int4_knob(model: nn.Module, parts: dict[str, PartMemory], base: Estimate) -> dict[str, Any]:
    lm = parts.get("language_model")
    name = "4-bit LM (quantization: 4bit, frozen; with LoRA when it was trained)"
    if lm is None:
        return {"knob": name, "total": None, "detail": "no language_model part"}
    weights = base.weights - lm.weights + INT4_BYTES * lm.params
    adapters = lora_params(model) if lm.trainable else 0
    total = without_training(base, lm, adapters, weights).total
    return {"knob": name, "total": total, "detail": f"LM weights {human(lm.weights)} → {human(INT4_BYTES * lm.params)} "
                                                    "(0.5 byte/param, quantisation constants left out)"}


def checkpointing_knob(model: nn.Module, result: Probe, base: Estimate, batch_size: int,
                       seq_len: int) -> dict[str, Any]:
    blocks = lm_blocks(model)
    name = "activation checkpointing of the LM (grad_checkpointing: true)"
    if blocks == 0:
        return {"knob": name, "total": None, "detail": "no LM blocks found"}
    _, lm_share = activations(result, batch_size, seq_len)
    saved = min(lm_share * (1 - 1 / blocks), base.activations)
    total = replace(base, activations=base.activations - saved).total
    return {"knob": name, "total": total, "detail": f"approximation: the LM's activations ÷ {blocks} blocks"}


def accumulation_knob(parts: list[PartMemory], result: Probe, batch_size: int, seq_len: int,
                      budget: float) -> dict[str, Any]:
    name = "smaller batch + gradient accumulation"
    for b in range(batch_size - 1, 0, -1):
        total = estimate(parts, result, b, seq_len).total
        if total <= budget:
            steps = math.ceil(batch_size / b)
            return {"knob": name, "total": total, "batch_size": b, "accumulate_grad_batches": steps,
                    "detail": f"batch_size {b} × accumulate_grad_batches {steps} (effective batch {b * steps})"}
    return {"knob": name, "total": estimate(parts, result, 1, seq_len).total, "batch_size": 1,
            "detail": "even batch size 1 does not fit"}


def cached_knob(by_name: dict[str, PartMemory], parts: list[PartMemory], result: Probe, batch_size: int,
                seq_len: int) -> dict[str, Any]:
    name = "cached encoder features (mmlm data cache-features; the encoder frozen, not loaded)"
    if "encoder" not in by_name or result.cached_slope is None:
        return {"knob": name, "total": None, "detail": "no encoder part"}
    rest = [p for p in parts if p.name != "encoder"]
    live, _ = activations(result, batch_size, seq_len, cached=True)
    grads = sum_parts(rest, "grads")
    est = Estimate(sum_parts(rest, "weights"), grads, sum_parts(rest, "optimizer"), max(live - grads, 0.0),
                   max(result.step_peak - sum_parts(parts, "grads"), 0.0) * (grads / max(sum_parts(parts, "grads"), 1)))
    detail = "encoder weights, gradients, optimizer state and activations gone"
    if by_name["encoder"].trainable:
        detail += " (the encoder is trained in this config: caching freezes it)"
    return {"knob": name, "total": est.total, "detail": detail}


def fsdp_knob(base: Estimate, budget: float) -> dict[str, Any]:
    name = "FSDP (weights, gradients, optimizer state sharded over N GPUs; same per-GPU batch)"
    for n in FSDP_SIZES:
        total = replace(base, weights=base.weights / n, grads=base.grads / n, optimizer=base.optimizer / n,
                        step_temporaries=base.step_temporaries / n).total
        if total <= budget or n == FSDP_SIZES[-1]:
            return {"knob": name, "total": total, "gpus": n, "detail": f"N = {n}"}
    raise AssertionError("unreachable")


# --- the command ----------------------------------------------------------------------------------------------------
def config_defaults(config: str | Path) -> tuple[int, int, str | None]:
    """(batch size, text tokens, trainer precision) the config's data and trainer sections give."""
    section = yaml.safe_load(Path(config).read_text()) or {}
    data = (section.get("data") or {}).get("init_args") or {}
    trainer = section.get("trainer") or {}
    return (int(data.get("batch_size", 32)), int(data.get("max_text_tokens", data.get("max_tokens", 48))),
            trainer.get("precision"))


def build_for_memory(config: str | Path, notes: list[str], workdir: Path) -> tuple[nn.Module, Path]:
    """The model on the meta device from the offline config (no weights read); when that fails, one line saying so
    and the model built on the CPU from the config as given. Returns it and the config to build a probe from."""
    try:
        offline = write_offline_config(config, workdir)
        return build(offline, "meta"), offline
    except Exception as err:  # noqa: BLE001 - any failure: say it in one line, then try the plain build
        notes.append(f"not built on the meta device ({first_line(err)}); built on the CPU instead (weights read)")
    return build(config, "cpu"), Path(config)


def run(args: argparse.Namespace, workdir: Path) -> Report:
    """Build, measure and predict (the command without its printing)."""
    batch_default, tokens_default, precision = config_defaults(args.config)
    batch_size, seq_len = args.batch_size or batch_default, args.seq_len or tokens_default
    budget = parse_size(args.gpu_memory) if args.gpu_memory else None
    notes: list[str] = []
    model, probe_config = build_for_memory(args.config, notes, workdir)
    parts = model_parts(model, args.master_weights)
    report = Report(str(args.config), batch_size, seq_len, budget, parts, None, notes=notes)
    reason = supported(model)
    if reason is not None or args.no_probe:
        notes.append(reason or "--no-probe: activations not measured")
        report.estimate = estimate(parts, None, batch_size, seq_len)
        return report
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    real = model if next(model.parameters()).device.type != "meta" else build(probe_config, "cpu")
    result = probe(real, device, precision)
    notes.append(f"activations measured on {device} at batch sizes {PROBE_BATCHES}, {PROBE_TEXT_TOKENS} text tokens"
                 + (f", autocast {precision}" if precision in ("bf16-mixed", "16-mixed") else ""))
    report.estimate = estimate(parts, result, batch_size, seq_len)
    if budget is not None and report.estimate.total > budget:
        report.knobs = knobs(real, parts, result, batch_size, seq_len, budget)
    return report


def print_report(report: Report) -> None:
    """Rich tables: the parts, the total against the budget, the knobs."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"mmlm memory: {report.config} (batch {report.batch_size}, {report.seq_len} text tokens)")
    for column in ("part", "parameters", "dtype", "status", "weights", "gradients", "AdamW state"):
        table.add_column(column, justify="left" if column in ("part", "dtype", "status") else "right")
    for p in report.parts:
        table.add_row(p.name, f"{p.params:,}", p.dtype, p.status, human(p.weights), human(p.grads), human(p.optimizer))
    console.print(table)
    est = report.estimate
    if est is not None:
        totals = Table(title="predicted peak of a training step")
        totals.add_column("", justify="left")
        totals.add_column("bytes", justify="right")
        for name in ("weights", "grads", "optimizer", "activations", "step_temporaries"):
            totals.add_row(name, human(getattr(est, name)))
        verdict = "" if report.budget is None else (" fits" if est.total <= report.budget else " does NOT fit") + \
            f" {human(report.budget)}"
        totals.add_row("total", human(est.total) + verdict)
        console.print(totals)
    if report.knobs:
        table = Table(title="what would make it fit")
        for column in ("knob", "predicted total", "fits", "how"):
            table.add_column(column)
        for k in report.knobs:
            total = "—" if k["total"] is None else human(k["total"])
            table.add_row(k["knob"], total, "yes" if k["fits"] else "no", k["detail"])
        console.print(table)
    for line in (*report.notes, *("assumption: " + a for a in report.assumptions)):
        console.print(line, highlight=False, soft_wrap=True)


def memory_main(argv: Sequence[str]) -> int:
    """``mmlm memory``."""
    import tempfile

    parser = argparse.ArgumentParser(prog="mmlm memory", description="Predict the GPU memory of a training config.")
    parser.add_argument("--config", required=True, help="a training config (configs/…/*.yaml)")
    parser.add_argument("--gpu-memory", default=None, help="the budget per GPU, e.g. 24GB or 80GiB")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's data batch_size")
    parser.add_argument("--seq-len", type=int, default=None, help="text tokens per sample (default: max_text_tokens)")
    parser.add_argument("--master-weights", action="store_true",
                        help="count fp32 master weights of non-fp32 trainable parameters (4 bytes each)")
    parser.add_argument("--no-probe", action="store_true", help="skip the activation measurement")
    parser.add_argument("--device", default=None, help="where the probe runs (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(list(argv))
    if not Path(args.config).is_file():
        parser.error(f"--config {args.config!r} is not a file")
    try:
        with tempfile.TemporaryDirectory() as workdir:
            report = run(args, Path(workdir))
    except (ValueError, OSError) as err:  # a config that cannot be built: one line naming it
        print(f"mmlm memory: error: {args.config}: {first_line(err)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.as_dict(), indent=1))
    else:
        print_report(report)
    return 0
