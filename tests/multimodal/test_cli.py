import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from multimodal.cli import main
from tests.multimodal.data.helpers import write_shards
from tests.multimodal.tiny import TINY_CLIP

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_info_describes_a_saved_checkpoint(vlm, tmp_path, capsys):
    vlm.save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tokens_per_image"] == 16 and info["image_token"] == "<|reserved_token_1|>"
    assert info["parameters"]["projector"] == sum(p.numel() for p in vlm.projector.parameters())


def test_info_on_a_wrong_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_caption_prints_one_caption_per_image(vlm, tmp_path, capsys):
    vlm.save_pretrained(tmp_path / "ckpt")
    paths = []
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (48, 40), colour).save(paths[-1])
    assert main(["caption", "--checkpoint", str(tmp_path / "ckpt"), "--language", "ca", "--max-new-tokens", "5",
                 *paths]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    expected = vlm.caption([Image.open(p).convert("RGB") for p in paths], language="ca", max_new_tokens=5)
    assert lines == [f"{p}\t{c}" for p, c in zip(paths, expected)]
    assert main(["caption", "--checkpoint", str(tmp_path / "ckpt"), str(tmp_path / "missing.png")]) == 2


def test_fit_from_a_yaml_config(tokenizer, tmp_path, monkeypatch, recwarn):
    tokenizer.save(tmp_path / "tokenizer")
    shards, _ = write_shards(tmp_path / "shards", num_samples=16, num_shards=1)
    config = {
        "trainer": {"accelerator": "cpu", "max_steps": 3, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "limit_val_batches": 0, "default_root_dir": str(tmp_path)},
        "model": {
            "model": {"tokenizer": str(tmp_path / "tokenizer"), "decoder": "tiny", "encoder": {"model_name": TINY_CLIP}},
            "stage": {"train": ["projector"], "lr": {"projector": 1e-3}},
            "export_dir": str(tmp_path / "out"),
        },
        "data": {"train": {"shards": shards, "max_tokens": 128, "rows_per_batch": 2}, "num_workers": 0},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    # As the console script runs it: the command line in sys.argv, main() without arguments.
    monkeypatch.setattr(sys, "argv", ["salamandra-vl", "fit", "--config", str(tmp_path / "config.yaml")])
    assert main() == 0
    # LightningCLI warns when given args as well as a command line: main() leaves sys.argv to it.
    assert not [str(w.message) for w in recwarn if "LightningCLI's args parameter" in str(w.message)]
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert (tmp_path / "config.yaml").exists()  # LightningCLI's record of the run, beside its outputs


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    from multimodal.training import ShardDataModule, VLMModule
    from multimodal.training_cli import TrainingCLI

    cli = TrainingCLI(VLMModule, ShardDataModule, run=False, args=["--config", str(path)],
                      trainer_defaults={"logger": False})
    train = cli.datamodule.train_config
    assert cli.model.stage.train and (train.shards or train.sources)
    if "onevision" in path.name:  # OneVision's recipe: the 26th block, tanh GELU; tiles from stage 1.5 on
        assert cli.model.spec.encoder["feature_layer"] == -2 and cli.model.spec.encoder["activation"] == "gelu_tanh"
        layout = (cli.model.spec.layout or {}).get("kind", "fixed")
        assert layout == ("fixed" if path.name.endswith("-stage1.yaml") else "anyres")
        assert (cli.model.spec.video_token is not None) == ("stage2-ov" in path.name)
    if path.name.endswith("-fsdp.yaml"):  # sharded over 8 GPUs, bf16 policy, equal Batch counts per rank
        from multimodal.parallel import FSDP2Strategy

        strategy = cli.trainer.strategy
        assert isinstance(strategy, FSDP2Strategy) and strategy.param_dtype == "bf16"
        assert cli.trainer.precision == "32-true" and train.resampled and train.batches_per_epoch
        assert cli.model.stage.gradient_checkpointing


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "multimodal.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("fit", "validate", "demo", "caption", "chat", "info"):
        assert command in out.stdout
