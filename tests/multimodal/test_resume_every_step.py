"""Exact resume from a checkpoint taken after any step, through the command line (`salamandra-vl fit`,
run in this process): an uninterrupted run saves a checkpoint after every step across at least two
epoch boundaries; a resume from each of them must train the same samples in the same order with
bit-identical losses, in the same Lightning epochs, and end with bit-identical weights. Covered:
checkpoints in the middle of an epoch, on its last Batch (the epoch ended by batches_per_epoch, or
by the data running out), on the first Batch of the next, and Lightning's own end-of-epoch
checkpoints; read-once and resampled data; 0 and 2 DataLoader workers. Each resume also writes its
export where its own --model.export_dir says, and nowhere else."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import pytest
import yaml
from safetensors.torch import load_file

from multimodal.cli import main
from tests.multimodal.data.helpers import write_shards
from tests.multimodal.tiny import TINY_CLIP


class StepRecorder(L.Callback):
    """Appends each trained step (its sample keys, loss and Lightning epoch) to steps.jsonl in the
    run's trainer.default_root_dir."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        record = {"step": trainer.global_step, "epoch": trainer.current_epoch, "keys": batch.keys,
                  "loss": float(outputs["loss"])}
        Path(trainer.default_root_dir).mkdir(parents=True, exist_ok=True)  # a logger may write elsewhere
        with open(Path(trainer.default_root_dir) / "steps.jsonl", "a") as file:
            file.write(json.dumps(record) + "\n")


CASES = {
    # The epoch ends when the data runs out; Lightning's end-of-epoch checkpoints are tested too.
    "read_once-0_workers": {"num_workers": 0, "train": {}, "epoch_end_checkpoints": True},
    "read_once-2_workers": {"num_workers": 2, "train": {}, "max_steps": 9},  # epochs of 4 steps
    "read_once-batches_per_epoch-0_workers": {"num_workers": 0, "train": {"batches_per_epoch": 3}},
    "resampled-batches_per_epoch-2_workers": {"num_workers": 2,
                                                "train": {"resampled": True, "batches_per_epoch": 3}},
}
MAX_STEPS = 7  # epochs of 3 steps: two epoch boundaries


def write_config(root: Path, case: dict, max_steps: int = MAX_STEPS, checkpoint_every: int = 1) -> Path:
    callbacks = [{"class_path": f"{__name__}.StepRecorder"}]
    if case.get("epoch_end_checkpoints"):
        # The config's own checkpoints replace salamandra-vl's default ones.
        callbacks += [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"every_n_train_steps": 1, "save_top_k": -1}},
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"every_n_epochs": 1, "save_top_k": -1,
                           "save_on_train_epoch_end": True, "filename": "end-{epoch}-{step}"}},
        ]
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": max_steps, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
                    "callbacks": callbacks},
        "checkpoint": {"every_n_train_steps": checkpoint_every, "save_top_k": -1 if checkpoint_every == 1 else 1},
        "model": {
            "model": {"tokenizer": str(root / "tokenizer"), "decoder": "tiny",
                      "decoder_options": {"attention": "sdpa"}, "encoder": {"model_name": TINY_CLIP}},
            "stage": {"train": ["projector", "decoder"], "lr": {"projector": 1e-3, "decoder": 1e-3},
                      "warmup_steps": 2},
        },
        "data": {"train": {"shards": sorted(str(p) for p in (root / "shards").glob("*.tar")), "max_tokens": 160,
                           "rows_per_batch": 2, "shuffle_buffer": 6, "pack_buffer": 3, **case["train"]},
                 "num_workers": case["num_workers"]},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(config: Path, run: Path, *extra: str) -> list[dict]:
    argv = ["fit", "--config", str(config), "--trainer.default_root_dir", str(run),
            "--model.export_dir", str(run / "export"), *extra]
    assert main(argv) == 0
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", CASES)
def test_resume_from_every_step_equals_the_uninterrupted_run(name, tokenizer, tmp_path):
    case = CASES[name]
    tokenizer.save(tmp_path / "tokenizer")
    write_shards(tmp_path / "shards", num_samples=10, num_shards=2)
    max_steps = case.get("max_steps", MAX_STEPS)
    config = write_config(tmp_path, case, max_steps=max_steps)
    whole = fit(config, tmp_path / "whole")
    assert [s["step"] for s in whole] == list(range(1, max_steps + 1))
    epochs = [s["epoch"] for s in whole]
    assert epochs[-1] >= 2, f"the run should cross two epoch boundaries: {epochs}"
    last_of_epoch = [s["step"] for s, following in zip(whole, whole[1:]) if following["epoch"] != s["epoch"]]

    checkpoints = {}
    for path in (tmp_path / "whole" / "checkpoints").glob("*.ckpt"):
        if path.name != "last.ckpt":
            checkpoints[path.name] = path
    step_checkpoints = [key for key in checkpoints if not key.startswith("end-")]
    assert len(step_checkpoints) == max_steps  # one per step, by the default checkpoints or the config's
    if case.get("epoch_end_checkpoints"):
        assert sum(key.startswith("end-") for key in checkpoints) >= 2
    final = load_file(tmp_path / "whole" / "export" / "model.safetensors")
    whole_export = digest(tmp_path / "whole" / "export" / "model.safetensors")

    for index, (key, checkpoint) in enumerate(sorted(checkpoints.items())):
        step = int(key.split("step=")[1].removesuffix(".ckpt"))
        if step == max_steps:
            continue
        run = tmp_path / f"resumed-{index}"
        resumed = fit(config, run, "--ckpt_path", str(checkpoint))
        where = f"{name}: resumed from {key} (the epochs' last steps: {last_of_epoch})"
        assert [s["step"] for s in resumed] == list(range(step + 1, max_steps + 1)), where
        assert [s["keys"] for s in resumed] == [s["keys"] for s in whole[step:]], where
        assert [s["epoch"] for s in resumed] == epochs[step:], where
        assert [s["loss"] for s in resumed] == [s["loss"] for s in whole[step:]], where
        weights = load_file(run / "export" / "model.safetensors")
        assert weights.keys() == final.keys()
        differing = [k for k in final if not weights[k].equal(final[k])]
        assert not differing, f"{where}: final weights differ in {differing[:5]}"
    assert digest(tmp_path / "whole" / "export" / "model.safetensors") == whole_export
