"""Checkpoints written atomically: a crash or a kill during a save never leaves a truncated file
under the checkpoint's name (for instance a half-written `last.ckpt` that a resume would pick).

Lightning's default writer serializes to memory and then writes the target file in place (through
fsspec; for a local path that can mean a temporary file in /tmp moved over afterwards, which is a
copy, not a rename, when /tmp is another file system). Here the bytes go to a temporary file next
to the target, are flushed to disk, and replace the target with one rename, which POSIX makes
atomic; the directory is then synced so that the rename itself survives a power loss.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from multimodal.data.shards import local_path


def save_atomically(checkpoint: dict[str, Any], path: str) -> None:
    """torch.save(checkpoint) to `path`, which afterwards holds either its old bytes or all new ones."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=directory)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO with atomic writes for local paths (remote URLs go through
    Lightning's own writer, since object stores replace objects whole anyway)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        target = local_path(str(path))
        if target is None or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_atomically(checkpoint, target)
