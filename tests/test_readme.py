"""The README's quick start runs as written: every code block marked `<!-- readme-test: shell -->`
or `<!-- readme-test: python -->` is run, line by line through the installed `salamandra-vl`
console script (a Python block as a script of its own, in this process), in a working directory that holds what the README
assumes: a demo checkpoint at runs/demo/checkpoint, an image my_image.png, and an exportable
checkpoint of one's own at runs/my-vlm.

The demo checkpoint is made by the demo itself (`run_demo`), with a handful of steps instead of the
five minutes of `make demo`: the same architecture, tokenizer and context (256 tokens), trained too
little to say anything sensible, so the checks are on what the commands print, not on the captions.
"""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lm.tokenizer import train_tokenizer
from multimodal.demo import QUICK, run_demo
from tests.multimodal.tiny import TEXTS, build_tiny_vlm

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = re.compile(r"<!-- readme-test: (shell|python) -->\s*```\w*\n(.*?)```", re.S)
SCRIPT = Path(sys.executable).parent / "salamandra-vl"
# The demo's own pipeline at its smallest: one step per stage, two test images.
TINY_DEMO = dataclasses.replace(QUICK, train_images=40, test_images=2, pretrain_texts=200, rows_per_batch=2,
                                steps={"vision": 1, "pretrain": 1, "stage1": 1, "stage2": 1})


def readme_blocks() -> list[tuple[str, str]]:
    return MARKER.findall(README.read_text())


def test_the_readme_marks_its_quick_start():
    blocks = readme_blocks()
    commands = [line.split() for kind, code in blocks if kind == "shell" for line in code.splitlines() if line.strip()]
    subcommands = {words[words.index("salamandra-vl") + 1] for words in commands}
    assert {"caption", "chat", "info", "export"} <= subcommands
    assert sum(kind == "python" for kind, _ in blocks) >= 2


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """What the README's quick start assumes: the demo's output, an image, a checkpoint of one's own."""
    root = tmp_path_factory.mktemp("readme")
    run_demo(root / "runs" / "demo", config=TINY_DEMO)
    Image.new("RGB", (96, 64), (40, 120, 200)).save(root / "my_image.png")
    # The demo's projector has a slot embedding, which the LLaVA layout cannot hold; a plain MLP can.
    build_tiny_vlm(train_tokenizer(TEXTS, vocab_size=420)).save_pretrained(root / "runs" / "my-vlm")
    # Only what the commands read: the demo's shards and logs are not needed any more.
    shutil.rmtree(root / "runs" / "demo" / "data", ignore_errors=True)
    return root


def run(command: list[str] | str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{SCRIPT.parent}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=cwd, env=env, shell=isinstance(command, str), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def test_the_quick_start_commands_run_as_written(workdir, monkeypatch, capsys):
    assert SCRIPT.exists(), f"the console script is not installed beside {sys.executable}: pip install -e ."
    monkeypatch.chdir(workdir)
    ran = set()
    for kind, code in readme_blocks():
        if kind == "python":
            # In this process (a fresh one would spend seconds importing torch): a script of its own.
            exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
            printed = capsys.readouterr().out.strip()
            assert printed, f"the Python block printed nothing:\n{code}"
            if "stream_chat" in code:
                assert re.search(r"\[(stop|length|context)\]$", printed)
            continue
        for line in filter(str.strip, code.splitlines()):
            result = run(line, workdir)
            command = line.split()[line.split().index("salamandra-vl") + 1]
            ran.add(command)
            if command == "caption":
                assert result.stdout.strip()
            elif command == "chat":
                # One question piped in: its answer, then the end of input ends the chat. The demo's
                # 256-token context is shorter than chat's default --max-new-tokens (256).
                assert result.stdout.startswith("> ") and len(result.stdout.strip()) > 2
                assert "Chat with the model" in result.stderr
                assert "prompt 0 has" not in result.stderr
            elif command == "info":
                info = json.loads(result.stdout)
                assert info["tokens_per_image"] == 16 and info["image_token"] == "<|reserved_token_1|>"
            elif command == "export":
                out = Path(workdir, line.split()[-1])
                assert result.stdout.strip().endswith(str(out.name))
                config = json.loads((out / "config.json").read_text())
                assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert {"caption", "chat", "info", "export"} <= ran
