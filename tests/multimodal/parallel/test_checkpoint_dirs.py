"""Sharded checkpoint directories: written under a temporary name and renamed whole (a save that dies
leaves the previous checkpoint as it was, and a hidden leftover that the next save removes), found
by the job scripts only when complete."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from multimodal.parallel import (META_FILE, is_checkpoint_dir, partial_name, remove_stale_partial_dirs,
                                 replace_directory)

ROOT = Path(__file__).resolve().parents[3]


def checkpoint(path: Path, content: str) -> Path:
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_text(content)
    (path / META_FILE).write_text(content)
    return path


def test_a_finished_save_replaces_the_old_checkpoint_in_one_rename(tmp_path):
    old = checkpoint(tmp_path / "last.ckpt", "old")
    new = checkpoint(partial_name(tmp_path / "last.ckpt", "abc"), "new")
    assert new.name == ".last.ckpt.partial-abc"
    replace_directory(new, old)
    assert (old / "__0_0.distcp").read_text() == "new" and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the old one moved aside, then removed


def test_a_save_that_died_leaves_the_previous_checkpoint_and_a_hidden_leftover(tmp_path):
    kept = checkpoint(tmp_path / "epoch=0-step=3.ckpt", "whole")
    dead = partial_name(tmp_path / "epoch=0-step=6.ckpt", "dead")
    dead.mkdir()
    (dead / "__0_0.distcp").write_text("half")  # killed before meta.pt: never a checkpoint
    assert is_checkpoint_dir(kept) and not is_checkpoint_dir(dead)
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["epoch=0-step=3.ckpt"]
    assert newest(tmp_path) == str(kept)
    live = partial_name(tmp_path / "epoch=0-step=9.ckpt", "live")
    live.mkdir()
    assert remove_stale_partial_dirs(tmp_path, keep=live) == [str(dead)]
    assert live.exists() and kept.exists()


def newest(directory: Path) -> str:
    # The job scripts run in the project's environment (its python reads a config's checkpoint.dirpath).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / "newest-checkpoint.sh"), str(directory)],
                            capture_output=True, text=True, check=True, env=env)
    return result.stdout.strip()


def test_the_job_script_resumes_from_the_highest_complete_step(tmp_path):
    assert newest(tmp_path / "none") == "" and newest(tmp_path) == ""
    checkpoint(tmp_path / "epoch=0-step=9.ckpt", "a")
    checkpoint(tmp_path / "epoch=1-step=12.ckpt", "b")
    (tmp_path / "epoch=1-step=15.ckpt").mkdir()  # incomplete: no meta.pt
    checkpoint(partial_name(tmp_path / "epoch=2-step=18.ckpt", "x"), "c")
    (tmp_path / "last.ckpt").symlink_to(tmp_path / "epoch=0-step=9.ckpt")
    assert newest(tmp_path) == str(tmp_path / "epoch=1-step=12.ckpt")
    config = tmp_path / "run.yaml"
    config.write_text(f"checkpoint:\n  dirpath: {tmp_path}\n")
    assert newest(config) == str(tmp_path / "epoch=1-step=12.ckpt")


@pytest.mark.parametrize("script", ["train.sbatch", "train-torchrun.sbatch", "newest-checkpoint.sh"])
def test_job_scripts_are_valid_bash(script):
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "slurm" / script)], check=True)
