"""What `salamandra-vl fit` checkpoints by default, and which settings a resume (--ckpt_path) may
change: those it may are honoured (export directory, logger, steps, checkpoint cadence, gradient
checkpointing), those it may not (architecture, optimizer settings, the data layout the saved
position points into) are refused with a message naming each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from multimodal.data.resume import ResumeMismatch
from multimodal.resume_settings import changed, check_data_layout, check_model_settings
from tests.multimodal.data.helpers import write_shards
from tests.multimodal.test_resume_every_step import fit, write_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def config(tokenizer, tmp_path) -> Path:
    tokenizer.save(tmp_path / "tokenizer")
    write_shards(tmp_path / "shards", num_samples=10, num_shards=2)
    return write_config(tmp_path, {"num_workers": 0, "train": {}}, max_steps=4, checkpoint_every=2)


def checkpoints(run: Path) -> list[str]:
    return sorted(path.name for path in (run / "checkpoints").glob("*.ckpt"))


def test_fit_saves_step_checkpoints_and_last_by_default(config, tmp_path):
    fit(config, tmp_path / "default")
    assert checkpoints(tmp_path / "default") == ["epoch=1-step=4.ckpt", "last.ckpt"]  # the newest step one, and last
    fit(config, tmp_path / "all", "--checkpoint.every_n_train_steps", "1", "--checkpoint.save_top_k", "-1")
    assert checkpoints(tmp_path / "all") == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt",
                                             "epoch=1-step=4.ckpt", "last.ckpt"]
    fit(config, tmp_path / "off", "--trainer.enable_checkpointing", "false")
    assert not (tmp_path / "off" / "checkpoints").exists()


def test_a_bad_checkpoint_cadence_is_a_clear_error(config, tmp_path, capsys):
    from multimodal.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), "--checkpoint.every_n_train_steps", "0"])
    assert exit_.value.code == 2 and "every_n_train_steps" in capsys.readouterr().err


def test_a_resume_honours_the_settings_that_may_change(config, tmp_path):
    fit(config, tmp_path / "first", "--checkpoint.save_top_k", "-1")
    checkpoint = tmp_path / "first" / "checkpoints" / "epoch=0-step=2.ckpt"
    steps = fit(config, tmp_path / "second", "--ckpt_path", str(checkpoint), "--trainer.max_steps", "6",
                "--checkpoint.every_n_train_steps", "3", "--checkpoint.save_top_k", "-1",
                "--model.stage.gradient_checkpointing", "true",
                "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                "--trainer.logger.save_dir", str(tmp_path / "logs"), "--trainer.log_every_n_steps", "1")
    assert [s["step"] for s in steps] == [3, 4, 5, 6]
    assert (tmp_path / "second" / "export" / "model.safetensors").exists()  # not in the first run's directory
    assert sorted(path.name for path in (tmp_path / "logs").rglob("*.ckpt")) == [
        "epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt", "last.ckpt"]
    assert list((tmp_path / "logs").rglob("metrics.csv"))


def test_a_resume_refuses_other_model_or_optimizer_settings(config, tmp_path, capsys):
    from multimodal.cli import main

    fit(config, tmp_path / "first")
    capsys.readouterr()
    checkpoint = str(tmp_path / "first" / "checkpoints" / "last.ckpt")
    argv = ["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "second"),
            "--ckpt_path", checkpoint]
    assert main([*argv, "--model.model.image_token", "<|reserved_token_2|>", "--model.stage.warmup_steps", "5"]) == 2
    error = capsys.readouterr().err
    assert "model.image_token" in error and "stage.warmup_steps" in error and "'<|reserved_token_2|>'" in error
    assert not (tmp_path / "second").exists()


def test_a_resume_refuses_another_data_layout_unless_the_data_starts_afresh(config, tmp_path, capsys):
    from multimodal.cli import main

    fit(config, tmp_path / "first")
    capsys.readouterr()
    checkpoint = str(tmp_path / "first" / "checkpoints" / "epoch=1-step=4.ckpt")
    argv = ["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "second"),
            "--trainer.max_steps", "5", "--ckpt_path", checkpoint, "--data.train.max_tokens", "200"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "max_tokens: the checkpoint has 160, this run asks for 200" in error and "resume: false" in error
    assert not (tmp_path / "second" / "steps.jsonl").exists()
    assert main([*argv, "--data.train.resume", "false"]) == 0
    steps = [json.loads(line) for line in (tmp_path / "second" / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [5]


def test_changed_compares_nested_settings_and_treats_tuples_as_lists():
    saved = {"model": {"encoder": {"model_name": "a"}, "betas": [0.9, 0.95]}, "export_dir": "x"}
    given = {"model": {"encoder": {"model_name": "b"}, "betas": (0.9, 0.95)}, "export_dir": "y"}
    assert changed(given, saved) == {"export_dir": ("x", "y"), "model.encoder.model_name": ("a", "b")}
    check_model_settings({"export_dir": "y", "stage": {"compile": True}}, {"export_dir": "x", "stage": {"compile": False}})
    with pytest.raises(ResumeMismatch, match="model.encoder.model_name"):
        check_model_settings(given, saved)
    check_data_layout({"shards": "a", "resume": True, "max_skip_fraction": 0.5}, {"shards": "a", "resume": False})
    # trim_rows only changes how far rows are padded (and checkpoints older than it do not have it).
    check_data_layout({"shards": "a", "trim_rows": True}, {"shards": "a"})
    with pytest.raises(ResumeMismatch, match="shards"):
        check_data_layout({"shards": "b"}, {"shards": "a"})
