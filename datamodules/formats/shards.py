"""Writing shard sets: the one writer shared by the converters and the synthetic generators.

The writer never deletes anything: a tool's output folder is checked and emptied of that tool's own earlier files
by :mod:`datamodules.formats.outputs` (a folder of someone else's shards is refused, not cleaned).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import webdataset as wds


class ShardWriter:
    """Writes samples to ``directory/{prefix}{i:05d}.tar``, at most ``shard_size`` samples each.

    Values must already be bytes (no webdataset encoding); tar member times are fixed to 0 so the
    same samples give byte-identical shards.

    Args:
        directory: output folder (must exist; prepared by :func:`datamodules.formats.outputs.prepare_output`).
        shard_size: samples per shard.
        prefix: shard name prefix, e.g. ``"vqa-"`` → ``vqa-00000.tar``.
    """

    def __init__(self, directory: Path, shard_size: int, prefix: str = "") -> None:
        self.directory, self.shard_size, self.prefix = Path(directory), shard_size, prefix
        self.count = 0
        self.shards = 0
        self._writer: wds.TarWriter | None = None

    def write(self, sample: dict[str, Any]) -> None:
        """Append one sample, opening the next shard when the current one is full."""
        if self._writer is None or self.count % self.shard_size == 0:
            self.close()
            path = self.directory / f"{self.prefix}{self.shards:05d}.tar"
            self._writer = wds.TarWriter(str(path), encoder=False, mtime=0)
            self.shards += 1
        self._writer.write(sample)
        self.count += 1

    def close(self) -> None:
        """Finish the open shard, if any."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def url(self) -> str | None:
        """Brace pattern of every shard written (``out/vqa-{00000..00003}.tar``), ``None`` if none."""
        if self.shards == 0:
            return None
        return str(self.directory / f"{self.prefix}{{00000..{self.shards - 1:05d}}}.tar")
