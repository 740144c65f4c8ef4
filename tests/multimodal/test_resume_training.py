"""Exact resume through the real command line: `salamandra-vl fit` is SIGKILLed in the middle of its
second epoch (2 DataLoader workers, two sources, shuffling, packing, a bad sample), then resumed from
its last checkpoint; the samples and losses after the checkpoint equal those of an uninterrupted run,
and every sample of an epoch is trained on exactly once. The same holds for 2 DDP ranks (gloo).
(A kill during a save: test_crash_leftovers.py; a resume from every step: test_resume_every_step.py.)"""

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from webdataset import TarWriter

from tests.multimodal.data.helpers import image_bytes, write_shards
from tests.multimodal.tiny import TINY_CLIP

ROOT = Path(__file__).resolve().parents[2]
EVERY = 3  # checkpoint every EVERY steps


class StepRecorder(L.Callback):
    """Appends each trained step's sample keys and loss to a file (flushed to disk at once, since the
    process may be killed), and SIGKILLs its own process after step `kill_at`."""

    def __init__(self, path: str, kill_at: int = -1):
        self.path, self.kill_at = path, kill_at

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        record = {"step": trainer.global_step, "epoch": trainer.current_epoch, "keys": batch.keys,
                  "loss": float(outputs["loss"])}
        with open(self.path.format(rank=trainer.global_rank), "a") as file:
            file.write(json.dumps(record) + "\n")
            file.flush()
            os.fsync(file.fileno())
        if trainer.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def fit(root: Path, name: str, max_steps: int, kill_at: int = -1, ckpt_path: str | None = None,
        devices: int = 1, keep_every_checkpoint: bool = False, strategy: str = "auto", num_workers: int = 2,
        export_dir: str | None = None, **data_options) -> int:
    """One `salamandra-vl fit` in a subprocess; its steps are recorded in root/name.jsonl (with
    several devices, root/name.rank<R>.jsonl; kill_at kills every rank)."""
    sources = [{"name": "captions", "shards": sorted(str(p) for p in (root / "a").glob("*.tar")), "weight": 0.7},
               {"name": "text", "shards": sorted(str(p) for p in (root / "b").glob("*.tar")), "weight": 0.3}]
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": devices, "strategy": strategy, "max_steps": max_steps, "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False, "limit_val_batches": 0, "default_root_dir": str(root / name),
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(root / name / "checkpoints"), "every_n_train_steps": EVERY,
                               "save_last": True, "save_top_k": -1 if keep_every_checkpoint else 1}},
                {"class_path": f"{__name__}.StepRecorder",
                 "init_args": {"path": str(root / (f"{name}.jsonl" if devices == 1 else f"{name}.rank{{rank}}.jsonl")),
                               "kill_at": kill_at}},
            ],
        },
        "model": {
            "model": {"tokenizer": str(root / "tokenizer"), "decoder": "tiny",
                      "decoder_options": {"attention": "sdpa"}, "encoder": {"model_name": TINY_CLIP}},
            "stage": {"train": ["projector", "decoder"], "lr": {"projector": 1e-3, "decoder": 1e-3}, "warmup_steps": 2},
            "export_dir": export_dir,
        },
        "data": {"train": {"sources": sources, "max_tokens": 160, "rows_per_batch": 2, "shuffle_buffer": 10,
                           "pack_buffer": 4, "max_skip_fraction": None, **data_options},
                 "num_workers": num_workers},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "multimodal.cli", "fit", "--config", str(path)]
    if ckpt_path:
        command += ["--ckpt_path", ckpt_path]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"fit failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result.returncode


def steps(root: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (root / f"{name}.jsonl").read_text().splitlines()]


def test_two_ddp_ranks_resume_exactly_from_a_mid_epoch_checkpoint(root):
    """DDP on CPU (gloo), 2 ranks x 2 workers, resampled with a fixed epoch length (the rule under
    DDP): the checkpoint holds both ranks' positions, and resuming from one saved mid-epoch gives
    each rank exactly the samples and losses of the uninterrupted run."""
    data = {"resampled": True, "batches_per_epoch": 8}
    fit(root, "ddp", max_steps=12, devices=2, keep_every_checkpoint=True, **data)
    checkpoint = next((root / "ddp" / "checkpoints").glob("*step=6.ckpt"))
    saved = torch.load(checkpoint, weights_only=True, map_location="cpu")
    positions = [rank["position"] for rank in saved["data_position"]]
    assert len(positions) == 2 and positions[0]["states"] != positions[1]["states"]
    fit(root, "ddp-resumed", max_steps=12, devices=2, ckpt_path=str(checkpoint), **data)
    for rank in range(2):
        whole, resumed = steps(root, f"ddp.rank{rank}"), steps(root, f"ddp-resumed.rank{rank}")
        assert [s["keys"] for s in resumed] == [s["keys"] for s in whole[6:]], rank
        for mine, reference in zip(resumed, whole[6:]):
            assert mine["loss"] == pytest.approx(reference["loss"], rel=1e-6, abs=1e-7)
    assert steps(root, "ddp.rank0")[0]["keys"] != steps(root, "ddp.rank1")[0]["keys"]


@pytest.fixture(scope="module")
def root(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    tokenizer.save(root / "tokenizer")
    write_shards(root / "a", num_samples=20, num_shards=2, name="cap")
    with TarWriter(str(root / "a" / "cap-bad.tar")) as writer:
        writer.write({"__key__": "bad_zero_byte", "png": b"", "txt": b"a caption"})
        writer.write({"__key__": "good_x1", "png": image_bytes((10, 20, 30)), "txt": b"a blue square"})
    write_shards(root / "b", num_samples=12, num_shards=2, start=500, name="txt")
    return root


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(root):
    # The uninterrupted run: its first epoch tells how long an epoch is.
    fit(root, "whole", max_steps=40)
    whole = steps(root, "whole")
    epoch_length = sum(1 for step in whole if step["epoch"] == 0)
    assert 6 <= epoch_length < 20 and whole[-1]["epoch"] >= 1
    # Killed after a step in the middle of epoch 1 that is not a checkpoint step.
    kill_at = epoch_length + 5 if (epoch_length + 5) % EVERY else epoch_length + 4
    assert fit(root, "killed", max_steps=40, kill_at=kill_at) == -signal.SIGKILL
    killed = steps(root, "killed")
    assert killed[-1]["step"] == kill_at and killed == whole[:kill_at]
    last = root / "killed" / "checkpoints" / "last.ckpt"
    saved_step = torch.load(last, weights_only=True, map_location="cpu")["global_step"]
    assert saved_step == kill_at - kill_at % EVERY and saved_step > epoch_length  # mid-epoch 1

    fit(root, "resumed", max_steps=40, ckpt_path=str(last))
    resumed = steps(root, "resumed")
    # The same samples in the same order with the same losses: nothing replayed, nothing skipped.
    assert [s["keys"] for s in resumed] == [s["keys"] for s in whole[saved_step:]]
    assert [s["step"] for s in resumed] == [s["step"] for s in whole[saved_step:]]
    for mine, reference in zip(resumed, whole[saved_step:]):
        assert mine["loss"] == pytest.approx(reference["loss"], rel=1e-6, abs=1e-7), mine["step"]
    # And epoch 1, pieced together from the killed run and the resumed one, holds every readable
    # sample exactly once (the zero-byte image is skipped, as in every epoch).
    epoch1 = [k for s in killed[:saved_step] + resumed if s["epoch"] == 1 for row in s["keys"] for k in row]
    epoch0 = [k for s in whole if s["epoch"] == 0 for row in s["keys"] for k in row]
    assert Counter(epoch1) == Counter(epoch0) and max(Counter(epoch0).values()) == 1
    assert len(epoch0) == 20 + 1 + 12 and "bad_zero_byte" not in epoch0
