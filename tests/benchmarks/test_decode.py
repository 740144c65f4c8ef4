"""The decoding benchmark runs end to end at tiny sizes and both sides produce the same tokens
(no timing is checked)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decode.py"
TINY = ["--image-size", "32", "--patch-size", "8", "--vision-layers", "2", "--vision-width", "64",
        "--vocab", "512", "--layers", "2", "--d-model", "64", "--heads", "4", "--kv-heads", "2", "--d-ff", "160"]


def test_decode_benchmark_runs_and_tokens_match():
    spec = importlib.util.spec_from_file_location("decode_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--batch-sizes", "1", "3", "--new-tokens", "6", "--warmup", "0", "--repeats", "1", *TINY])
    assert result["same_tokens"] is True
    for batch in (1, 3):
        assert result[f"same_tokens_batch{batch}"] is True
        for name in ("ours_tokens_per_s", "hf_tokens_per_s", "ours_decode_tokens_per_s", "hf_decode_tokens_per_s",
                     "ours_ttft_ms", "hf_ttft_ms", "speedup", "end_to_end_speedup", "ttft_speedup",
                     "linear_floor_ms_per_step", "speedup_bound"):
            assert result[f"{name}_batch{batch}"] > 0, name
    assert result["speedup"] == min(result["speedup_batch1"], result["speedup_batch3"])
    assert result["new_tokens"] == 6 and result["image_tokens"] == 16
