"""The decoding benchmark runs end to end at tiny sizes and all sides produce the same tokens
(no timing is checked). Our compiled path compiles with the "aot_eager" backend here (inductor
takes tens of seconds per batch size even at these sizes); the benchmark itself uses inductor."""

import importlib.util
from pathlib import Path

import pytest

from lm import decode

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decode.py"
TINY = ["--image-size", "32", "--patch-size", "8", "--vision-layers", "2", "--vision-width", "64",
        "--vocab", "512", "--layers", "2", "--d-model", "64", "--heads", "4", "--kv-heads", "2", "--d-ff", "160"]


@pytest.mark.parametrize("compile", [True, False])
def test_decode_benchmark_runs_and_tokens_match(monkeypatch, compile):
    monkeypatch.setattr(decode, "COMPILE_BACKEND", "aot_eager")
    spec = importlib.util.spec_from_file_location("decode_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    flag = "--compile" if compile else "--no-compile"
    batches = ["1", "3"] if compile else ["2"]
    result = module.main(["--batch-sizes", *batches, "--new-tokens", "6", "--warmup", "0", "--repeats", "1", flag, *TINY])
    assert result["same_tokens"] is True
    names = ["ours_tokens_per_s", "hf_tokens_per_s", "ours_decode_tokens_per_s", "hf_decode_tokens_per_s",
             "ours_ttft_ms", "hf_ttft_ms", "speedup", "end_to_end_speedup", "ttft_speedup",
             "linear_floor_ms_per_step", "speedup_bound"]
    eager = ["ours_eager_tokens_per_s", "ours_eager_decode_tokens_per_s", "ours_eager_ttft_ms", "ours_eager_speedup",
             "compile_s"]
    for batch in map(int, batches):
        assert result[f"same_tokens_batch{batch}"] is True
        for name in names + (eager if compile else []):
            assert result[f"{name}_batch{batch}"] > 0, name
        assert result.get(f"ours_eager_same_tokens_batch{batch}", compile) is compile
        if compile:
            assert result[f"plan_batch{batch}"] in {"frozen", "onednn", "column_major", "eager"}
        else:
            assert f"ours_eager_speedup_batch{batch}" not in result and f"compile_s_batch{batch}" not in result
    assert result["speedup"] == min(result[f"speedup_batch{b}"] for b in batches)
    assert result["new_tokens"] == 6 and result["image_tokens"] == 16
    assert result["ours"] == ("compiled decoding steps (compile=True)" if compile else "eager")
    machine = result["machine"]
    assert machine["cpu_model"] and machine["cpu_capability"] and isinstance(machine["vector_extensions"], list)
