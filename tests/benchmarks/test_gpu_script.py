"""benchmarks/gpu.py runs every section end to end on tiny shapes on CPU (no timing is checked).

The GPU run must work the first time it meets a GPU, so everything but the CUDA-only parts (the
xformers kernel, memory statistics, synchronisation) runs here: the 2B shapes differ only in size.
"""

import importlib.util
import json
import sys
from pathlib import Path

import torch
import torch._dynamo

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"
SECTIONS = ["env", "matmul", "setup", "attention", "train_ours", "export_hf", "train_hf", "decode",
            "train_ours_nockpt", "train_hf_nockpt", "train_ours_compiled", "summary"]


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tiny_run_prints_every_section(capsys):
    module = load_script()
    threads = torch.get_num_threads()
    try:
        # The "eager" backend runs the Dynamo capture of compile_blocks without code generation.
        summary = module.main(["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--decode-tokens", "3",
                               "--compile", "--compile-backend", "eager"])
    finally:
        torch._dynamo.reset()
    assert torch.get_num_threads() == threads  # the tiny run's single thread does not leak out
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    by_section = {line["section"]: line for line in lines}
    assert [line["section"] for line in lines] == SECTIONS
    assert summary == by_section["summary"]
    assert summary["failed"] == [] and summary["skipped"] == [], lines
    for name in ("train_ours", "train_hf", "train_ours_nockpt", "train_hf_nockpt", "train_ours_compiled"):
        record = by_section[name]
        assert record["real_tokens_per_s"] > 0 and record["tflops"] > 0, record
        assert record["loss_last"] == record["loss_last"]  # not NaN
    # Both sides trained on the same samples: same useful work, same first loss (same weights).
    assert abs(by_section["train_ours"]["loss_first"] - by_section["train_hf"]["loss_first"]) < 1e-3
    assert by_section["train_hf"]["padding_waste"] > by_section["setup"]["padding_waste"] >= 0
    attention = by_section["attention"]
    assert attention["sdpa_ms"] > 0 and attention["xformers"] == "skipped: no CUDA"
    decode = by_section["decode"]
    assert decode["same_tokens"] and decode["ours_tokens_per_s"] > 0 and decode["hf_tokens_per_s"] > 0
    assert summary["speedup"] > 0 and summary["measured_peak_tflops"] > 0


def test_flop_count_follows_performance_md():
    module = load_script()
    flops = module.FlopModel(n_decoder=1000, layers=2, d_model=8, n_vision=100, vision_layers=3, vision_width=4,
                             vision_tokens=5, n_projector=10, image_tokens=5)
    # Two samples of 7 and 3 tokens, one image: decoder 6N per token + 12 L d s^2 per sample,
    # trained tower 3 (2 N_v + 4 L_v d_v T_v) per image token, projector 6 N_p per image token.
    decoder = 6 * 1000 * 10 + 12 * 2 * 8 * (49 + 9)
    vision = 3 * (2 * 100 + 4 * 3 * 4 * 5) * 5
    assert flops.training_flops([7, 3], images=1) == decoder + vision + 6 * 10 * 5
    assert flops.training_flops([7, 3], images=1, causal=True) == decoder - 6 * 2 * 8 * 58 + vision + 300
