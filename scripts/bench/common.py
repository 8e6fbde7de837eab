"""Shared helpers of the side-by-side benchmarks: sizes, alternating timing, rows, shapes data, device.

Every benchmark module exposes ``run(scale: Scale, data: Path) -> list[dict]``; each row is
``{name, mmlm, reference, unit, ratio, target, met}`` (see :func:`row`). Timings alternate the two sides
(A B A B …) and report medians, so a busy, shared machine slows both sides alike.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Scale:
    """Sizes of one benchmark run. ``toy`` is for tests (seconds), ``quick`` for ``--quick``, ``full`` the default.

    Attributes:
        name: ``toy``, ``quick`` or ``full``.
        repeats: alternating A/B rounds per measurement (medians over them).
        train_images: images written by ``write_shapes`` (the caption shards hold one sample per image).
        shard_size: samples per shard.
        loader_samples: samples read per loader measurement.
        loader_workers: ``num_workers`` values of the loader benchmark.
        jpeg_images: re-encoded large JPEGs of the reduced-size decode benchmark.
        batch_size: examples per training/generation batch.
        steps: timed training steps per round (after ``warmup`` untimed ones).
        warmup: untimed steps per round.
        new_tokens: tokens generated per prompt.
        matmul: side of the square matmul that measures the peak.
        flops_seq: sequence length of the FLOP/s benchmark.
    """

    name: str
    repeats: int
    train_images: int
    shard_size: int
    loader_samples: int
    loader_workers: tuple[int, ...]
    jpeg_images: int
    batch_size: int
    steps: int
    warmup: int
    new_tokens: int
    matmul: int
    flops_seq: int


SCALES = {
    "toy": Scale("toy", repeats=1, train_images=32, shard_size=16, loader_samples=16, loader_workers=(0,),
                 jpeg_images=4, batch_size=4, steps=2, warmup=1, new_tokens=3, matmul=128, flops_seq=16),
    "quick": Scale("quick", repeats=5, train_images=512, shard_size=64, loader_samples=1024, loader_workers=(0, 1, 2),
                   jpeg_images=100, batch_size=16, steps=20, warmup=3, new_tokens=16, matmul=2048, flops_seq=128),
    "full": Scale("full", repeats=9, train_images=2048, shard_size=128, loader_samples=2048, loader_workers=(0, 1, 2),
                  jpeg_images=400, batch_size=32, steps=30, warmup=5, new_tokens=32, matmul=2048, flops_seq=256),
}


def row(name: str, mmlm: float, reference: float, unit: str, ratio: float, target: str | None) -> dict[str, Any]:
    """One result row. ``target`` is ``">= x"``, ``"<= x"`` or ``None`` (informational; ``met`` is then ``None``)."""
    met = None
    if target is not None:
        op, value = target.split()
        met = ratio >= float(value) if op == ">=" else ratio <= float(value)
    return {"name": name, "mmlm": mmlm, "reference": reference, "unit": unit, "ratio": ratio,
            "target": target, "met": met}


def median(values: list[float]) -> float:
    """The median (the value of a one-element list)."""
    return statistics.median(values)


def alternate(sides: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Call every side once per round, in A B A B … order, ``repeats`` rounds; the median of each side's results.

    Each callable returns its own measurement (seconds, samples/s, …); setup belongs outside it.
    """
    results: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, measure in sides.items():
            results[name].append(measure())
    return {name: median(values) for name, values in results.items()}


def device() -> torch.device:
    """CUDA when available (bf16 autocast; untested here), else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    """Wait for queued GPU work (no-op on CPU) so wall-clock times are honest."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def autocast() -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (untested here: the benchmark machine has no GPU); nothing on CPU."""
    if torch.cuda.is_available():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes (GPU synchronised before and after)."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def peak_bytes(fn: Any) -> int:
    """Most bytes allocated at once while ``fn()`` runs, beyond what was allocated before."""
    if torch.cuda.is_available():
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        sync()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events())  # net bytes of each op
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def step_times(steps: Iterator[Any], warmup: int, count: int) -> float:
    """Median seconds per item of ``steps`` (an iterator doing one step per ``next``) after ``warmup`` items."""
    for _ in range(warmup):
        next(steps)
    return median([timed(lambda: next(steps)) for _ in range(count)])


def shapes_data(out: Path, scale: Scale) -> Path:
    """Write the synthetic shapes shards + tokenizer under ``out`` (once; reused when ``summary.json`` exists)."""
    from datamodules.synthetic.shapes import write_shapes

    if not (out / "summary.json").exists():
        write_shapes(out, train=scale.train_images, val=8, seed=0, shard_size=scale.shard_size, progress=False)
    return out


def captions_glob(data: Path) -> str:
    """The training caption shards of the shapes data."""
    return str(data / "train" / "captions-*.tar")


def vqa_glob(data: Path) -> str:
    """The training VQA shards of the shapes data."""
    return str(data / "train" / "vqa-*.tar")


def batches(data: Path, count: int, batch_size: int, image_size: int, tokenizer: str | None = None,
            image_tokens: int | None = None) -> list[Any]:
    """``count`` VQA batches of mmlm's datamodule, preloaded in memory (so training benchmarks time no I/O);
    ``image_tokens``: the sentences of a prefix family with that many image placeholders (else plain batches)."""
    from datamodules import ImageTextDataModule, Source

    module = ImageTextDataModule(train=[Source(vqa_glob(data), kind="vqa")], tokenizer=tokenizer or str(data / "tokenizer"),
                                 image_size=image_size, batch_size=batch_size, epoch_samples=count * batch_size,
                                 resampled=True, shuffle_buffer=64, image_tokens=image_tokens)
    module.setup("fit")
    return list(module.train_dataloader())
