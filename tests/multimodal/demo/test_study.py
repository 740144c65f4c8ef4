"""The fidelity study runs end to end on a tiny configuration: both arms start from the same stage-1
export, train the same steps on their own data (English captions alone; mixed with text-only chats
by weight), and are scored per language; study.json and fidelity.png are written."""

from __future__ import annotations

import dataclasses
import json

from PIL import Image
from safetensors.torch import load_file

from multimodal.cli import main
from multimodal.demo import QUICK
from multimodal.demo.study import ARMS, run_fidelity_study

TINY = dataclasses.replace(QUICK, train_images=40, test_images=3, pretrain_texts=200, rows_per_batch=2,
                           steps={"vision": 2, "pretrain": 2, "stage1": 1, "stage2": 3})


def test_the_study_trains_both_arms_from_one_start_and_scores_each_language(tmp_path):
    study = run_fidelity_study(tmp_path, seed=0, config=TINY, text_weight=0.5)
    assert study == json.loads((tmp_path / "study.json").read_text())
    assert set(study["arms"]) == set(ARMS) and study["text_weight"] == 0.5 and study["stage2_steps"] == 3
    for arm in ARMS:
        per_language = study["arms"][arm]["per_language"]
        assert set(per_language) == {"en", "es", "ca"}
        for figures in per_language.values():
            assert 0 <= figures["language_fidelity"] <= 1 and 0 <= figures["exact_match"] <= 1
        rows = [json.loads(line) for line in (tmp_path / f"predictions-{arm}.jsonl").read_text().splitlines()]
        assert len(rows) == 3 * 3
    # The same start, different data: the two arms' weights differ after stage 2.
    a, b = (load_file(tmp_path / arm / "model.safetensors") for arm in ARMS)
    assert any(not a[name].equal(b[name]) for name in a)
    with Image.open(tmp_path / "fidelity.png") as image:
        assert image.width > 300 and image.height > 200


def test_the_demo_command_takes_the_study(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # no relaunch
    monkeypatch.setattr("multimodal.demo.study.run_fidelity_study", lambda out, seed: calls.append((out, seed)))
    assert main(["demo", "--study", "fidelity", "--seed", "3"]) == 0
    assert calls == [("runs/fidelity", 3)]
