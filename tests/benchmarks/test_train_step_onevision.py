"""The OneVision-layout training-step benchmark runs end to end on a tiny model at OneVision's
geometry (no timing is checked), and both sides compute the same loss and gradients on the same
mixed-size samples."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_step_onevision.py"
# A 32-wide tower at 384 px / patch 14 (729 tokens a view: the layout's real token counts), a tiny
# decoder; 4 samples (one with two images), rows of 4,096 tokens, 2 samples a Hugging Face step.
TINY = ["--vision-width", "32", "--vision-layers", "3", "--vocab-size", "1024", "--d-model", "64", "--layers", "2",
        "--heads", "4", "--kv-heads", "2", "--d-ff", "160", "--max-tokens", "4096", "--rows", "1",
        "--hf-batch-size", "2", "--samples", "4", "--two-image-share", "0.25", "--matmul-n", "128"]


def test_train_step_onevision_runs_and_both_sides_compute_the_same_loss():
    spec = importlib.util.spec_from_file_location("train_step_onevision", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(TINY)
    for name in ("speedup", "ours_tokens_per_s", "hf_tokens_per_s", "params", "real_tokens", "our_steps", "hf_steps",
                 "views", "image_tokens", "labelled_tokens", "useful_tflop"):
        assert result[name] > 0, name
    assert 0 <= result["our_padding_waste"] < 1 and 0 <= result["hf_padding_waste"] < 1
    assert result["samples"] == 4 and result["two_image_samples"] == 1 and result["images"] == 5
    assert result["params"] == result["hf_params"] - 2 * 32  # HF's tower adds an identity post-layernorm
    # The check: one image alone (base view and a tile) and two images (one view each), packed
    # against padded; the bar is 1e-4 relative in fp32, other summation orders give far less.
    assert result["check_samples"] == 2 and result["check_tokens"][0] != result["check_tokens"][1]
    assert result["loss_rel_diff"] <= 1e-5
    assert result["head_grad_diff"] <= 1e-5 * result["head_grad_max"]
    assert result["projector_grad_diff"] <= 1e-5 * result["projector_grad_max"]
    assert result["newline_grad_diff"] <= 1e-5 * result["newline_grad_max"]
