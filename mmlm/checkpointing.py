"""Atomic checkpoint writes: a kill during a save leaves the previous checkpoint intact and loadable.

Lightning 2.6's ``TorchCheckpointIO`` serialises the whole checkpoint into memory and writes it
through an fsspec transaction whose temporary file lives in the system temp directory; moving it
onto another filesystem (the usual case: ``/tmp`` local, checkpoints on a shared mount) is a copy,
so a kill during that copy leaves a truncated ``last.ckpt``, and nothing is fsync'ed.
:class:`AtomicCheckpointIO` streams ``torch.save`` into a temporary file *in the target directory*,
fsyncs it, renames it over the target with ``os.replace`` (atomic on POSIX) and fsyncs the
directory. ``mmlm fit`` uses it by default (``mmlm.app.lightning.lightning_cli``).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

#: Temporary files are named ``.{name}.tmp-{pid}`` next to the checkpoint.
TMP_INFIX = ".tmp-"


def is_local(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a local filesystem path (no ``scheme://``)."""
    return "://" not in str(path) or str(path).startswith("file://")


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through a same-directory temporary file, fsync and ``os.replace``.

    On any exception (or a kill) the previous file at ``path`` is untouched; the temporary file is
    removed on exceptions; one left by a kill (``.{name}.tmp-{pid}``) is removed by the next
    successful save of ``path``.
    """
    path = Path(str(path).removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_INFIX}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    remove_stale_temps(path)


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: Path) -> None:
    """Delete ``.{name}.tmp-{pid}`` files of ``path`` left by killed writers (their process is gone)."""
    for tmp in path.parent.glob(f".{path.name}{TMP_INFIX}*"):
        pid = tmp.name.rsplit(TMP_INFIX, 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (see :func:`atomic_torch_save`); remote
    paths (``s3://`` …) keep Lightning's own fsspec transaction."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None or not is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (missing, empty, truncated, not a checkpoint, unsafe to unpickle)."""


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with the checkpoint file ``path`` at a glance (no tensor is read), else ``None``: missing, empty,
    or not a complete zip archive (``torch.save`` writes one; a write cut short by a full disk or a kill loses the
    archive's central directory, which sits at its end)."""
    path = Path(path)
    if not path.is_file():
        return "no such checkpoint file"
    if path.stat().st_size == 0:
        return "the file is empty"
    if not zipfile.is_zipfile(path):
        return (f"not a complete checkpoint ({path.stat().st_size:,} bytes without the end of a torch.save archive: "
                "truncated by a full disk or a kill, or not a checkpoint)")
    return None


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` (never unpickling arbitrary objects), with one message naming the file
    and what is wrong with it instead of a traceback.

    Raises:
        CheckpointError: see :func:`checkpoint_problem`, or an archive that does not load (damaged inside, or holding
            objects that are not plain data).
    """
    if problem := checkpoint_problem(path):
        raise CheckpointError(f"checkpoint {str(path)!r}: {problem}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"checkpoint {str(path)!r} holds objects that are not plain data and is not unpickled "
                              f"(mmlm loads checkpoints with weights_only=True): {str(err).splitlines()[0]}") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: {str(err).splitlines()[0]}") from err
