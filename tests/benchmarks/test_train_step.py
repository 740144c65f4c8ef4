"""The training-step benchmark runs end to end on a tiny model (no timing is checked), and both
sides compute the same loss and gradients on the same samples."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_step.py"
TINY = ["--image-size", "32", "--patch-size", "8", "--vision-width", "64", "--vision-layers", "2",
        "--vocab-size", "1024", "--d-model", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--d-ff", "160",
        "--max-tokens", "160", "--rows", "2", "--hf-batch-size", "4", "--samples", "8", "--warmup", "1",
        "--matmul-n", "128"]


def test_train_step_runs_and_both_sides_compute_the_same_loss():
    spec = importlib.util.spec_from_file_location("train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(TINY)
    for name in ("speedup", "ours_tokens_per_s", "hf_tokens_per_s", "params", "real_tokens", "our_steps", "hf_steps"):
        assert result[name] > 0, name
    assert 0 <= result["our_padding_waste"] < 1 and 0 <= result["hf_padding_share"] < 1
    assert result["params"] == result["hf_params"] - 2 * 64  # HF's tower adds an identity post-layernorm
    assert result["loss_diff"] <= 5e-6 * result["check_loss"]  # relative: other summation orders
    assert result["head_grad_diff"] <= 1e-5 * result["head_grad_max"]
    assert result["projector_grad_diff"] < 1e-6
