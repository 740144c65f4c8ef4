"""Greedy decoding speed: our KV-cached generation against Hugging Face LLaVA's `generate`.

One model (an open_clip ViT tower, an MLP projector of depth 2, a small Llama-shaped decoder, random
weights, about 50M parameters at the default sizes) is exported with `export_hf_llava` and loaded back
with transformers' `LlavaForConditionalGeneration` and `AutoProcessor`; both then decode greedily from
the same inputs:

- ours: `VisionLanguageModel.generate` (multimodal/generation.py) with no stop ids, with
  `compile=True` (the decoding steps after the first as one torch.compile'd graph; the default,
  --no-compile for eager); with --compile the eager path is measured too, as `ours_eager_*` (and
  `ours_eager_speedup_batch{B}`, its decode tokens/s over hf's). On CPU the compiled path chooses
  per batch size, by measuring on this machine, what it runs (lm.decode.step_plans): weights
  packed for MKL ("frozen") or column-major, or the uncompiled step where that is faster;
  `plan_batch{B}` says which;
- hf:   `LlavaForConditionalGeneration.generate(do_sample=False)` with no EOS,

so all produce exactly --new-tokens tokens per row, and the benchmark checks they are the same
tokens (`same_tokens`: every side's, our eager path included, equal hf's). Batch 1 is one
photograph; batch 8 is 8 different photographs, each with the same caption prompt, so the prompts
have equal length and need no padding. The inputs (prompt ids
and pixels, from Hugging Face's processor on its Pillow backend, which equals ours bit for bit) are
made once, outside the timing: what is timed is the model work, vision encoder included.

- time to first token (ttft): wall time of the call with max_new_tokens=1 (vision encoder,
  projector, prefill, one token chosen);
- decode tokens/s: batch x (new tokens - 1) / (wall time of the call with max_new_tokens=N - ttft),
  the rate of the tokens after the first; `speedup_batch{B}` is ours / hf of this rate and
  `speedup` the smaller of them (prefill is measured apart, by ttft);
- tokens/s: batch x new tokens / wall time of the whole call, prefill included, and
  `end_to_end_speedup_batch{B}` ours / hf of it: with a 244-token prompt and 64 new tokens, the
  prefill, the same work on both sides, is a large share of the call.

The first call of each side is the token check; for the compiled side it also compiles the step
for that batch size and cache length, reported apart as `compile_s_batch{B}` (that call's time
minus a second call's). Each measurement then runs --warmup times untimed, then --repeats times
alternating the sides; the median is reported. All run fp32 on CPU with the same torch thread
count (--threads, 1 by default).

    python benchmarks/decode.py                     # one JSON line on stdout
    python benchmarks/decode.py --no-compile        # ours = the eager path only
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    add_model_args, build_vlm, emit, load_hf_llava, machine_info, median_seconds,
)
from lm.decode import step_plans  # noqa: E402
from multimodal import VisionLanguageModel  # noqa: E402
from multimodal.conversation import tokenize_conversation  # noqa: E402

QUESTION = "Describe the image in English, please."
# skimage.data photographs (shipped with scikit-image, no download), one per row of a batch.
PHOTOS = ["chelsea", "astronaut", "coffee", "rocket", "camera", "hubble_deep_field", "immunohistochemistry", "moon"]


def photographs(count: int, size: int) -> list[Image.Image]:
    import skimage.data

    images = []
    for name in PHOTOS[:count]:
        array = getattr(skimage.data, name)()
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        images.append(Image.fromarray(array[..., :3]).convert("RGB").resize((size, size), Image.BICUBIC))
    return images


def make_inputs(model: VisionLanguageModel, processor, images: list[Image.Image]) -> dict:
    """The same prompt ids and pixels for both sides; checked equal, so any difference in tokens
    comes from the models."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    hf_inputs = processor(images=images, text=[text] * len(images), return_tensors="pt")
    ids = tokenize_conversation([{"role": "user", "content": f"<image>\n{QUESTION}"}], model.tokenizer,
                                model.image_token_id, model.num_image_tokens, add_generation_prompt=True).input_ids
    pixels = model.preprocess(images)
    if hf_inputs["input_ids"].tolist() != [ids] * len(images):
        raise RuntimeError("Hugging Face's processor gave other prompt ids than ours; the comparison would be unfair")
    if not torch.equal(hf_inputs["pixel_values"], pixels):
        raise RuntimeError("Hugging Face's processor gave other pixels than ours; the comparison would be unfair")
    return {"hf": dict(hf_inputs), "prompts": [ids] * len(images), "pixels": pixels}


def ours_generate(model: VisionLanguageModel, inputs: dict, new_tokens: int, compile: bool = False) -> list[list[int]]:
    return model.generate(inputs["prompts"], inputs["pixels"], max_new_tokens=new_tokens, stop_ids=(), compile=compile)


def hf_generate(hf, inputs: dict, new_tokens: int) -> list[list[int]]:
    prompt_length = inputs["hf"]["input_ids"].shape[1]
    with torch.inference_mode():
        # min_new_tokens would suppress EOS in the logits and change the greedy choice; without an
        # EOS id nothing stops early and no logit is touched.
        out = hf.generate(**inputs["hf"], max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    return out[:, prompt_length:].tolist()


def linear_floor_seconds(model: VisionLanguageModel, batch: int, warmup: int, repeats: int) -> float:
    """Median time of the decoder's weight matrices alone for one decoding step (every nn.Linear of
    the decoder, output head included, on `batch` rows): the work neither implementation can skip.
    At these sizes a step streams all fp32 weights from memory, so this bounds any speedup."""
    linears = [module for module in model.decoder.modules() if isinstance(module, torch.nn.Linear)]
    inputs = {width: torch.randn(batch, width) for width in {m.in_features for m in linears}}

    def step() -> None:
        with torch.inference_mode():
            for module in linears:
                module(inputs[module.in_features])

    return median_seconds({"floor": step}, warmup, max(repeats, 5))["floor"]


def measure(model, hf, inputs: dict, new_tokens: int, warmup: int, repeats: int, compile: bool) -> dict:
    """Timings of ours (compiled when `compile`, then also "ours_eager") and hf at one batch size."""
    batch = len(inputs["prompts"])
    sides: dict[str, Callable[[int], list[list[int]]]] = {
        "ours": lambda n: ours_generate(model, inputs, n, compile=compile),
        "hf": lambda n: hf_generate(hf, inputs, n),
    }
    if compile:
        sides["ours_eager"] = lambda n: ours_generate(model, inputs, n)
    result: dict = {}
    # The first call of each side also checks its tokens; for the compiled side it compiles the
    # step for this batch size and cache length, which is timed apart (compile_s): the warmup
    # and timed runs below reuse it.
    start = time.perf_counter()
    tokens = {name: run(new_tokens) for name, run in sides.items()}
    if compile:
        first_call = time.perf_counter() - start
        start = time.perf_counter()
        sides["ours"](new_tokens)
        result["compile_s"] = first_call - (time.perf_counter() - start)
    if compile:
        # What the compiled path chose to run at this batch size (lm.decode.step_plans).
        result["plan"] = ",".join(sorted({plan for (rows, *_), plan in step_plans(model.decoder).items()
                                          if rows == batch}))
    result["same_tokens"] = all(tokens[name] == tokens["hf"] for name in sides) and all(
        len(row) == new_tokens for row in tokens["hf"])
    if compile:
        result["ours_eager_same_tokens"] = tokens["ours_eager"] == tokens["hf"]
    full = median_seconds({name: lambda run=run: run(new_tokens) for name, run in sides.items()}, warmup, repeats)
    first = median_seconds({name: lambda run=run: run(1) for name, run in sides.items()}, warmup, repeats)
    for side in sides:
        result[f"{side}_tokens_per_s"] = batch * new_tokens / full[side]
        result[f"{side}_decode_tokens_per_s"] = batch * (new_tokens - 1) / max(full[side] - first[side], 1e-9)
        result[f"{side}_ttft_ms"] = 1000 * first[side]
    result["speedup"] = result["ours_decode_tokens_per_s"] / result["hf_decode_tokens_per_s"]
    result["end_to_end_speedup"] = result["ours_tokens_per_s"] / result["hf_tokens_per_s"]
    result["ttft_speedup"] = first["hf"] / first["ours"]
    if compile:
        result["ours_eager_speedup"] = result["ours_eager_decode_tokens_per_s"] / result["hf_decode_tokens_per_s"]
    floor = linear_floor_seconds(model, batch, warmup, repeats)
    result["linear_floor_ms_per_step"] = 1000 * floor
    # The decode speedup if ours did nothing but these matrix products: the most any change to the
    # eager loop alone can give. The compiled path can pass it: its weights are packed for MKL
    # (several rows) or column-major (one row), faster products than nn.Linear's.
    result["speedup_bound"] = batch / floor / result["hf_decode_tokens_per_s"]
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes to measure (at most 8)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each measurement first")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each measurement; the median is reported")
    # One thread by default: on a small machine shared with other jobs, two OpenMP threads wait on
    # each other at every matrix product and the timings of both sides become noise (10x slower).
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's own choice)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="ours decodes with GenerationConfig(compile=True) (its eager figures as ours_eager_*)")
    parser.add_argument("--seed", type=int, default=0)
    add_model_args(parser, image_size=224, patch_size=16)
    args = parser.parse_args(argv)
    if not 1 <= max(args.batch_sizes) <= len(PHOTOS) or min(args.batch_sizes) < 1:
        parser.error(f"batch sizes must be in 1..{len(PHOTOS)} (one photograph per row)")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (the first token is the ttft measurement)")
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    model = build_vlm(args, max_seq_len=2048, seed=args.seed).eval()
    with tempfile.TemporaryDirectory(prefix="decode-bench-") as temp:
        hf, out = load_hf_llava(model, Path(temp), torch.float32)
        hf.eval()
        processor = transformers.AutoProcessor.from_pretrained(out, backend="pil")
    images = photographs(max(args.batch_sizes), args.image_size)

    result: dict = {"benchmark": "decode"}
    for batch in args.batch_sizes:
        inputs = make_inputs(model, processor, images[:batch])
        for name, value in measure(model, hf, inputs, args.new_tokens, args.warmup, args.repeats, args.compile).items():
            result[f"{name}_batch{batch}"] = round(value, 3) if isinstance(value, float) else value
        result["prompt_tokens"] = len(inputs["prompts"][0])
    result["same_tokens"] = all(result[f"same_tokens_batch{b}"] for b in args.batch_sizes)
    result["speedup"] = min(result[f"speedup_batch{b}"] for b in args.batch_sizes)
    result.update({
        "new_tokens": args.new_tokens,
        "batch_sizes": args.batch_sizes,
        "prompts": "one caption prompt per row (equal lengths, no padding); a different photograph per row",
        "image_tokens": model.num_image_tokens,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "decoder_params_m": round(sum(p.numel() for p in model.decoder.parameters()) / 1e6, 1),
        "dtype": "float32",
        "ours": "compiled decoding steps (compile=True)" if args.compile else "eager",
        "warmup": args.warmup,
        "repeats": args.repeats,
        "machine": machine_info("transformers"),
    })
    return emit(result)


if __name__ == "__main__":
    main()
