"""What a SIGKILLed trainer leaves behind: no temporary file of an interrupted checkpoint save
outlives the next save (unless its writer is still alive), and no DataLoader worker outlives it."""

import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import multimodal.checkpoint_io as checkpoint_io
from multimodal.checkpoint_io import remove_stale_partials, save_atomically
from tests.multimodal.data.helpers import write_shards

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def wait_for(path: Path, child: subprocess.Popen, timeout: float = 120.0) -> None:
    """Until the child writes `path` (it is written whole, by a rename); fails if the child exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert child.poll() is None, f"the child exited ({child.returncode}) before it was ready"
        assert time.monotonic() < deadline, f"the child did not get ready in {timeout} s"
        time.sleep(0.1)


def kill(child: subprocess.Popen) -> None:
    child.kill()
    child.wait(timeout=60)


def last_checkpoints(directory: Path) -> set[str]:
    """What Lightning's ckpt_path="last" chooses from in `directory`."""
    callback = ModelCheckpoint(dirpath=str(directory), save_last=True)
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[callback], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(directory))
    return callback._find_last_checkpoints(trainer)


# A child that saves a large checkpoint to argv[1] with save_atomically and stops right after writing
# all its bytes to the temporary file, before the rename: argv[2] "die" SIGKILLs itself there,
# "wait" writes the file argv[3] and sleeps (its temporary file still open and locked).
SAVING_CHILD = """
import os, signal, sys, time, torch
import multimodal.checkpoint_io as io
path, then = sys.argv[1], sys.argv[2]
real_save = torch.save
def save_then_stop(obj, file):
    real_save(obj, file)
    file.flush()
    if then == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    open(sys.argv[3] + ".tmp", "w").close()
    os.rename(sys.argv[3] + ".tmp", sys.argv[3])
    time.sleep(600)
io.torch.save = save_then_stop
io.save_atomically({"step": 2, "weights": torch.zeros(1_000_000)}, path)
"""


def test_the_save_after_a_kill_mid_save_removes_the_partial_file(tmp_path, caplog):
    path = tmp_path / "last.ckpt"
    save_atomically({"step": 1, "weights": torch.arange(10)}, str(path))
    before = path.read_bytes()
    result = subprocess.run([sys.executable, "-c", SAVING_CHILD, str(path), "die"], cwd=ROOT, env=ENV, timeout=300)
    assert result.returncode == -signal.SIGKILL
    partials = list(tmp_path.glob(".last.ckpt.*.partial"))
    assert len(partials) == 1 and partials[0].stat().st_size > 4_000_000  # what the kill left
    assert path.read_bytes() == before
    # Never taken for a checkpoint: Lightning's ckpt_path="last" sees only last.ckpt.
    assert last_checkpoints(tmp_path) == {str(path)}

    with caplog.at_level(logging.INFO, logger="multimodal.checkpoint_io"):
        save_atomically({"step": 3}, str(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.load(path, weights_only=True) == {"step": 3}
    assert [r.getMessage() for r in caplog.records if r.name == "multimodal.checkpoint_io"] == [
        f"removed 1 partial checkpoint file(s) left by interrupted saves in {tmp_path}"]


def test_a_live_writers_partial_file_stays_until_the_writer_dies(tmp_path):
    path, ready = tmp_path / "x.ckpt", tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", SAVING_CHILD, str(path), "wait", str(ready)], cwd=ROOT, env=ENV)
    try:
        wait_for(ready, child)
        partials = list(tmp_path.glob(".x.ckpt.*.partial"))
        assert len(partials) == 1
        # The other process is still writing (it holds the lock): neither a cleanup nor a save of
        # another checkpoint into the same directory removes its file.
        assert remove_stale_partials(str(tmp_path)) == []
        save_atomically({"step": 1}, str(tmp_path / "y.ckpt"))
        assert partials[0].exists()
    finally:
        kill(child)
    assert remove_stale_partials(str(tmp_path)) == [str(partials[0])]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ready", "y.ckpt"]


def test_a_failed_save_leaves_nothing_and_still_removes_dead_writers_files(tmp_path):
    # A temporary file nobody holds a lock on, as a killed writer leaves it.
    (tmp_path / ".model.ckpt.dead1234.partial").write_bytes(b"half a checkpoint")
    path = tmp_path / "model.ckpt"
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):  # by Python version
        save_atomically({"not picklable": lambda: None}, str(path))
    assert list(tmp_path.iterdir()) == []


def test_without_flock_partial_files_stay_and_saves_still_work(tmp_path, monkeypatch):
    def no_flock(descriptor, operation):
        raise OSError(38, "Function not implemented")  # ENOSYS, as some FUSE file systems answer

    monkeypatch.setattr(checkpoint_io.fcntl, "flock", no_flock)
    leftover = tmp_path / ".model.ckpt.dead1234.partial"
    leftover.write_bytes(b"half a checkpoint")
    assert remove_stale_partials(str(tmp_path)) == []
    save_atomically({"step": 1}, str(tmp_path / "model.ckpt"))
    assert torch.load(tmp_path / "model.ckpt", weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [leftover.name, "model.ckpt"]


# A trainer stand-in: a DataLoader from build_loader, 2 workers, over a slow data set (each worker
# takes a minute per Batch after its first, so that when the process is killed its workers are in
# the middle of a fetch, where torch's own watchdog does not look). Once both workers delivered a
# Batch it writes its PID and its children's (its workers) to argv[3] and sleeps. argv[4] "poll" takes the
# prctl away, for the fallback of systems without it.
TRAINER_CHILD = """
import os, sys, time
import multimodal.data.dataset as dataset_module
from lm.tokenizer import load_tokenizer
from multimodal.data import DataConfig, build_dataset, build_loader
from tests.multimodal.data.helpers import model_parts

if sys.argv[4] == "poll":
    dataset_module._kill_on_parent_death = lambda: False

class SlowDataset(dataset_module.ShardDataset):
    def __iter__(self):
        for batch in super().__iter__():
            yield batch
            time.sleep(60)

parts = model_parts(load_tokenizer(sys.argv[1]))
built = build_dataset(DataConfig(sys.argv[2], max_tokens=256, rows_per_batch=2), parts.tokenizer,
                      parts.transform, parts.image_token_id, parts.num_image_tokens)
batches = iter(build_loader(SlowDataset(built.config, built.settings, built.sources), num_workers=2))
next(batches), next(batches)
me = os.getpid()
children = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:  # ended meanwhile
        continue
    if int(stat.rsplit(")", 1)[1].split()[1]) == me:  # the parent PID, after "pid (comm) state"
        children.append(int(pid))
with open(sys.argv[3] + ".tmp", "w") as file:
    file.write(" ".join(map(str, [me] + children)))
os.rename(sys.argv[3] + ".tmp", sys.argv[3])
time.sleep(600)
"""


def process_state(pid: int) -> tuple[str, int] | None:
    """(state, start time) from /proc/<pid>/stat, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)", which may hold spaces
    return fields[0], int(fields[19])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("watch", ["prctl", "poll"])
def test_dataloader_workers_die_with_a_sigkilled_trainer(tokenizer, tmp_path, watch):
    tokenizer.save(tmp_path / "tokenizer")
    paths, _ = write_shards(tmp_path / "shards", num_samples=64, num_shards=4)
    pids = tmp_path / "pids"
    child = subprocess.Popen([sys.executable, "-c", TRAINER_CHILD, str(tmp_path / "tokenizer"), "::".join(paths),
                              str(pids), watch], cwd=ROOT, env=ENV)
    try:
        wait_for(pids, child, timeout=240)
        trainer, *workers = map(int, pids.read_text().split())
        assert trainer == child.pid and len(workers) == 2
        started = {pid: process_state(pid) for pid in workers}
        assert all(state is not None and state[0] != "Z" for state in started.values())
    finally:
        kill(child)

    def alive(pid: int) -> bool:  # the same process (not a new one with its PID), and not a zombie
        state = process_state(pid)
        return state is not None and state[1] == started[pid][1] and state[0] != "Z"

    deadline = time.monotonic() + 10  # the bar: none alive 10 s after the kill
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in workers if alive(pid)]
    for pid in survivors:  # do not leave them running after a failure
        os.kill(pid, signal.SIGKILL)
    assert survivors == [], "DataLoader workers outlived their SIGKILLed trainer"


def test_workers_started_by_a_fork_server_still_run(tokenizer, tmp_path):
    """Under forkserver (Python 3.14's default on Linux) a worker's parent is the fork server, not
    the trainer; the workers must not take that for their trainer's death."""
    from multimodal.data import DataConfig, build_dataset, build_loader
    from tests.multimodal.data.helpers import model_parts

    paths, expected = write_shards(tmp_path, num_samples=16, num_shards=2)
    parts = model_parts(tokenizer)
    dataset = build_dataset(DataConfig(paths, max_tokens=256, rows_per_batch=2), parts.tokenizer, parts.transform,
                            parts.image_token_id, parts.num_image_tokens)
    loader = build_loader(dataset, num_workers=2)
    loader.multiprocessing_context = "forkserver"
    keys = [key for batch in loader for row in batch.keys for key in row]
    assert sorted(keys) == sorted(expected)
