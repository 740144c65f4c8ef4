import json
import subprocess
import sys

from multimodal.cli import main


def test_info_describes_a_saved_checkpoint(vlm, tmp_path, capsys):
    vlm.save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tokens_per_image"] == 16 and info["image_token"] == "<|reserved_token_1|>"
    assert info["parameters"]["projector"] == sum(p.numel() for p in vlm.projector.parameters())


def test_info_on_a_wrong_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "multimodal.cli", "--help"], capture_output=True, text=True, check=True)
    assert "info" in out.stdout
