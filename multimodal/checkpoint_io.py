"""Checkpoints written atomically: a crash or a kill during a save never leaves a truncated file
under the checkpoint's name (for instance a half-written `last.ckpt` that a resume would pick).

Lightning's default writer serializes to memory and then writes the target file in place (through
fsspec; for a local path that can mean a temporary file in /tmp moved over afterwards, which is a
copy, not a rename, when /tmp is another file system). Here the bytes go to a temporary file next
to the target, are flushed to disk, and replace the target with one rename, which POSIX makes
atomic; the directory is then synced so that the rename itself survives a power loss.

The temporary file is named `.{target name}.XXXXXXXX.partial`: hidden and never ending in `.ckpt`,
so it can never be taken for a checkpoint (Lightning's `ckpt_path="last"` looks only at `*.ckpt`
files whose name starts with "last"). A process killed during a save (SIGKILL, the OOM killer)
leaves its temporary file behind, so the writer holds an exclusive flock on it while it writes, and
each save first removes the temporary files in its directory whose lock nobody holds: a lock dies
with its process, so those are exactly the files of dead writers (remove_stale_partials). A file
system without flock keeps its leftovers (they are never removed blindly, as their writer may be
alive); NFSv4 supports flock across hosts, but an NFS mount with `local_lock=flock` or `nolock` only
locks per host, so do not save into one directory from two hosts on such a mount.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import tempfile
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from multimodal.data.shards import local_path

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"


def remove_stale_partials(directory: str) -> list[str]:
    """Removes the temporary files (`.*.partial`) that writers killed during a save left in
    `directory`: those whose lock can be taken at once. A file whose lock is held (its writer is
    alive, maybe in another process or on another host) stays, and so does every file where the
    file system cannot lock. Returns the paths removed (and logs their count at INFO)."""
    removed = []
    with os.scandir(directory) as entries:
        candidates = [entry.path for entry in entries if entry.name.startswith(".")
                      and entry.name.endswith(PARTIAL_SUFFIX) and entry.is_file(follow_symlinks=False)]
    for path in candidates:
        try:
            # Opened for writing: NFS only grants an exclusive lock on a file open for writing.
            descriptor = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:  # gone meanwhile (another process removed it), or not ours to open
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                log.debug("cannot lock %s (%s): left in place", path, error)
            os.close(descriptor)
            continue
        try:
            # Still the file we locked (not removed and replaced meanwhile), so its writer is dead.
            if os.path.samestat(os.fstat(descriptor), os.stat(path, follow_symlinks=False)):
                os.unlink(path)
                removed.append(path)
        except FileNotFoundError:
            pass
        finally:
            os.close(descriptor)  # releases the lock
    if removed:
        log.info("removed %d partial checkpoint file(s) left by interrupted saves in %s", len(removed), directory)
    return removed


def _locked_temporary(path: str, directory: str) -> tuple[int, str]:
    """A new temporary file beside `path`, open and exclusively locked: (descriptor, its path)."""
    while True:
        descriptor, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=PARTIAL_SUFFIX,
                                                 dir=directory)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError:  # no flock on this file system: written unlocked (and never removed by others)
            return descriptor, temporary
        # Between mkstemp and flock the file was unlocked, so another process's remove_stale_partials
        # may have removed it; then start again with a new one.
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(descriptor), os.stat(temporary)):
                return descriptor, temporary
        os.close(descriptor)


def save_atomically(checkpoint: dict[str, Any], path: str) -> None:
    """torch.save(checkpoint) to `path`, which afterwards holds either its old bytes or all new ones.
    Temporary files that earlier, killed saves left in its directory are removed first."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_partials(directory)
    descriptor, temporary = _locked_temporary(path, directory)
    # The lock lasts as long as the file is open: until after the rename, so that no other process
    # takes the temporary file for a dead writer's while it still has this name.
    with os.fdopen(descriptor, "wb") as file:
        try:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
    fsync_directory(directory)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename inside `directory` durable (the directory entry itself reaches the disk)."""
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
