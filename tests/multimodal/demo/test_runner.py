"""The demo runner's bookkeeping: the machine recorded next to the seconds, and the OpenMP relaunch."""

from __future__ import annotations

import os

from multimodal import cli
from multimodal.demo import runner


def test_machine_info_records_cpu_cores_and_load():
    machine = runner.machine_info()
    assert machine["cpu"] and isinstance(machine["cpu"], str)
    assert machine["cores"] >= 1 and 1 <= machine["usable_cores"] <= machine["cores"]
    if hasattr(os, "getloadavg"):
        assert len(machine["load_average_at_start"]) == 3
    assert machine["torch_threads"] >= 1


def test_relaunch_leaves_a_chosen_wait_policy_alone(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setattr(os, "execv", lambda *args: (_ for _ in ()).throw(AssertionError("relaunched")))
    cli.relaunch_with_passive_openmp(["demo"])  # returns: the variable is set


def test_relaunch_sets_passive_and_reruns_the_command(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    calls = []
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append(argv))
    cli.relaunch_with_passive_openmp(["demo", "--out", "runs/x", "--seed", "2"])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert calls and calls[0][1:] == ["-m", "multimodal.cli", "demo", "--out", "runs/x", "--seed", "2"]


def test_pretraining_alongside_the_vision_tower_gives_the_same_model(tmp_path):
    """The decoder pre-trained in a second process while the tower trains, the tower's weights put
    in afterwards: byte for byte the checkpoints of pre-training first and the tower then."""
    import dataclasses

    from multimodal.demo import QUICK, run_demo

    tiny = dataclasses.replace(QUICK, train_images=40, test_images=2, pretrain_texts=200, rows_per_batch=2,
                               steps={"vision": 2, "pretrain": 2, "stage1": 1, "stage2": 1})
    sequential = run_demo(tmp_path / "sequential", seed=0, config=tiny)
    alongside = run_demo(tmp_path / "alongside", seed=0, config=dataclasses.replace(tiny, pretrain_alongside=True))
    assert "pretrain_wait" in alongside["seconds"] and "pretrain_wait" not in sequential["seconds"]
    for name in ("pretrain", "stage1", "checkpoint"):
        assert (tmp_path / "sequential" / name / "model.safetensors").read_bytes() == \
            (tmp_path / "alongside" / name / "model.safetensors").read_bytes(), name
