"""Training-step throughput in LLaVA-OneVision's anyres layout: ours (packed rows) against
transformers' LlavaOnevisionForConditionalGeneration (padded batches), one model, mixed image sizes.

The model (48.4M parameters, benchmarks.common.build_onevision_vlm): a SigLIP-style timm tower at
OneVision's geometry (384 px, patch 14: 729 tokens a view; width 384, 5 blocks of which 4 run, as
OneVision keeps 26 of SigLIP's 27; tanh GELU), the depth-2 MLP projector on every token, a learned
newline, anyres_max_9 over the 36 pinpoints, and the Llama-shaped decoder of train_step.py (d_model
512, 8 layers, vocabulary 16,384: 40.4M). It is written with `export_hf_llava_onevision` and loaded
back with `LlavaOnevisionForConditionalGeneration(attn_implementation="sdpa")`: the same weights on
both sides. Before any timing, both compute the loss of one identical batch (the smallest image
alone, and two images in one sample: packed into one row on our side, padded on theirs) and the
gradients of the output head, the projector and the newline; the differences are reported
(`loss_rel_diff`: bar 1e-4, fp32). That forward and backward pass and one optimizer step on its
gradients are each side's warmup (--warmup adds steps).

Samples (the same for both sides): images of five sizes (height x width: 150x200, 384x384, 300x900,
900x300, 480x640: 1317 to 2997 tokens alone, base view and 1 to 4 tiles), each as often as the
count allows, in a seeded order; --two-image-share of the samples hold two of them (one square view
and 730 tokens each). Each image's token count comes from model.image_token_counts, its views from
the data path (multimodal.layouts.anyres: AnyresImages.views); pixels are random noise. Text lengths
are train_step.py's: half caption-like, half instruction-like with a long tail; only answers carry
labels. The placeholders come after a few prompt tokens, each image followed by one more token.

Inputs, as each side trains:
- ours: packed first-fit into rows of --max-tokens (multimodal.data.packing: pack_samples,
  group_rows, make_batch: one ImageInputs per step), --rows rows per step, each step's rows cut
  after its longest row rounded up to 64 tokens, as the OneVision presets train (data.train
  trim_rows); --fixed-rows pads every row to --max-tokens (the data path's default), so that a
  partly filled row's padding is computed and counts as waste;
- Hugging Face: --hf-batch-size samples per step, right-padded to the longest (attention_mask,
  labels -100 on padding), as peers fine-tune with transformers' Trainer and a padding collator.
  The pixels come from transformers' own image processor (LlavaOnevisionImageProcessorPil, which
  the export writes) called on the step's images nested per sample: pixel_values [images, most
  views, 3, 384, 384] zero-padded on the view axis, image_sizes and batch_num_images, the
  processor's output as is; they are checked bit-identical to our views. The model slices the
  padded views off before its tower (no compute); sequence padding is computed.
The pixel path is excluded from timing on both sides (it is data loading). Both run the full
stage-2 step (every module trains; forward, backward, torch AdamW, --adamw: fused by default, the
same settings). LLaVA-OneVision's own recipe trains with one sample per device and no sequence
padding: --hf-batch-size 1 measures that.

The two alternate step by step until both have consumed the same --samples samples; throughput is
real (non-padding) tokens per second of step time. torch runs --threads threads (default 1: figures
per core). `mfu_vs_matmul_peak` as in train_step.py (benchmarks.common.FlopModel, every view
counted through the tower and the projector).

    python benchmarks/train_step_onevision.py              # one JSON line on stdout
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    FlopModel, add_model_args, build_onevision_vlm, emit, load_hf_llava_onevision, machine_info,
)
from benchmarks.train_step import (  # noqa: E402
    alternate_steps, hf_step, log_normal_length, our_batches, our_step, padded_text,
)
from lm.loss import IGNORE_INDEX  # noqa: E402
from multimodal import VisionLanguageModel  # noqa: E402
from multimodal.data.packing import TRIM_MULTIPLE, make_batch  # noqa: E402
from multimodal.data.samples import TokenizedSample  # noqa: E402

# (height, width): small, square, wide, tall, a 4:3 photo.
SIZES = ((150, 200), (384, 384), (300, 900), (900, 300), (480, 640))
# The same-weights check: the smallest image alone (base view and one tile, unpadded), and two images
# (one view and a newline each), so that both layouts' paths and Hugging Face's padding are covered.
CHECK_SIZES = ([(150, 200)], [(150, 200), (384, 384)])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser, image_size=384, patch_size=14, vision_width=384, vision_layers=5)
    data = parser.add_argument_group("data and steps")
    data.add_argument("--max-tokens", type=int, default=8192,
                      help="our packed row length (an image alone takes 1317-2997 tokens here)")
    data.add_argument("--rows", type=int, default=1, help="our packed rows per step")
    data.add_argument("--fixed-rows", action="store_true",
                      help="pad our rows to --max-tokens instead of cutting them after the longest row")
    data.add_argument("--hf-batch-size", type=int, default=4, help="samples per Hugging Face step")
    data.add_argument("--samples", type=int, default=12, help="timed samples, the same for both sides")
    data.add_argument("--two-image-share", type=float, default=0.2, help="share of samples with two images")
    data.add_argument("--warmup", type=int, default=0,
                      help="untimed steps of each side after the warmup the same-weights check gives")
    data.add_argument("--check-samples", type=int, default=2,
                      help="samples of the same-weights check (CHECK_SIZES in turn: one image, two images)")
    data.add_argument("--lr", type=float, default=1e-4)
    data.add_argument("--adamw", choices=("fused", "foreach", "for-loop"), default="fused",
                      help="torch AdamW implementation, the same for both sides")
    data.add_argument("--threads", type=int, default=1)
    data.add_argument("--matmul-n", type=int, default=2048,
                      help="size of the square fp32 matrix product timed for mfu_vs_matmul_peak")
    data.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# --- samples ---------------------------------------------------------------------------------------


class Sample(TokenizedSample):
    """A TokenizedSample that also keeps its PIL images (`pil`), for the Hugging Face processor."""

    pil: list[Image.Image]


def noise_image(size: tuple[int, int], rng: random.Random) -> Image.Image:
    pixels = np.random.default_rng(rng.randrange(2**31)).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def image_sizes(count: int, two_image_share: float, rng: random.Random) -> list[list[tuple[int, int]]]:
    """Each sample's image sizes: round(count * two_image_share) samples hold two images, the others
    one; the sizes cycle through SIZES (every size as often as the count allows), in a seeded order."""
    two = round(count * two_image_share)
    cycle = [SIZES[i % len(SIZES)] for i in range(count - two + 2 * two)]
    rng.shuffle(cycle)
    samples = [cycle[2 * i:2 * i + 2] for i in range(two)] + [[size] for size in cycle[2 * two:]]
    rng.shuffle(samples)
    return samples


def make_samples(model: VisionLanguageModel, sizes: list[list[tuple[int, int]]], max_tokens: int,
                 rng: random.Random) -> list[Sample]:
    """One sample per entry of `sizes` (its images' (height, width)): prompt ids around the images,
    labels on the answer only, each image's views from the data path, noise pixels."""
    anyres = model.anyres
    vocab = model.decoder.config.vocab_size
    samples = []
    for index, sample_sizes in enumerate(sizes):
        counts = model.image_token_counts(sample_sizes)
        images = len(sample_sizes)
        if rng.random() < 0.5:  # caption-like
            prompt, answer = rng.randint(8, 16), log_normal_length(rng, 16, 0.5)
        else:  # instruction-like
            prompt, answer = log_normal_length(rng, 40, 0.8), log_normal_length(rng, 100, 0.9)
        room = max_tokens - sum(counts) - images
        prompt = max(1, min(prompt, room - 1))
        answer = max(1, min(answer, room - prompt))
        # Random ids (speed does not depend on them) above the reserved block, so never a placeholder.
        text = [rng.randrange(104, vocab) for _ in range(prompt + answer)]
        # A few prompt tokens, each image followed by one more token (the "\n" after <image>), the
        # rest of the prompt, the answer.
        head = min(3, prompt)
        ids = text[:head]
        for count in counts:
            ids += [model.image_token_id] * count + [text[head]]
        ids += text[head:]
        labels = [IGNORE_INDEX] * (len(ids) - answer) + ids[len(ids) - answer:]
        pil = [noise_image(size, rng) for size in sample_sizes]
        sample = Sample(key=f"sample-{index}", input_ids=ids, labels=labels, images=anyres.views(pil),
                        image_sizes=list(sample_sizes))
        sample.pil = pil
        samples.append(sample)
    return samples


def hf_batches(samples: list[Sample], batch_size: int, pad_id: int, image_processor) -> list[dict[str, torch.Tensor]]:
    """Right-padded to the longest sample of each batch (padding masked out of attention and loss);
    the pixels as transformers' image processor gives them for the batch's images, nested per sample
    (pixel_values, image_sizes, batch_num_images), checked bit-identical to our views."""
    batches = []
    for start in range(0, len(samples), batch_size):
        group = samples[start:start + batch_size]
        pixels = image_processor(images=[sample.pil for sample in group], return_tensors="pt")
        ours = [views for sample in group for views in sample.images]
        if not all(torch.equal(pixels["pixel_values"][i, :len(v)], v) for i, v in enumerate(ours)):
            raise AssertionError("transformers' image processor and ours give different views")
        batches.append({**padded_text(group, pad_id), **pixels})
    return batches


def views_of(samples: list[Sample]) -> int:
    return sum(views.shape[0] for sample in samples for views in sample.images)


# --- the same weights ------------------------------------------------------------------------------


def same_computation(ours: VisionLanguageModel, hf, samples: list[Sample], pad_id: int,
                     image_processor) -> dict[str, float]:
    """Loss and gradients (output head, projector, newline) of the same samples on both sides (ours
    packed into one row, theirs padded), before any step: the timed steps compute the same thing.
    The gradients stay (main steps the optimizers on them: the warmup)."""
    row_tokens = sum(len(s) for s in samples)
    batch = make_batch([samples], row_tokens, pad_id)
    ours.zero_grad(set_to_none=True)
    hf.zero_grad(set_to_none=True)
    our_loss, _ = ours(batch)
    our_loss.backward()
    hf_loss = hf(**hf_batches(samples, len(samples), pad_id, image_processor)[0]).loss
    hf_loss.backward()

    def diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a.grad - b.grad).abs().max().item()

    result = {
        "check_samples": len(samples),
        "check_tokens": [len(s) for s in samples],
        "check_loss": round(our_loss.item(), 6),
        "loss_diff": abs(our_loss.item() - hf_loss.item()),
        "loss_rel_diff": abs(our_loss.item() - hf_loss.item()) / abs(hf_loss.item()),
        "head_grad_diff": diff(ours.decoder.lm_head.weight, hf.lm_head.weight),
        "head_grad_max": hf.lm_head.weight.grad.abs().max().item(),
        "projector_grad_diff": diff(ours.projector.layers[0].weight, hf.model.multi_modal_projector.linear_1.weight),
        "projector_grad_max": hf.model.multi_modal_projector.linear_1.weight.grad.abs().max().item(),
        "newline_grad_diff": diff(ours.image_newline, hf.model.image_newline),
        "newline_grad_max": hf.model.image_newline.grad.abs().max().item(),
    }
    return result


# --- the run ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    import transformers

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    ours = build_onevision_vlm(args, max_seq_len=max(args.max_tokens, 4096), seed=args.seed)
    pad_id = ours.tokenizer.pad_id
    with tempfile.TemporaryDirectory() as tmp:
        hf, out = load_hf_llava_onevision(ours, Path(tmp), torch.float32)
        # The processor's image half, as the export writes it (Pillow: bit-identical to ours).
        image_processor = transformers.AutoImageProcessor.from_pretrained(out, backend="pil")
    ours.train()
    hf.train()
    params = sum(p.numel() for p in ours.parameters())
    hf_params = sum(p.numel() for p in hf.parameters())

    implementation = {"fused": {"fused": True}, "foreach": {"foreach": True},
                      "for-loop": {"foreach": False}}[args.adamw]
    our_optimizer = torch.optim.AdamW(ours.parameters(), lr=args.lr, **implementation)
    hf_optimizer = torch.optim.AdamW(hf.parameters(), lr=args.lr, **implementation)
    trim = None if args.fixed_rows else TRIM_MULTIPLE  # as the OneVision presets train (data.train.trim_rows)
    check_sizes = [CHECK_SIZES[i % len(CHECK_SIZES)] for i in range(args.check_samples)]
    check = same_computation(ours, hf, make_samples(ours, check_sizes, args.max_tokens, rng), pad_id, image_processor)
    # The warmup: the check's forward and backward passes, then an optimizer step on its gradients
    # (AdamW's state is made at the first step), each side; then --warmup more steps each.
    for optimizer in (our_optimizer, hf_optimizer):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if args.warmup:
        warmup_samples = make_samples(ours, image_sizes(args.warmup * args.hf_batch_size, args.two_image_share, rng),
                                      args.max_tokens, rng)
        for batch in our_batches(warmup_samples, args.max_tokens, args.rows, pad_id, trim)[:args.warmup]:
            our_step(ours, our_optimizer, batch)
        for inputs in hf_batches(warmup_samples, args.hf_batch_size, pad_id, image_processor)[:args.warmup]:
            hf_step(hf, hf_optimizer, inputs)

    samples = make_samples(ours, image_sizes(args.samples, args.two_image_share, rng), args.max_tokens, rng)
    mine = our_batches(samples, args.max_tokens, args.rows, pad_id, trim)
    theirs = hf_batches(samples, args.hf_batch_size, pad_id, image_processor)
    real = sum(len(s) for s in samples)
    assert real == sum(b.real_tokens() for b in mine) == sum(int(b["attention_mask"].sum()) for b in theirs)
    load = [machine_info()["load_avg_1m"]]
    our_seconds, hf_seconds, our_losses, hf_losses, matmul_peak = alternate_steps(
        (ours, our_optimizer, mine), (hf, hf_optimizer, theirs), args.matmul_n)
    load.append(machine_info()["load_avg_1m"])

    our_tokens = sum(b.input_ids.numel() for b in mine)
    hf_tokens = sum(b["input_ids"].numel() for b in theirs)
    image_tokens = sum(sum(t == ours.image_token_id for t in s.input_ids) for s in samples)
    ours_tps, hf_tps = real / our_seconds, real / hf_seconds
    views = views_of(samples)
    useful_flops = FlopModel.of(ours).training_flops([len(s) for s in samples], images=views)
    ours_tflops, hf_tflops = useful_flops / our_seconds / 1e12, useful_flops / hf_seconds / 1e12
    result = {
        "benchmark": "train_step_onevision",
        "speedup": round(ours_tps / hf_tps, 3),
        "ours_tokens_per_s": round(ours_tps, 1),
        "hf_tokens_per_s": round(hf_tps, 1),
        "our_padding_waste": round(1 - real / our_tokens, 4),
        "hf_padding_waste": round(1 - real / hf_tokens, 4),
        "mfu_vs_matmul_peak": round(ours_tflops / matmul_peak, 4),
        "hf_mfu_vs_matmul_peak": round(hf_tflops / matmul_peak, 4),
        "ours_tflops": round(ours_tflops, 4),
        "hf_tflops": round(hf_tflops, 4),
        "matmul_peak_tflops": round(matmul_peak, 4),
        "matmul_n": args.matmul_n,
        "useful_tflop": round(useful_flops / 1e12, 4),
        "flops": "6N per real token (N: decoder without input embedding) + 12 L d s^2 per sample, "
                 "3 (2 N_v + 4 L_v d_v T_v) per view token, 6 N_p per view token",
        "our_steps": len(mine),
        "hf_steps": len(theirs),
        "ours_seconds": round(our_seconds, 2),
        "hf_seconds": round(hf_seconds, 2),
        "samples": len(samples),
        "two_image_samples": sum(len(s.images) == 2 for s in samples),
        "images": sum(len(s.images) for s in samples),
        "views": views,
        "real_tokens": real,
        "image_tokens": image_tokens,
        "labelled_tokens": sum(sum(t != IGNORE_INDEX for t in s.labels) for s in samples),
        "mean_sample_tokens": round(real / len(samples), 1),
        "longest_sample_tokens": max(len(s) for s in samples),
        **check,
        "final_loss_ours": round(float(our_losses[-1]), 4),
        "final_loss_hf": round(float(hf_losses[-1]), 4),
        "params": params,
        "hf_params": hf_params,
        "max_tokens": args.max_tokens,
        "rows_per_step": args.rows,
        "our_rows": "fixed" if args.fixed_rows else f"trimmed to a multiple of {TRIM_MULTIPLE}",
        "hf_batch_size": args.hf_batch_size,
        "warmup_steps": args.warmup,
        "adamw": args.adamw,
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "load_avg_1m_before_after": load,
        "machine": machine_info("transformers", "timm", "open_clip_torch"),
    }
    return emit(result)


if __name__ == "__main__":
    main()
