"""The demo runner's bookkeeping: the machine recorded next to the seconds, and the OpenMP relaunch."""

from __future__ import annotations

import os

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
    runner.relaunch_with_passive_openmp(["demo"])  # returns: the variable is set


def test_relaunch_sets_passive_and_reruns_the_command(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    calls = []
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append(argv))
    runner.relaunch_with_passive_openmp(["demo", "--out", "runs/x", "--seed", "2"])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert calls and calls[0][1:] == ["-m", "multimodal.cli", "demo", "--out", "runs/x", "--seed", "2"]
