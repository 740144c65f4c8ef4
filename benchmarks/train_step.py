"""Training-step throughput: ours (packed rows) against transformers' LLaVA (padded batches), one model.

Both sides hold the same weights: our VisionLanguageModel (open_clip CLIP tower, mlp depth-2
projector, Llama decoder) is written with `multimodal.export.export_hf_llava` and loaded back with
`transformers.LlavaForConditionalGeneration` (attn_implementation="sdpa"). Before any timing, both
compute the loss of one identical batch (the same samples: packed into one row on our side, padded
on theirs) and the gradient of the output head, and the differences are reported.

Samples are one image each, with text lengths drawn from long-tailed (log-normal) distributions:
half caption-like (a short prompt, a caption of ~16 tokens), half instruction-like (a question of
~40 tokens, an answer of ~100, with a long tail up to the row length). Only answers carry labels.

The same samples go through both full stage-2 training steps (every module trains; forward,
backward, AdamW step):
- ours: packed first-fit into rows of --max-tokens (multimodal.data.packing: pack_samples,
  group_rows, make_batch), --rows rows per step;
- Hugging Face: --hf-batch-size samples per step, right-padded to the longest one, as peers train.
Both use torch's AdamW (--adamw: fused by default, the fastest on CPU and CUDA) at the same settings.

After --warmup steps of each, the two alternate step by step until both have consumed the same
--samples samples; throughput is real (non-padding) tokens per second of step time. torch runs
--threads threads (default 1: figures per core).

`mfu_vs_matmul_peak`: the useful FLOP/s of our steps over the peak of a large square fp32 matrix
product (--matmul-n) timed in the same run (before, between and after the steps; the best), at the
same thread count. Useful FLOPs are counted as
for the GPU benchmark (benchmarks.common.FlopModel: 6N per real token plus attention 12·L·d·s² per
sample, the trained tower and projector per image token; padding never counts). No bar: it says
how much of what this CPU's matrix units give a whole training step uses.

    python benchmarks/train_step.py              # one JSON line on stdout
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    FlopModel, add_model_args, build_vlm, emit, load_hf_llava, machine_info, matmul_timer, matmul_tflops,
)
from lm.loss import IGNORE_INDEX  # noqa: E402
from multimodal import VisionLanguageModel  # noqa: E402
from multimodal.batch import Batch  # noqa: E402
from multimodal.data.packing import group_rows, make_batch, pack_samples  # noqa: E402
from multimodal.data.samples import TokenizedSample  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser)
    data = parser.add_argument_group("data and steps")
    data.add_argument("--max-tokens", type=int, default=1024, help="our packed row length (and the longest sample)")
    data.add_argument("--rows", type=int, default=2, help="our packed rows per step")
    data.add_argument("--hf-batch-size", type=int, default=8, help="samples per Hugging Face step")
    data.add_argument("--samples", type=int, default=64, help="timed samples, the same for both sides")
    data.add_argument("--warmup", type=int, default=1, help="untimed steps of each side first")
    data.add_argument("--lr", type=float, default=1e-4)
    data.add_argument("--adamw", choices=("fused", "foreach", "for-loop"), default="fused",
                      help="torch AdamW implementation, the same for both sides (fused runs on CPU and CUDA)")
    # One thread by default, per core as in data_throughput.py: on a shared machine a second thread
    # waits for whichever core another process holds, at every parallel operation.
    data.add_argument("--threads", type=int, default=1)
    data.add_argument("--matmul-n", type=int, default=2048,
                      help="size of the square fp32 matrix product timed for mfu_vs_matmul_peak")
    data.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# --- samples ---------------------------------------------------------------------------------------


def log_normal_length(rng: random.Random, median: float, sigma: float) -> int:
    return max(1, round(median * math.exp(rng.gauss(0.0, sigma))))


def make_samples(model: VisionLanguageModel, count: int, max_tokens: int, rng: random.Random) -> list[TokenizedSample]:
    """`count` one-image samples: prompt ids around the image, labels on the answer only.

    Token ids are random (the speed of a step does not depend on them) and avoid the reserved
    block, so none is taken for an image placeholder."""
    per_image = model.num_image_tokens
    vocab = model.decoder.config.vocab_size
    size = model.encoder.image_size
    samples = []
    for index in range(count):
        if rng.random() < 0.5:  # caption-like
            prompt, answer = rng.randint(8, 16), log_normal_length(rng, 16, 0.5)
        else:  # instruction-like
            prompt, answer = log_normal_length(rng, 40, 0.8), log_normal_length(rng, 100, 0.9)
        prompt = min(prompt, max_tokens - per_image - 1)
        answer = min(answer, max_tokens - per_image - prompt)
        text = [rng.randrange(104, vocab) for _ in range(prompt + answer)]
        # ChatML-like layout: a few prompt tokens, the image, the rest of the prompt, the answer.
        head = min(3, prompt)
        ids = text[:head] + [model.image_token_id] * per_image + text[head:]
        labels = [IGNORE_INDEX] * (len(ids) - answer) + ids[len(ids) - answer:]
        pixels = torch.randn(3, size, size, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        samples.append(TokenizedSample(key=f"sample-{index}", input_ids=ids, labels=labels, images=[pixels]))
    return samples


def our_batches(samples: list[TokenizedSample], max_tokens: int, rows: int, pad_id: int,
                trim_to_multiple: int | None = None) -> list[Batch]:
    """Packed first-fit into rows of max_tokens, `rows` a Batch (make_batch: rows padded to
    max_tokens, or trimmed after the longest row rounded up to `trim_to_multiple`)."""
    packed = pack_samples(samples, max_tokens, buffer_size=64)
    return [make_batch(group, max_tokens, pad_id, trim_to_multiple=trim_to_multiple)
            for group in group_rows(packed, rows)]


def padded_text(group: list[TokenizedSample], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and labels of `group`, right-padded to its longest sample
    (padding masked out of attention and loss), as a padding collator gives them to transformers."""
    longest = max(len(s) for s in group)
    ids = torch.full((len(group), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(group), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(group), longest), dtype=torch.long)
    for row, sample in enumerate(group):
        n = len(sample)
        ids[row, :n] = torch.tensor(sample.input_ids)
        labels[row, :n] = torch.tensor(sample.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def hf_batches(samples: list[TokenizedSample], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded to the longest sample of each batch; padding masked out of attention and loss."""
    batches = []
    for start in range(0, len(samples), batch_size):
        group = samples[start:start + batch_size]
        pixels = torch.stack([image for sample in group for image in sample.images])
        batches.append({**padded_text(group, pad_id), "pixel_values": pixels})
    return batches


# --- steps -----------------------------------------------------------------------------------------


def our_step(model: VisionLanguageModel, optimizer: torch.optim.Optimizer, batch: Batch) -> float:
    loss, _ = model(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def hf_step(model, optimizer: torch.optim.Optimizer, inputs: dict[str, torch.Tensor]) -> float:
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def alternate_steps(our_side: tuple, hf_side: tuple, matmul_n: int) -> tuple[float, float, list, list, float]:
    """Both sides' training steps ((model, optimizer, batches) each), alternated step by step so that
    both see the same machine load over the run: (our seconds, HF seconds, our losses, HF losses,
    the fp32 matmul peak in TFLOP/s at this thread count). The peak is the best of rounds timed
    before, between and after the steps: what the machine does when least disturbed (on a shared
    machine a round between steps sees the load the steps saw)."""
    (ours, our_optimizer, mine), (hf, hf_optimizer, theirs) = our_side, hf_side
    matmul = matmul_timer(matmul_n, torch.float32, iters=1)
    matmul_peak = matmul_tflops(matmul_n, torch.float32)
    our_seconds = hf_seconds = 0.0
    our_losses, hf_losses = [], []
    for step in range(max(len(mine), len(theirs))):
        if step < len(mine):
            start = time.perf_counter()
            our_losses.append(our_step(ours, our_optimizer, mine[step]))
            our_seconds += time.perf_counter() - start
        if step < len(theirs):
            start = time.perf_counter()
            hf_losses.append(hf_step(hf, hf_optimizer, theirs[step]))
            hf_seconds += time.perf_counter() - start
        matmul_peak = max(matmul_peak, matmul())
    matmul_peak = max(matmul_peak, matmul_tflops(matmul_n, torch.float32))
    return our_seconds, hf_seconds, our_losses, hf_losses, matmul_peak


def same_computation(ours: VisionLanguageModel, hf, samples: list[TokenizedSample], pad_id: int) -> dict[str, float]:
    """Loss and output-head gradient of the same samples on both sides (ours packed into one row,
    theirs padded), before any step: the timed steps compute the same thing."""
    row_tokens = sum(len(s) for s in samples)
    batch = make_batch([samples], row_tokens, pad_id)
    ours.zero_grad(set_to_none=True)
    hf.zero_grad(set_to_none=True)
    our_loss, _ = ours(batch)
    our_loss.backward()
    hf_loss = hf(**hf_batches(samples, len(samples), pad_id)[0]).loss
    hf_loss.backward()
    head_diff = (ours.decoder.lm_head.weight.grad - hf.lm_head.weight.grad).abs().max().item()
    head_scale = hf.lm_head.weight.grad.abs().max().item()
    projector_diff = (ours.projector.layers[0].weight.grad
                      - hf.model.multi_modal_projector.linear_1.weight.grad).abs().max().item()
    ours.zero_grad(set_to_none=True)
    hf.zero_grad(set_to_none=True)
    return {
        "check_samples": len(samples),
        "check_loss": round(our_loss.item(), 6),
        "loss_diff": abs(our_loss.item() - hf_loss.item()),
        "head_grad_diff": head_diff,
        "head_grad_max": head_scale,
        "projector_grad_diff": projector_diff,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    ours = build_vlm(args, max_seq_len=max(args.max_tokens, 128), seed=args.seed)
    pad_id = ours.tokenizer.pad_id
    with tempfile.TemporaryDirectory() as tmp:
        hf, _ = load_hf_llava(ours, Path(tmp), torch.float32)
    ours.train()
    hf.train()
    params = sum(p.numel() for p in ours.parameters())
    hf_params = sum(p.numel() for p in hf.parameters())

    check = same_computation(ours, hf, make_samples(ours, 4, args.max_tokens, rng), pad_id)

    implementation = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[args.adamw]
    our_optimizer = torch.optim.AdamW(ours.parameters(), lr=args.lr, **implementation)
    hf_optimizer = torch.optim.AdamW(hf.parameters(), lr=args.lr, **implementation)
    warmup_samples = make_samples(ours, max(args.warmup * args.hf_batch_size, 1), args.max_tokens, rng)
    for batch in our_batches(warmup_samples, args.max_tokens, args.rows, pad_id)[:args.warmup]:
        our_step(ours, our_optimizer, batch)
    for inputs in hf_batches(warmup_samples, args.hf_batch_size, pad_id)[:args.warmup]:
        hf_step(hf, hf_optimizer, inputs)

    samples = make_samples(ours, args.samples, args.max_tokens, rng)
    mine = our_batches(samples, args.max_tokens, args.rows, pad_id)
    theirs = hf_batches(samples, args.hf_batch_size, pad_id)
    real = sum(len(s) for s in samples)
    assert real == sum(b.real_tokens() for b in mine) == sum(int(b["attention_mask"].sum()) for b in theirs)
    our_seconds, hf_seconds, our_losses, hf_losses, matmul_peak = alternate_steps(
        (ours, our_optimizer, mine), (hf, hf_optimizer, theirs), args.matmul_n)

    our_tokens = sum(b.input_ids.numel() for b in mine)
    hf_tokens = sum(b["input_ids"].numel() for b in theirs)
    ours_tps, hf_tps = real / our_seconds, real / hf_seconds
    useful_flops = FlopModel.of(ours).training_flops([len(s) for s in samples], images=sum(len(s.images) for s in samples))
    ours_tflops, hf_tflops = useful_flops / our_seconds / 1e12, useful_flops / hf_seconds / 1e12
    result = {
        "benchmark": "train_step",
        "speedup": round(ours_tps / hf_tps, 3),
        "ours_tokens_per_s": round(ours_tps, 1),
        "hf_tokens_per_s": round(hf_tps, 1),
        # Useful FLOP/s of each side's steps (the same useful work: padding never counts) over the
        # fp32 matmul peak measured here: no bar, a reading of how much of the machine a step uses.
        "mfu_vs_matmul_peak": round(ours_tflops / matmul_peak, 4),
        "hf_mfu_vs_matmul_peak": round(hf_tflops / matmul_peak, 4),
        "ours_tflops": round(ours_tflops, 4),
        "hf_tflops": round(hf_tflops, 4),
        "matmul_peak_tflops": round(matmul_peak, 4),
        "matmul_n": args.matmul_n,
        "useful_tflop": round(useful_flops / 1e12, 4),
        "flops": "6N per real token (N: decoder without input embedding) + 12 L d s^2 per sample, "
                 "3 (2 N_v + 4 L_v d_v T_v) per image token, 6 N_p per image token",
        "our_padding_waste": round(1 - real / our_tokens, 4),
        "hf_padding_share": round(1 - real / hf_tokens, 4),
        "our_steps": len(mine),
        "hf_steps": len(theirs),
        "ours_seconds": round(our_seconds, 2),
        "hf_seconds": round(hf_seconds, 2),
        "samples": len(samples),
        "real_tokens": real,
        "labelled_tokens": sum(sum(t != IGNORE_INDEX for t in s.labels) for s in samples),
        "mean_sample_tokens": round(real / len(samples), 1),
        "longest_sample_tokens": max(len(s) for s in samples),
        **check,
        "final_loss_ours": round(float(our_losses[-1]), 4),
        "final_loss_hf": round(float(hf_losses[-1]), 4),
        "params": params,
        "hf_params": hf_params,
        "image_tokens": ours.num_image_tokens,
        "max_tokens": args.max_tokens,
        "rows_per_step": args.rows,
        "hf_batch_size": args.hf_batch_size,
        "warmup_steps": args.warmup,
        "adamw": args.adamw,
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "machine": machine_info("transformers"),
    }
    return emit(result)


if __name__ == "__main__":
    main()
