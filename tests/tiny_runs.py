"""Helpers for tests that run every tiny config through the real CLI (``tests/test_checkpoint_lifecycle.py``,
``tests/test_ddp_contract.py``).

* :func:`write_workspace`: small synthetic data sets at the ``data/…`` paths the tiny configs name.
* :class:`WeightDigest`: a test-only callback (loaded by class path ``tiny_runs.WeightDigest`` with ``tests/`` on
  ``PYTHONPATH``) that writes, per rank, a hash of every state-dict tensor at the start and the end of training.
* ``python tests/tiny_runs.py JOBS.json``: run ``mmlm fit`` on each job's tiny config in turn inside one process (one
  per rank when started as a rank of a torchrun-style launch: ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT`` set), so the ranks pay the imports once for all configs (:func:`run_jobs`). After each job the rank
  writes its status and waits for the other ranks: a config may read what an earlier one exported
  (``runs/tiny/text_lm/export``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch


def write_workspace(root: Path) -> Path:
    """Write small synthetic data sets under ``root/data`` (shapes, interleaved, tabletop, pairs, Donut docs and
    receipts, the shapes VQA answer list); returns ``root``. Run the tiny configs with ``root`` as working directory."""
    from datamodules.synthetic.documents import write_documents
    from datamodules.synthetic.interleaved import write_interleaved
    from datamodules.synthetic.pairs import write_pairs
    from datamodules.synthetic.shapes import write_shapes
    from datamodules.synthetic.tabletop import write_tabletop
    from mmlm.app.cli import main

    data = root / "data"
    write_shapes(data / "shapes", train=32, val=16, seed=0, shard_size=4, progress=False)
    write_interleaved(data / "interleaved", docs=16, pairs=8, texts=8, val=8, support=6, shard_size=4)
    write_tabletop(data / "tabletop", train=16, val=16, seed=0, shard_size=4, progress=False)
    write_pairs(data / "shapes_pairs", train=16, val=8, seed=0, shard_size=4)
    for kind in ("docs", "receipts"):
        write_documents(data / "donut" / kind, kind, train=8, val=8, seed=0, shard_size=2, layouts=("shards",))
    assert main(["data", "vqa-answers", str(data / "shapes" / "train" / "vqa-*.tar"), "--out",
                 str(data / "shapes" / "answers.json")]) == 0
    return root


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (equal digests: bitwise equal tensors)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    data = flat.view(torch.uint8) if flat.numel() else flat
    header = f"{tensor.dtype}{tuple(tensor.shape)}".encode()
    return hashlib.sha256(header + data.numpy().tobytes()).hexdigest()


def abort_once(fault: dict[str, Any] | None, rank: int) -> None:
    """Fault injection for the launcher's test: ``{"rank", "marker"}`` aborts that rank (SIGABRT, as glibc on a
    double free) the first time, when ``marker`` does not exist yet (it is created first)."""
    if fault is not None and fault["rank"] == rank and not Path(fault["marker"]).exists():
        Path(fault["marker"]).touch()
        os.abort()


class WeightDigest(pl.Callback):
    """Write ``out_dir/rank{r}.json``: ``{"rank", "world_size", "global_step", "start", "end", "trainable",
    "frozen"}`` with ``start``/``end`` a digest (:func:`tensor_digest`) per state-dict tensor at the start and the
    end of training and ``trainable``/``frozen`` the names of the parameters with and without ``requires_grad`` (not
    counting, as frozen, those under the module's ``ema_prefixes``: updated by an average of trained ones).

    Args:
        out_dir: directory that receives one file per rank.
        abort_once: fault injection for the launcher's test (:func:`abort_once`), at the start of training, when
            the process group exists.
    """

    def __init__(self, out_dir: str, abort_once: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.out_dir = Path(out_dir)
        self.abort = abort_once
        self.start: dict[str, str] = {}

    @staticmethod
    def digests(module: torch.nn.Module) -> dict[str, str]:
        """A digest per state-dict tensor; an FSDP2 shard (``DTensor``) is gathered first (a collective: every rank
        calls this at the same point)."""
        from torch.distributed.tensor import DTensor

        return {name: tensor_digest(value.full_tensor() if isinstance(value, DTensor) else value)
                for name, value in module.state_dict().items()}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = self.digests(pl_module)
        abort_once(self.abort, trainer.global_rank)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        averaged = tuple(getattr(pl_module, "ema_prefixes", ()))  # no gradient, but moved by an EMA (DINO's teacher)
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "global_step": trainer.global_step,
                  "start": self.start, "end": self.digests(pl_module),
                  "trainable": [n for n, p in pl_module.named_parameters() if p.requires_grad],
                  "frozen": [n for n, p in pl_module.named_parameters() if not p.requires_grad
                             and not n.startswith(averaged)]}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def fit_args(job: dict[str, Any], devices: int, digest_dir: Path, common: list[str]) -> list[str]:
    """``mmlm fit`` arguments of one job: ``configs/tiny/<config>.yaml`` with its strategy, the devices, the digest
    callback, the common arguments, then the job's own."""
    callback = {"class_path": "tiny_runs.WeightDigest",
                "init_args": {"out_dir": str(digest_dir), "abort_once": job.get("abort_once")}}
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny" / f"{job['config']}.yaml"
    return ["fit", "--config", str(config), "--trainer.accelerator=cpu", f"--trainer.devices={devices}",
            f"--trainer.strategy={job['strategy']}", f"--trainer.callbacks+={json.dumps(callback)}", *common,
            *job.get("args", [])]


def run_jobs(spec_file: Path) -> None:
    """Fit every job of ``spec_file`` (JSON ``{"out", "common": [args], "jobs": [{"name", "config", "strategy",
    "args", optional "abort_once" (:func:`abort_once`)}]}``) in turn on this rank; after each, write ``out/<name>/status-rank{r}.json`` (``status`` "ok" or the
    error, ``seconds``), then wait for every rank."""
    from mmlm.app.cli import main

    spec = json.loads(spec_file.read_text())
    out, rank, world = Path(spec["out"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    sys.argv = ["mmlm"]  # LightningCLI warns when it is given both args and a command line
    for job in spec["jobs"]:
        started, directory = time.perf_counter(), out / job["name"]
        try:
            code = main(fit_args(job, world, directory, spec["common"]))
            status = "ok" if code == 0 else f"mmlm fit exited {code}"
        except BaseException:  # noqa: BLE001 - SystemExit from the CLI too: record it, go on to the next job
            status = traceback.format_exc()[-2500:]
        directory.mkdir(parents=True, exist_ok=True)
        seconds = time.perf_counter() - started
        (directory / f"status-rank{rank}.json").write_text(json.dumps({"status": status, "seconds": seconds}))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_jobs(Path(sys.argv[1]))
