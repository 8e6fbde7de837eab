"""``mmlm data cache-features``: run a model's frozen vision encoder over shards once and keep its features.

Every input shard ``dir/name.tar`` becomes ``OUT/name.tar`` with the same samples in the same order: every
original member (image, txt, json, …) plus ``features.npy`` = the encoder's tokens ``[N, D]`` (fp32, or fp16
with ``--dtype float16``). Images go through the model's own preprocessing (``model.image_preprocess``) the
way evaluation does it: resize + centre crop, no random augmentation, so the features are deterministic.
``OUT/summary.json`` records the model, checkpoint, shape, dtype and counts. Training then reads them with
``data.init_args.cached_features: true`` and the frozen encoder never runs (``docs/caching.md``).

Shape legend: B batch, N image tokens, D encoder width.
"""

from __future__ import annotations

import argparse
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

FEATURE_DTYPES = {"float32": np.float32, "float16": np.float16}


def add_data_tools(sub: argparse._SubParsersAction) -> None:
    """Add ``cache-features`` to ``mmlm data``."""
    tool = sub.add_parser("cache-features", help="run a model's frozen encoder over shards; write shards + features")
    tool.add_argument("urls", help="input shards: brace pattern, glob or single .tar (:: joins patterns)")
    tool.add_argument("--config", required=True, help="the training config YAML; its model: section is built")
    tool.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override in the config, e.g. --set model.init_args.tokenizer=data/tok (repeatable)")
    tool.add_argument("--ckpt", default=None, help="Lightning checkpoint whose weights are loaded (strict)")
    tool.add_argument("--out", required=True, help="output directory (one shard per input shard, same names)")
    tool.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    tool.add_argument("--dtype", choices=sorted(FEATURE_DTYPES), default="float32", help="stored feature dtype")
    tool.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    tool.set_defaults(run=cache_main)


def cache_main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the tool from parsed arguments; returns the summary."""
    model = load_model(args.config, args.set, args.ckpt)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return cache_features(model, args.urls, args.out, batch_size=args.batch_size, dtype=args.dtype, device=device,
                          provenance={"config": args.config, "set": args.set, "ckpt": args.ckpt},
                          overwrite=args.overwrite)


def load_model(config: str | Path, overrides: list[str] | None = None, ckpt: str | Path | None = None) -> Any:
    """Build the ``model:`` section of a training config (as ``mmlm fit`` would: seeded with its
    ``seed_everything`` first, so randomly initialised parts match) and load ``ckpt``'s weights.

    ``overrides`` are ``"model.init_args.a.b=value"`` strings (value parsed as YAML).
    """
    from jsonargparse import ArgumentParser
    from pytorch_lightning import seed_everything

    from mmlm.models.base import MultimodalModule

    section = yaml.safe_load(Path(config).read_text()) or {}
    if "model" not in section:
        raise ValueError(f"{config} has no model: section (expected a training config such as configs/tiny/frozen.yaml)")
    model_config = {"model": section["model"]}
    for item in overrides or []:
        set_key(model_config, item)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(MultimodalModule, "model", fail_untyped=False, required=True)
    if isinstance(section.get("seed_everything"), int) and not isinstance(section["seed_everything"], bool):
        seed_everything(section["seed_everything"], verbose=False)
    model = parser.instantiate_classes(parser.parse_object(model_config)).model
    if ckpt is not None:
        from mmlm.checkpointing import load_checkpoint_file

        state = load_checkpoint_file(ckpt)
        model.on_load_checkpoint(state)  # added tokens, frozen parts left out of the checkpoint
        model.load_state_dict(state["state_dict"], strict=True)
    return model


def set_key(config: dict[str, Any], item: str) -> None:
    """Apply one ``"a.b.c=value"`` override to a nested dict (value parsed as YAML)."""
    if "=" not in item:
        raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
    key, value = item.split("=", 1)
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise KeyError(f"--set {key}: {part!r} is not a section of the config")
        node = node[part]
    node[leaf] = yaml.safe_load(value)


def frozen_encoder(model: torch.nn.Module) -> torch.nn.Module:
    """``model.encoder``, refusing a missing or trainable one (its features would go stale as it trains)."""
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, torch.nn.Module):
        raise ValueError(f"{type(model).__name__} has no .encoder to cache features of")
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(f"{type(model).__name__}.encoder is trainable ({len(trainable)} tensors, e.g. {trainable[0]!r}): "
                         "only a frozen encoder's features can be cached (set its freeze: true and trainable_blocks: 0)")
    return encoder


def cache_features(model: Any, urls: str, out: str | Path, *, batch_size: int = 64, dtype: str = "float32",
                   device: torch.device | str = "cpu", provenance: dict[str, Any] | None = None,
                   overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write ``out/<shard name>`` for every shard of ``urls`` with each sample's ``features.npy`` added (a progress
    bar over the shards on stderr unless ``progress`` is false).

    ``out`` must be empty unless ``overwrite``, which replaces only an earlier run's files there
    (:mod:`datamodules.formats.outputs`).

    Returns:
        The summary also written to ``out/summary.json``: shard pattern, sample and skip counts, feature shape.
    """
    from rich.console import Console
    from rich.progress import track

    from datamodules.formats.outputs import check_output, prepare_output, write_summary
    from datamodules.pipeline.urls import expand_urls

    shards = expand_urls(urls)
    out = Path(out)
    targets = [out / Path(url.split("://")[-1]).name for url in shards]
    clashes = [str(t) for t, url in zip(targets, shards) if t.resolve() == Path(url).resolve()]
    if clashes or len(set(targets)) != len(targets):
        raise ValueError(f"output shards would overwrite inputs or each other ({clashes or 'same names'}): use another --out")
    check_output(out, overwrite)
    encoder = frozen_encoder(model).to(device).eval()
    encode = FeatureEncoder(encoder, model.image_preprocess, batch_size, FEATURE_DTYPES[dtype], torch.device(device))
    prepare_output(out, overwrite)
    for url, target in track(list(zip(shards, targets)), description=f"encoding {len(shards)} shards",
                             disable=not progress, console=Console(stderr=True)):
        encode.shard(url, target)
    summary = {"urls": str(out / "*.tar"), "shards": len(shards), "samples": encode.samples, "skipped": encode.skipped,
               "shape": list(encode.shape) if encode.shape else None, "dtype": dtype,
               "encoder": type(encoder).__name__, "preprocess": encode.preprocess_info(), **(provenance or {})}
    return write_summary(out, summary, indent=1)


class FeatureEncoder:
    """Reads one shard, encodes its images in batches under ``no_grad``, writes the shard with features.

    Args:
        encoder: the frozen encoder (``[B, 3, H, W] → [B, N, D]``).
        preprocess: the model's :class:`~mmlm.encoders.base.ImagePreprocess` (size, mean, std, resize mode,
            interpolation).
        batch_size: images per encoder call.
        dtype: numpy dtype of the stored features.
        device: where the encoder runs.
    """

    def __init__(self, encoder: torch.nn.Module, preprocess: Any, batch_size: int, dtype: Any,
                 device: torch.device) -> None:
        from datamodules.pipeline.transforms import ImageTransform

        self.encoder, self.preprocess, self.batch_size, self.dtype = encoder, preprocess, batch_size, dtype
        self.device = device
        self.transform = ImageTransform.from_preprocess(preprocess, train=False)
        self.samples, self.skipped = 0, {}
        self.shape: tuple[int, int] | None = None

    def preprocess_info(self) -> dict[str, Any]:
        pre = self.preprocess
        return {"size": list(pre.size), "mean": list(pre.mean), "std": list(pre.std), "resize": pre.resize,
                "interpolation": pre.interpolation}

    def shard(self, url: str, target: Path) -> None:
        """Encode every sample of ``url`` into ``target`` (written to a temporary name, then renamed)."""
        import webdataset as wds

        partial = target.with_name(target.name + ".partial")
        with wds.TarWriter(str(partial), encoder=False, mtime=0) as writer:
            for chunk in self._chunks(url):
                for sample in self._encode(chunk):
                    writer.write(sample)
        os.replace(partial, target)

    def _chunks(self, url: str) -> Iterator[list[tuple[dict[str, Any], torch.Tensor]]]:
        """Batches of ``(sample, pixels [3, H, W])``; undecodable samples are counted and left out."""
        import webdataset as wds

        from datamodules.image_text import image_bytes
        from datamodules.pipeline.skips import SkipSample

        chunk: list[tuple[dict[str, Any], torch.Tensor]] = []
        for sample in wds.tarfile_samples([{"url": url}], handler=self._count_tar_error):
            try:
                chunk.append((sample, self.transform(image_bytes(sample))))
            except SkipSample as exn:
                self.skipped[exn.reason] = self.skipped.get(exn.reason, 0) + 1
            if len(chunk) == self.batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def _count_tar_error(self, exn: Exception) -> bool:
        self.skipped["tar_error"] = self.skipped.get("tar_error", 0) + 1
        return True

    @torch.no_grad()
    def _encode(self, chunk: list[tuple[dict[str, Any], torch.Tensor]]) -> list[dict[str, Any]]:
        """The chunk's samples (original members + ``__key__``) with ``features.npy`` added."""
        from datamodules.image_text import FEATURES

        pixels = torch.stack([p for _, p in chunk]).to(self.device)
        features = self.encoder(pixels).float().cpu().numpy().astype(self.dtype)  # [B, N, D]
        self.shape = features.shape[1:]
        self.samples += len(chunk)
        return [{**{k: v for k, v in sample.items() if not k.startswith("__")}, "__key__": sample["__key__"],
                 FEATURES: npy_bytes(feats)} for (sample, _), feats in zip(chunk, features)]


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` in ``.npy`` format (no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
