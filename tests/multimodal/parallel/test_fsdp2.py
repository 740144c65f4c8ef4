"""Sharded training (multimodal.parallel, FSDP2) on 2 CPU ranks (gloo, one thread each) against one
process: rank r trains on micro-batch r of each step, the reference process on both micro-batches of
each step with gradient accumulation. Encoder, projector and decoder train, with gradient
checkpointing of decoder and encoder blocks and with clipping active; one micro-batch (rank 1's
second) holds no image while rank 0's holds two. The gradients before clipping, the losses and the
weights after 3 AdamW steps must match: gradients first, since AdamW hides a factor-of-two
reduction error in the weights. Also: the bf16 policy gives finite losses close to fp32's, and
ranks that initialise from different seeds stop with the error that names the tensor."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from multimodal.training import VLMModule
from tests.multimodal.parallel.worker import Recorder, loader, micro_batches, spec, stage, trainer

ROOT = Path(__file__).resolve().parents[3]


def torchrun(module: str, *args: str, timeout: int = 300) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", module, *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{module} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")


@pytest.fixture(scope="module")
def sharded(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2")
    tokenizer.save(root / "tokenizer")
    torchrun("tests.multimodal.parallel.worker", str(root / "tokenizer"), str(root))
    return root, torch.load(root / "fsdp2.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference(sharded):
    """One process, both micro-batches of each step accumulated, one thread (as each rank)."""
    root, _ = sharded
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokenizer_dir = str(root / "tokenizer")
        batches = micro_batches(tokenizer_dir)
        L.seed_everything(0, verbose=False)
        module, recorder = VLMModule(spec(tokenizer_dir), stage()), Recorder()
        module.configure_model()
        module.model.encoder.gradient_checkpointing = True
        trainer("auto", [recorder], devices=1, accumulate_grad_batches=2).fit(module, loader(batches))
    finally:
        torch.set_num_threads(threads)
    return recorder, module.model.state_dict()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """The difference's norm relative to the reference's (scale-free, whatever the tensor's size)."""
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_gradients_before_clipping_match_one_process_accumulating(sharded, reference):
    """From the same weights (step 0) the gradients are bit-identical: each rank's micro-batch
    gradient, averaged over 2 ranks, is the accumulated gradient halved, and halving is exact. In
    later steps the weights already differ in their last bits (the clipping norm is summed shard by
    shard, in another order), so the gradients agree to 1e-6 of their norm."""
    _, result = sharded
    recorder, _ = reference
    assert len(result["grads"]) == len(recorder.grads) == 3
    for step, (mine, theirs) in enumerate(zip(result["grads"], recorder.grads)):
        assert mine.keys() == theirs.keys(), step
        assert any(name.startswith("model.encoder.") for name in mine)  # the encoder trains
        for name, grad in mine.items():
            if step == 0:
                assert torch.equal(grad, theirs[name]), name
            else:
                assert relative(grad, theirs[name]) <= 1e-6, (step, name, relative(grad, theirs[name]))
    # Clipping acts: the total norm is above the clip value in every step.
    for grads in recorder.grads:
        assert math.sqrt(sum(float(g.square().sum()) for g in grads.values())) > 0.05


def test_losses_and_weights_after_three_steps_match(sharded, reference):
    _, result = sharded
    recorder, weights = reference
    rank0, rank1 = (ranks["fp32"] for ranks in result["losses"])
    interleaved = [loss for pair in zip(rank0, rank1) for loss in pair]
    # Lightning reports an accumulated micro-batch's loss divided by the accumulation (2).
    assert interleaved == pytest.approx([2 * loss for loss in recorder.losses], rel=1e-6)
    assert result["weights"].keys() == weights.keys()
    # Within 1e-5 of each tensor's norm: AdamW divides by the root of the second moment, so an entry
    # whose gradients are near 0 moves by a step of the learning rate's size on noise alone.
    for name, tensor in weights.items():
        assert relative(result["weights"][name], tensor) <= 1e-5, name


def test_a_rank_without_images_keeps_the_encoder_in_step(sharded, reference):
    """Rank 1's second micro-batch has no image: it encodes a blank one with weight 0, so the run
    finishes (the fixture's timeout) and that step's encoder gradient is rank 0's alone, as in the
    reference."""
    _, result = sharded
    recorder, _ = reference
    for name in (n for n in recorder.grads[1] if n.startswith("model.encoder.")):
        assert relative(result["grads"][1][name], recorder.grads[1][name]) <= 1e-6, name


def test_the_bf16_policy_gives_finite_losses_close_to_fp32(sharded):
    _, result = sharded
    for ranks in result["losses"]:
        assert all(math.isfinite(loss) for loss in ranks["bf16"])
        assert ranks["bf16"] == pytest.approx(ranks["fp32"], rel=2e-2)


def test_ranks_with_different_weights_stop_with_the_tensor_named(sharded):
    _, result = sharded
    for error in result["errors"]:
        assert error is not None and "rank 1 starts from other weights than rank 0" in error
        assert "'encoder." in error and "seed" in error
