"""The serving benchmark runs end to end on a tiny saved model (no timing is checked): both servers
answer every client, and the batched and unbatched answers are compared."""

import importlib.util
from pathlib import Path

from lm.tokenizer import train_tokenizer
from tests.multimodal.tiny import TEXTS, build_tiny_vlm

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve.py"


def test_serve_benchmark_runs(tmp_path):
    build_tiny_vlm(train_tokenizer(TEXTS, vocab_size=420)).save_pretrained(tmp_path / "tiny")
    spec = importlib.util.spec_from_file_location("serve_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--checkpoint", str(tmp_path / "tiny"), "--clients", "6", "--max-batch", "4",
                          "--max-tokens", "4", "--rounds", "1"])
    assert result["speedup"] > 0 and result["batched_requests_per_s"] > 0
    assert result["answers_equal"] == "6/6"
    assert result["batched_latency_p95_s"] >= result["batched_latency_p50_s"] > 0
