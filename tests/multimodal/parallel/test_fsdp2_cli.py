"""`salamandra-vl fit --trainer.devices 2 --trainer.strategy fsdp2` on 2 CPU ranks (gloo), through the
real command line: sharded checkpoint directories every 3 steps, a run SIGKILLed mid-epoch on every
rank and resumed from its newest complete checkpoint gives each rank the samples and losses of the
uninterrupted run, and the same final weights; `salamandra-vl consolidate` turns a sharded
checkpoint into the save_pretrained weights the run exported, which `caption` then uses."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from multimodal.cli import main
from multimodal.parallel import META_FILE
from tests.multimodal.test_resume_training import fit, root, steps  # noqa: F401 (root: a fixture)

DATA = {"resampled": True, "batches_per_epoch": 4}  # the rule with several ranks; 9 steps cross 2 epochs
STEPS = 9


def checkpoints(root, name):
    return sorted((root / name / "checkpoints").glob("*step=*.ckpt"), key=lambda p: int(p.stem.split("step=")[1]))


@pytest.fixture(scope="module")
def runs(root):  # noqa: F811
    options = dict(devices=2, strategy="fsdp2", num_workers=1, keep_every_checkpoint=True, **DATA)
    fit(root, "whole", max_steps=STEPS, export_dir=str(root / "whole-export"), **options)
    assert fit(root, "killed", max_steps=STEPS, kill_at=7, **options) == -9
    newest = checkpoints(root, "killed")[-1]
    fit(root, "resumed", max_steps=STEPS, ckpt_path=str(newest), export_dir=str(root / "resumed-export"), **options)
    return newest


def test_sharded_checkpoints_are_directories_written_whole(root, runs):  # noqa: F811
    saved = checkpoints(root, "whole")
    assert [p.name for p in saved] == ["epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt", "epoch=2-step=9.ckpt"]
    for path in saved:
        assert path.is_dir() and (path / META_FILE).is_file()
        assert sorted(p.name for p in path.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert runs.name == "epoch=1-step=6.ckpt"
    assert not list((root / "whole" / "checkpoints").glob(".*"))  # no temporary directory left


def test_a_killed_run_resumes_exactly(root, runs):  # noqa: F811
    for rank in range(2):
        whole, resumed = steps(root, f"whole.rank{rank}"), steps(root, f"resumed.rank{rank}")
        assert len(whole) == STEPS
        assert [s["keys"] for s in resumed] == [s["keys"] for s in whole[6:]], rank
        for mine, reference in zip(resumed, whole[6:]):
            assert mine["step"] == reference["step"] and mine["epoch"] == reference["epoch"]
            assert mine["loss"] == pytest.approx(reference["loss"], rel=1e-6, abs=1e-7)
    assert steps(root, "whole.rank0")[0]["keys"] != steps(root, "whole.rank1")[0]["keys"]
    whole, resumed = (load_file(root / f"{name}-export" / "model.safetensors") for name in ("whole", "resumed"))
    assert whole.keys() == resumed.keys()
    for name, tensor in whole.items():
        assert float((resumed[name] - tensor).norm()) <= 1e-6 * float(tensor.norm()) + 1e-12, name


def test_consolidate_gives_the_exported_weights_and_caption_runs(root, runs, capsys):  # noqa: F811
    final = checkpoints(root, "whole")[-1]
    assert main(["consolidate", str(final), str(root / "consolidated")]) == 0
    exported, consolidated = (load_file(root / name / "model.safetensors") for name in ("whole-export", "consolidated"))
    assert exported.keys() == consolidated.keys()
    for name, tensor in exported.items():
        assert torch.equal(consolidated[name], tensor), name
    Image.new("RGB", (40, 30), (200, 30, 30)).save(root / "red.png")
    assert main(["caption", "--checkpoint", str(root / "consolidated"), "--max-new-tokens", "4",
                 str(root / "red.png")]) == 0
    assert capsys.readouterr().out.strip()
    # Not a complete checkpoint: a clear error, nothing written.
    assert main(["consolidate", str(root), str(root / "nothing")]) == 2
    assert "not a complete sharded checkpoint" in capsys.readouterr().err and not (root / "nothing").exists()

