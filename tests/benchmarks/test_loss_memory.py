"""The loss-memory benchmark runs end to end at a small size: both variants in their own
processes, the same loss and gradients, and ours needs less memory (no exact figure is checked)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "loss_memory.py"


def test_loss_memory_runs_and_the_variants_agree():
    spec = importlib.util.spec_from_file_location("loss_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Logits of 64 MB for the full variant: far above allocator noise, a second of compute.
    result = module.main(["--vocab-size", "32000", "--hidden-size", "64", "--tokens", "512",
                          "--chunk-size", "64", "--dtype", "float32", "--device", "cpu", "--threads", "1"])
    for name in ("memory_ratio", "ours_peak_gib", "full_peak_gib", "loss_ours", "loss_full"):
        assert result[name] > 0, name
    assert result["memory_ratio"] < 1
    # Relative to the loss (~10.4 here): the variants sum 512 terms in other orders.
    assert result["loss_diff"] <= 5e-6 * result["loss_full"]
    assert result["hidden_grad_max_diff"] <= 1e-5 * result["hidden_grad_max"]
    assert result["weight_grad_max_diff"] <= 1e-5 * result["weight_grad_max"]
