"""GPU benchmark: training throughput and MFU of Salamandra-2B + SigLIP-So400m/14-384 (stage 2),
against Hugging Face LLaVA holding the same weights; packed attention; batch-1 decoding.

One command, one JSON line per measurement on stdout, then a summary line (what failed or was
skipped is named there). Every section fails soft: an error (out of memory, xformers missing, ...)
prints a line with "error" and the run goes on. `--budget-s` keeps the whole run under a time limit
(sections that no longer fit print "skipped").

Sections, in order:
  env            device, versions, attention backend in use
  matmul         a large bf16 matmul (8192^3, repeated): the measured peak TFLOP/s
  attention      packed (block-diagonal causal) attention alone, forward + backward: xformers
                 against SDPA on the batch's own sample lengths ("skipped: no CUDA" on CPU)
  train_ours     stage 2 (encoder, projector and decoder all train) on packed rows of 4096 tokens
  train_hf       transformers' LlavaForConditionalGeneration (attn_implementation="sdpa"), same
                 weights (exported with multimodal.export.export_hf_llava), same samples padded to
                 the longest; split into micro-batches only if the whole batch runs out of memory
  decode         batch-1 greedy decoding, ours (KV cache) against HF generate: same prompt, same
                 number of new tokens, and whether the tokens agree
  train_*_nockpt both trainings again without gradient checkpointing (--checkpointing both)
  train_ours_compiled   ours with lm.compile_blocks (--compile)
  summary        tokens/s, MFU, speedup = ours / HF real tokens/s, the goals (>= 45% MFU, >= 1.8x HF)

Memory and precision (the same for both sides): weights, gradients and AdamW states all in bf16
("pure bf16", torch.optim.AdamW, fused on CUDA): 8 bytes per parameter, about 22 GB for the 2.7B
parameters, where bf16-mixed with fp32 master weights would need 16 bytes per parameter (43 GB)
before activations. Decoder blocks recompute their activations in the backward pass (ours:
Decoder.gradient_checkpointing; HF: language_model.gradient_checkpointing_enable(use_reentrant=
False)); neither side checkpoints the vision tower.

FLOP counting (the project's convention; benchmarks.common.FlopModel), useful work only, padding
never counts:
  decoder   6 * N_dec per real token, N_dec = decoder parameters without the input embedding
            (the 256k output head included), plus attention 12 * L * d * s^2 per sample of s tokens
            (the full-square convention of PaLM / llm-foundry; the causal-half convention, 6 * L * d
            * s^2, is reported too as mfu_*_causal)
  vision    3 * (2 * N_v + 4 * L_v * d_v * T_v) per image token (trained tower; N_v without the
            position table, T_v = 729 tokens per image)
  projector 6 * N_p per image token
MFU = useful FLOP/s / 989e12 (H100 SXM bf16 dense) and / the matmul section's measured peak.
Both sides do the same useful work on the same samples, so `speedup` is a ratio of real tokens/s.

Run on the GPU machine (torch, transformers and lightning are there; open_clip_torch, webdataset
and xformers are not). On this side, once, on a machine with internet: put wheels of those three in
.whl/ (xformers built for the GPU machine's torch and CUDA; the device run carries .whl/ along);
then on the GPU machine: `bash benchmarks/gpu.sh`, which does
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
    timeout 480 python3 benchmarks/gpu.py --budget-s 420 --compile
and writes the JSON lines to $OUT/gpu.jsonl when $OUT is set.

`--tiny`: the same code paths on tiny shapes (tiny decoder, tiny SigLIP-like timm tower), on CPU
in float32 in a few seconds; tests/benchmarks/test_gpu_script.py runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import random
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.common import FlopModel, param_count, rounded, sync  # noqa: E402

H100_PEAK_TFLOPS = 989.0
SIGLIP_384 = "ViT-SO400M-14-SigLIP-384"
RESULTS: list[dict[str, Any]] = []


class Skip(Exception):
    """A section that does not run here (no CUDA, no time left); printed as "skipped"."""


def emit(record: dict[str, Any]) -> dict[str, Any]:
    RESULTS.append(record)
    return common.emit(record)


# --- device helpers (every CUDA-only call is behind device.type == "cuda") -------------------


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


# --- settings ------------------------------------------------------------------------------


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    tiny: bool
    max_tokens: int          # packed row length
    rows: int                # packed rows per step
    image_tokens_hint: int   # used only to size the samples' text
    text_min: int
    text_max: int
    matmul_n: int
    decode_tokens: int
    prompt_text_tokens: int
    warmup: int
    steps: int
    section_cap_s: float     # a training section stops measuring after this long
    attention: str
    checkpointing: str       # on / off / both
    compile: bool
    compile_backend: str
    compile_mode: str | None
    budget_s: float
    started: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def need(self, seconds: float) -> None:
        if self.left() < seconds:
            raise Skip(f"budget: {self.left():.0f} s left of --budget-s {self.budget_s:.0f}, section needs ~{seconds:.0f} s")


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU-friendly smoke run of every section)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                        help="default: bf16 (fp32 with --tiny on CPU)")
    parser.add_argument("--rows", type=int, default=2, help="packed rows per step (the 2B config uses 2)")
    parser.add_argument("--max-tokens", type=int, default=None, help="packed row length (default 4096)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--decode-tokens", type=int, default=None)
    parser.add_argument("--attention", choices=["auto", "sdpa", "xformers"], default="auto",
                        help="our decoder's attention backend (auto: xformers on CUDA when it works)")
    parser.add_argument("--checkpointing", choices=["on", "off", "both"], default="both",
                        help="decoder gradient checkpointing on both sides; 'both' adds the 'off' runs at the end")
    parser.add_argument("--compile", action="store_true", help="also train ours with lm.compile_blocks")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--compile-mode", default=None)
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting sections after this long")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("fp32" if args.tiny and device.type == "cpu" else "bf16")
    tiny = args.tiny
    return Settings(
        device=device,
        dtype=torch.bfloat16 if dtype_name == "bf16" else torch.float32,
        tiny=tiny,
        max_tokens=args.max_tokens or (128 if tiny else 4096),
        rows=args.rows,
        image_tokens_hint=16 if tiny else 729,
        text_min=8 if tiny else 64,
        text_max=40 if tiny else 512,
        matmul_n=256 if tiny else 8192,
        decode_tokens=args.decode_tokens or (6 if tiny else 128),
        prompt_text_tokens=8 if tiny else 32,
        warmup=args.warmup if args.warmup is not None else (1 if tiny else 3),
        steps=args.steps or (2 if tiny else 10),
        section_cap_s=20.0 if tiny else 60.0,
        attention=args.attention,
        checkpointing=args.checkpointing,
        compile=args.compile,
        compile_backend=args.compile_backend,
        compile_mode=args.compile_mode,
        budget_s=args.budget_s,
    )


# --- the model, the samples, the FLOPs -----------------------------------------------------


TEXTS = [
    "A red circle on a blue background.", "Un círculo rojo sobre un fondo azul.",
    "Un cercle vermell sobre un fons blau.", "Describe the image in English, please.",
    "Describe la imagen en español.", "Descriu la imatge en català, si us plau.",
    "Two cats sleep on a green sofa next to a window.", "The quick brown fox jumps over the lazy dog.",
] * 10


def _tiny_tower_config() -> dict[str, Any]:
    """A SigLIP-like timm tower (same classes as So400m's: timm ViT, no class token, MAP head
    dropped), 32 px, 16 tokens; registered with timm on first use."""
    import timm
    from timm.models import register_model

    name = "vit_salamandra_gpu_bench_tiny_siglip"
    if name not in timm.list_models(name):
        def build(pretrained: bool = False, **kwargs):
            for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
                kwargs.pop(key, None)
            return timm.create_model("vit_base_patch16_siglip_224", pretrained=False, img_size=32, patch_size=8,
                                     embed_dim=64, depth=3, num_heads=2, **kwargs)
        build.__name__ = name
        register_model(build)
    return {"embed_dim": 64, "vision_cfg": {"image_size": 32, "timm_model_name": name, "timm_model_pretrained": False,
                                            "timm_pool": "map", "timm_proj": "none"}}


def build_model(s: Settings, attention: str):
    """Our VisionLanguageModel with random weights (nothing is downloaded), on s.device in s.dtype."""
    import projector as projectors
    from encoders import OpenCLIPEncoder
    from lm import Decoder, LMConfig, train_tokenizer
    from multimodal import VisionLanguageModel

    tokenizer = train_tokenizer(TEXTS, vocab_size=400)
    if s.tiny:
        lm_config = LMConfig.from_name("tiny", attention=attention)
        encoder_args = dict(model_name=_tiny_tower_config(), preprocess_cfg={"mean": 0.5, "std": 0.5,
                                                                             "resize_mode": "squash"})
    else:
        lm_config = LMConfig.from_name("salamandra-2b", attention=attention)
        encoder_args = dict(model_name=SIGLIP_384, pretrained=None)

    def build():
        torch.manual_seed(0)
        encoder = OpenCLIPEncoder(**encoder_args, feature_layer=-1, drop_cls=False)
        decoder = Decoder(lm_config)
        proj = projectors.build("mlp", encoder.hidden_size, lm_config.d_model, depth=2)
        return VisionLanguageModel(encoder, proj, decoder, tokenizer, tokenizer.reserved_token_id(1))

    try:
        # Random init directly on the GPU: seconds instead of a minute of CPU normal_() for 2.7B weights.
        with torch.device(s.device):
            model = build()
    except Exception:  # noqa: BLE001 - some init code may not run under a device context: build on CPU
        model = build()
    return model.to(device=s.device, dtype=s.dtype)


@dataclass
class Workload:
    model: Any
    batch: Any               # multimodal.Batch, packed, on the device
    samples: list            # the TokenizedSamples of the batch, row by row
    flops: FlopModel
    real_tokens: int
    images: int
    hf_dir: Path | None = None
    hf_model: Any = None
    hf_error: str | None = None
    export_note: str | None = None
    attention_backend: str = "sdpa"


def make_samples(s: Settings, model) -> tuple[list, Any]:
    """Synthetic instruction samples (BOS, one image, a question, a labelled answer), packed
    first-fit into s.rows rows of s.max_tokens, as the training data path packs them."""
    from lm.loss import IGNORE_INDEX
    from multimodal.data.packing import make_batch, pack_samples
    from multimodal.data.samples import TokenizedSample

    tokenizer = model.tokenizer
    rng = random.Random(0)
    generator = torch.Generator().manual_seed(0)
    first_text_id = 360  # after the special and byte-fallback tokens of a Salamandra-shaped tokenizer
    text_ids = list(range(first_text_id, tokenizer.vocab_size))
    image_size = model.encoder.image_size

    def samples():
        index = 0
        while True:
            text = rng.randint(s.text_min, s.text_max)
            question = max(1, text // 3)
            ids = [tokenizer.bos_id] + model.image_placeholder() + [rng.choice(text_ids) for _ in range(text)]
            labels = [IGNORE_INDEX] * (len(ids) - text + question) + ids[len(ids) - text + question:]
            pixels = torch.randn(3, image_size, image_size, generator=generator).clamp(-1, 1)
            yield TokenizedSample(f"sample-{index}", ids, labels, [pixels])
            index += 1

    rows = []
    for row in pack_samples(samples(), s.max_tokens, buffer_size=8 * s.rows):
        rows.append(row)
        if len(rows) == s.rows:
            break
    batch = make_batch(rows, s.max_tokens, tokenizer.pad_id)
    return [sample for row in rows for sample in row], batch


def resolve_attention(s: Settings) -> tuple[str, str | None]:
    """The decoder backend to use, after a small xformers probe on CUDA (a wheel built for another
    torch may import and then fail in its kernels): (backend, probe error or None)."""
    if s.attention == "sdpa" or s.device.type != "cuda":
        return "sdpa", None if s.attention != "xformers" else "xformers needs CUDA"
    from lm import SeqLayout
    from lm.attention import causal_attention

    try:
        q = torch.randn(1, 64, 2, 64, device=s.device, dtype=torch.bfloat16, requires_grad=True)
        out = causal_attention(q, q, q, SeqLayout.packed([[20, 44]]), "xformers")
        out.sum().backward()
        sync(s.device)
        return "xformers", None
    except Exception as error:  # noqa: BLE001
        if s.attention == "xformers":
            raise
        return "sdpa", f"{type(error).__name__}: {error}"[:300]


def setup(s: Settings) -> tuple[Workload, dict[str, Any]]:
    from lm.attention import resolve_backend

    backend, probe_error = resolve_attention(s)
    t0 = time.perf_counter()
    model = build_model(s, backend)
    samples, batch = make_samples(s, model)
    batch = batch.to(s.device)
    work = Workload(model=model, batch=batch, samples=samples, flops=FlopModel.of(model),
                    real_tokens=sum(len(x) for x in samples), images=len(samples),
                    attention_backend=resolve_backend(backend, s.device))
    info = {
        "build_s": round(time.perf_counter() - t0, 1),
        "decoder_attention": work.attention_backend,
        "xformers_probe_error": probe_error,
        "params": {"decoder": param_count(model.decoder), "encoder": param_count(model.encoder),
                   "projector": param_count(model.projector)},
        "rows": s.rows, "max_tokens": s.max_tokens, "samples": len(samples), "real_tokens": work.real_tokens,
        "padding_waste": round(1 - work.real_tokens / batch.input_ids.numel(), 4),
        "image_tokens_per_image": model.num_image_tokens,
        "useful_tflop_per_step": round(work.flops.training_flops([len(x) for x in samples], len(samples)) / 1e12, 3),
    }
    return work, info


def export_to_hf(s: Settings, work: Workload) -> None:
    """Write our weights as a Hugging Face LLaVA directory (RAM disk when it has room). The weights
    and config.json are written before the tokenizer and processor files, so a processor-side
    incompatibility of the installed transformers does not stop the benchmark."""
    from multimodal.export import export_hf_llava

    nbytes = sum(t.numel() * t.element_size() for t in work.model.state_dict().values())
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and shutil.disk_usage(shm).free > 1.5 * nbytes + 2**30 else None
    out = Path(tempfile.mkdtemp(prefix="salamandra-gpu-bench-", dir=base)) / "llava"
    try:
        export_hf_llava(work.model, out)
    except Exception as error:  # noqa: BLE001
        if not ((out / "config.json").exists() and any(out.glob("*.safetensors"))):
            raise
        work.export_note = f"export finished without processor files: {type(error).__name__}: {error}"[:300]
    work.hf_dir = out


def load_hf(s: Settings, work: Workload):
    if work.hf_model is not None or work.hf_error is not None:
        if work.hf_error:
            raise RuntimeError(f"HF model unavailable: {work.hf_error}")
        return work.hf_model
    try:
        import transformers

        if work.hf_dir is None:
            export_to_hf(s, work)
        model = transformers.LlavaForConditionalGeneration.from_pretrained(
            work.hf_dir, attn_implementation="sdpa", **{common.transformers_dtype_kwarg(): s.dtype})
        model = model.to(device=s.device, dtype=s.dtype)
        model.generation_config.eos_token_id = None  # decode exactly as many tokens as ours
        model.generation_config.pad_token_id = work.model.tokenizer.pad_id
        work.hf_model = model
        return model
    except Exception as error:
        work.hf_error = f"{type(error).__name__}: {error}"[:500]
        raise


def hf_language_model(hf) -> torch.nn.Module:
    inner = getattr(hf, "model", None)
    language_model = getattr(inner, "language_model", None)
    return language_model if language_model is not None else hf.language_model


# --- training measurements -----------------------------------------------------------------


def make_optimizer(s: Settings, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    # Pure bf16 AdamW: states in the parameters' dtype (see the module docstring).
    return torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.999), weight_decay=0.0,
                             fused=True if s.device.type == "cuda" else None)


def measure_steps(s: Settings, step: Callable[[], float]) -> dict[str, Any]:
    """Warmup, then timed steps (stopping early past the section's time cap). Returns timings."""
    reset_peak(s.device)
    t0 = time.perf_counter()
    losses = [step() for _ in range(s.warmup)]
    sync(s.device)
    warmup_s = time.perf_counter() - t0
    times = []
    started = time.perf_counter()
    for _ in range(s.steps):
        t = time.perf_counter()
        losses.append(step())
        sync(s.device)
        times.append(time.perf_counter() - t)
        if time.perf_counter() - started > s.section_cap_s or s.left() < 15:
            break
    times.sort()
    return {
        "step_s": sum(times) / len(times), "median_step_s": times[len(times) // 2], "timed_steps": len(times),
        "warmup_s": round(warmup_s, 1), "loss_first": losses[0], "loss_last": losses[-1],
        "peak_memory_gb": peak_gb(s.device),
    }


def throughput(s: Settings, work: Workload, timing: dict[str, Any], peak_tflops: float | None) -> dict[str, Any]:
    lengths = [len(x) for x in work.samples]
    flops = work.flops.training_flops(lengths, work.images)
    causal = work.flops.training_flops(lengths, work.images, causal=True)
    step = timing["step_s"]
    out = {
        "real_tokens_per_s": work.real_tokens / step,
        "samples_per_s": len(work.samples) / step,
        "tflops": flops / step / 1e12,
        "mfu_989": flops / step / (H100_PEAK_TFLOPS * 1e12),
        "mfu_989_causal": causal / step / (H100_PEAK_TFLOPS * 1e12),
        "mfu_measured_peak": flops / step / (peak_tflops * 1e12) if peak_tflops else None,
    }
    return {k: rounded(v) for k, v in {**out, **timing}.items()}


def train_ours(s: Settings, work: Workload, peak: float | None, checkpointing: bool,
               compiled: bool = False) -> dict[str, Any]:
    with parked(s, work.hf_model):
        return _train_ours(s, work, peak, checkpointing, compiled)


def _train_ours(s: Settings, work: Workload, peak: float | None, checkpointing: bool,
                compiled: bool) -> dict[str, Any]:
    model = work.model
    model.train()
    model.requires_grad_(True)  # stage 2: encoder, projector and decoder all train
    model.decoder.gradient_checkpointing = checkpointing
    if compiled:
        from lm import compile_blocks

        options = {"backend": s.compile_backend}
        if s.compile_mode:
            options["mode"] = s.compile_mode
        compile_blocks(model.decoder, **options)
    optimizer = make_optimizer(s, list(model.parameters()))
    batch = work.batch

    def step() -> float:
        loss, _ = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    try:
        timing = measure_steps(s, step)
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        free_memory(s.device)
    timing["loss_first"], timing["loss_last"] = float(timing["loss_first"]), float(timing["loss_last"])
    record = throughput(s, work, timing, peak)
    record.update(checkpointing=checkpointing, attention=work.attention_backend, compiled=compiled)
    if compiled:
        record.update(compile_backend=s.compile_backend, compile_mode=s.compile_mode)
    return record


def hf_batches(s: Settings, work: Workload, per_batch: int) -> list[dict[str, torch.Tensor]]:
    """The same samples, in order, in micro-batches of `per_batch`, each padded to its longest."""
    pad = work.model.tokenizer.pad_id
    from lm.loss import IGNORE_INDEX

    out = []
    for start in range(0, len(work.samples), per_batch):
        chunk = work.samples[start:start + per_batch]
        width = max(len(x) for x in chunk)
        ids = torch.tensor([x.input_ids + [pad] * (width - len(x)) for x in chunk])
        labels = torch.tensor([x.labels + [IGNORE_INDEX] * (width - len(x)) for x in chunk])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk])
        pixels = torch.stack([image for x in chunk for image in x.images])
        # use_cache=False: a training step has no use for the KV cache HF would otherwise build.
        out.append({"input_ids": ids.to(s.device), "attention_mask": mask.to(s.device), "labels": labels.to(s.device),
                    "pixel_values": pixels.to(s.device, s.dtype), "use_cache": False})
    return out


@contextlib.contextmanager
def parked(s: Settings, model: torch.nn.Module | None) -> Iterator[None]:
    """`model` on the host for the duration: each side trains with the GPU to itself, so neither
    side's peak memory holds the other's weights (and neither is pushed toward out-of-memory)."""
    if model is None or s.device.type != "cuda":
        yield
        return
    model.to("cpu")
    free_memory(s.device)
    try:
        yield
    finally:
        model.to(s.device)


def train_hf(s: Settings, work: Workload, peak: float | None, checkpointing: bool) -> dict[str, Any]:
    hf = load_hf(s, work)
    with parked(s, work.model):
        return _train_hf(s, work, hf, peak, checkpointing)


def _train_hf(s: Settings, work: Workload, hf: Any, peak: float | None, checkpointing: bool) -> dict[str, Any]:
    hf.train()
    hf.requires_grad_(True)
    language_model = hf_language_model(hf)
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn).
    if hasattr(language_model, "activation_checkpointing_enable"):
        if checkpointing:
            language_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            language_model.activation_checkpointing_disable()
    elif checkpointing:
        language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        language_model.gradient_checkpointing_disable()
    labelled_total = sum(sum(1 for t in x.labels[1:] if t != -100) for x in work.samples)
    per_batch = len(work.samples)
    error_note = None
    while True:
        micro = hf_batches(s, work, per_batch)
        weights = [int((b["labels"][:, 1:] != -100).sum()) / max(labelled_total, 1) for b in micro]
        optimizer = make_optimizer(s, list(hf.parameters()))

        def step() -> float:
            total = 0.0
            for b, weight in zip(micro, weights):
                loss = hf(**b).loss
                (loss * weight).backward()
                total = total + loss.detach() * weight
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return total

        try:
            timing = measure_steps(s, step)
            break
        except Exception as error:  # noqa: BLE001
            if not is_oom(error) or per_batch == 1:
                raise
            error_note = f"out of memory at {per_batch} samples per micro-batch"
        finally:
            optimizer.zero_grad(set_to_none=True)
            del optimizer, micro
            free_memory(s.device)
        per_batch = (per_batch + 1) // 2
    timing["loss_first"], timing["loss_last"] = float(timing["loss_first"]), float(timing["loss_last"])
    record = throughput(s, work, timing, peak)
    padded = sum(len(work.samples[i:i + per_batch]) * max(len(x) for x in work.samples[i:i + per_batch])
                 for i in range(0, len(work.samples), per_batch))
    record.update(checkpointing=checkpointing, attention="sdpa", micro_batch_samples=per_batch,
                  padding_waste=round(1 - work.real_tokens / padded, 4), oom_retry=error_note)
    return record


# --- the other sections --------------------------------------------------------------------


def matmul_peak(s: Settings) -> dict[str, Any]:
    n = s.matmul_n
    dtype = torch.bfloat16 if s.device.type == "cuda" else s.dtype
    tflops = common.matmul_tflops(n, dtype, s.device, iters=50 if s.device.type == "cuda" else 5)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": rounded(tflops, 2),
            "fraction_of_989": rounded(tflops / H100_PEAK_TFLOPS)}


def attention_bench(s: Settings, work: Workload | None) -> dict[str, Any]:
    """Packed causal attention alone, forward + backward, on the batch's layout."""
    from lm import LMConfig, SeqLayout
    from lm.attention import causal_attention

    config = LMConfig.from_name("tiny" if s.tiny else "salamandra-2b")
    if work is not None:
        layout, rows, tokens = work.batch.layout, work.batch.input_ids.shape[0], work.batch.input_ids.shape[1]
    else:  # the model could not be built: the same kind of packing, made up here
        rows, tokens = s.rows, s.max_tokens
        per = s.image_tokens_hint + (s.text_min + s.text_max) // 2
        layout = SeqLayout.packed([[per] * (tokens // per) for _ in range(rows)])
    lengths = [n for row in layout.seq_lens for n in row]
    dtype = torch.bfloat16 if s.device.type == "cuda" else s.dtype
    generator = torch.Generator(device=s.device).manual_seed(0)

    def tensor(heads):
        return torch.randn(rows, tokens, heads, config.head_dim, device=s.device, dtype=dtype,
                           generator=generator).requires_grad_(True)

    q, k, v = tensor(config.n_heads), tensor(config.n_kv_heads), tensor(config.n_kv_heads)
    grad = torch.randn(rows, tokens, config.n_heads, config.head_dim, device=s.device, dtype=dtype, generator=generator)
    # Causal FLOPs of the real samples: forward 2 * s^2 * H * hd (half of QK^T and PV), backward 2.5x.
    flops = 3.5 * sum(2 * n * n * config.n_heads * config.head_dim for n in lengths)
    record: dict[str, Any] = {"rows": rows, "tokens": tokens, "heads": config.n_heads, "kv_heads": config.n_kv_heads,
                              "head_dim": config.head_dim, "samples": len(lengths)}
    outputs = {}
    iters = 20 if s.device.type == "cuda" else 3
    for backend in ("sdpa", "xformers"):
        try:
            if backend == "xformers" and s.device.type != "cuda":
                raise Skip("no CUDA")

            def run():
                q.grad = k.grad = v.grad = None
                out = causal_attention(q, k, v, layout, backend)
                out.backward(grad)
                return out

            outputs[backend] = run().detach()
            for _ in range(2):
                run()
            sync(s.device)
            t = time.perf_counter()
            for _ in range(iters):
                run()
            sync(s.device)
            seconds = (time.perf_counter() - t) / iters
            record[f"{backend}_ms"] = rounded(seconds * 1e3, 3)
            record[f"{backend}_tflops_causal"] = rounded(flops / seconds / 1e12, 2)
        except Skip as why:
            record[backend] = f"skipped: {why}"
        except Exception as error:  # noqa: BLE001
            record[backend] = f"error: {type(error).__name__}: {error}"[:300]
    if "sdpa_ms" in record and "xformers_ms" in record:
        record["xformers_speedup"] = rounded(record["sdpa_ms"] / record["xformers_ms"], 3)
        valid = torch.zeros(rows, tokens, dtype=torch.bool, device=s.device)
        for r, row in enumerate(layout.seq_lens):
            valid[r, :sum(row)] = True  # trailing padding is its own segment; its values do not matter
        diff = (outputs["sdpa"] - outputs["xformers"]).float().abs()[valid]
        record["max_abs_diff"] = rounded(float(diff.max()), 5)
    return record


def decode_bench(s: Settings, work: Workload) -> dict[str, Any]:
    hf = load_hf(s, work)
    model = work.model
    rng = random.Random(1)
    tokenizer = model.tokenizer
    prompt = ([tokenizer.bos_id] + model.image_placeholder()
              + [rng.randrange(360, tokenizer.vocab_size) for _ in range(s.prompt_text_tokens)])
    pixels = work.batch.pixels[:1].to(s.dtype)
    hf_inputs = {"input_ids": torch.tensor([prompt], device=s.device),
                 "attention_mask": torch.ones(1, len(prompt), dtype=torch.long, device=s.device),
                 "pixel_values": pixels}

    def ours(n: int) -> list[int]:
        return model.generate([prompt], pixels, max_new_tokens=n, stop_ids=())[0]

    def theirs(n: int) -> list[int]:
        hf.eval()
        with torch.inference_mode():
            out = hf.generate(**hf_inputs, max_new_tokens=n, do_sample=False)
        return out[0, len(prompt):].tolist()

    def timed(fn, n):
        return common.timed(lambda: fn(n), s.device)

    n = s.decode_tokens
    record: dict[str, Any] = {"batch": 1, "prompt_tokens": len(prompt), "new_tokens": n}
    results = {}
    for name, fn in (("ours", ours), ("hf", theirs)):
        fn(2)  # warmup
        _, first = timed(fn, 1)  # prefill + 1 token
        tokens, total = timed(fn, n)
        results[name] = tokens
        record[f"{name}_tokens_per_s"] = rounded(len(tokens) / total, 2)
        record[f"{name}_decode_tokens_per_s"] = rounded((len(tokens) - 1) / max(total - first, 1e-9), 2)
        record[f"{name}_prefill_s"] = rounded(first, 4)
    record["speedup"] = rounded(record["ours_decode_tokens_per_s"] / record["hf_decode_tokens_per_s"], 3)
    a, b = results["ours"], results["hf"]
    record["same_tokens"] = a == b
    record["matching_prefix"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return record


# --- driver --------------------------------------------------------------------------------


def run_section(s: Settings, name: str, need_s: float, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    t = time.perf_counter()
    try:
        s.need(need_s)
        record = {"section": name, **fn()}
    except Skip as why:
        record = {"section": name, "skipped": str(why)}
    except KeyboardInterrupt:  # gpu.sh's timeout sends SIGINT: skip the rest, still print the summary
        s.budget_s = 0
        record = {"section": name, "error": "interrupted by gpu.sh's timeout"}
    except Exception as error:  # noqa: BLE001 - fail soft: report and go on
        record = {"section": name, "error": f"{type(error).__name__}: {error}"[:1000],
                  "where": traceback.format_exc(limit=-3).strip().splitlines()[-3:]}
        del error
    free_memory(s.device)
    record["section_s"] = round(time.perf_counter() - t, 1)
    return emit(record)


def environment(s: Settings) -> dict[str, Any]:
    import importlib.metadata
    import importlib.util
    import platform

    info: dict[str, Any] = {"device": str(s.device), "dtype": str(s.dtype).removeprefix("torch."), "tiny": s.tiny,
                            "python": platform.python_version(), "torch": torch.__version__,
                            "budget_s": s.budget_s, "machine": common.cpu_info()}
    if s.device.type == "cuda":
        props = torch.cuda.get_device_properties(s.device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    for package, distribution in (("transformers", "transformers"), ("open_clip", "open_clip_torch"),
                                  ("timm", "timm"), ("xformers", "xformers"), ("lightning", "lightning")):
        # Versions from the installed metadata: importing lightning or xformers here costs seconds.
        try:
            info[package] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            info[package] = "installed" if importlib.util.find_spec(package) is not None else None
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    s = parse_args(argv)
    RESULTS.clear()
    threads = torch.get_num_threads()
    if s.tiny and s.device.type == "cpu":
        torch.set_num_threads(1)  # tiny ops: threads only contend
    try:
        return run_all(s)
    finally:
        torch.set_num_threads(threads)


def run_all(s: Settings) -> dict[str, Any]:
    if s.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run_section(s, "env", 0, lambda: environment(s))
    matmul = run_section(s, "matmul", 5, lambda: matmul_peak(s))
    peak = matmul.get("tflops")

    holder: dict[str, Workload] = {}

    def do_setup():
        work, info = setup(s)
        holder["work"] = work
        return info

    run_section(s, "setup", 30, do_setup)
    work = holder.get("work")

    def needs_work(fn):
        def wrapped():
            if work is None:
                raise RuntimeError("setup failed (see the setup line)")
            return fn()
        return wrapped

    run_section(s, "attention", 10, lambda: attention_bench(s, work))
    both = s.checkpointing == "both"
    first = s.checkpointing != "off"
    ours = run_section(s, "train_ours", 30, needs_work(lambda: train_ours(s, work, peak, first)))

    def export():
        export_to_hf(s, work)
        return {"hf_dir": str(work.hf_dir), "note": work.export_note}

    run_section(s, "export_hf", 60, needs_work(export))
    hf = run_section(s, "train_hf", 60, needs_work(lambda: train_hf(s, work, peak, first)))
    decode = run_section(s, "decode", 30, needs_work(lambda: decode_bench(s, work)))
    extra = {}
    if both:
        extra["ours_nockpt"] = run_section(s, "train_ours_nockpt", 30,
                                           needs_work(lambda: train_ours(s, work, peak, False)))
        extra["hf_nockpt"] = run_section(s, "train_hf_nockpt", 45, needs_work(lambda: train_hf(s, work, peak, False)))
    if s.compile:
        extra["ours_compiled"] = run_section(s, "train_ours_compiled", 150,
                                             needs_work(lambda: train_ours(s, work, peak, first, compiled=True)))
    if work is not None and work.hf_dir is not None:
        shutil.rmtree(work.hf_dir.parent, ignore_errors=True)

    def ratio(a, b):
        x, y = a.get("real_tokens_per_s"), b.get("real_tokens_per_s")
        return rounded(x / y, 3) if x and y else None

    summary = {
        "section": "summary",
        "device": RESULTS[0].get("gpu") or RESULTS[0].get("device"),
        "machine": common.cpu_info(),
        "measured_peak_tflops": peak,
        "ours_real_tokens_per_s": ours.get("real_tokens_per_s"),
        "hf_real_tokens_per_s": hf.get("real_tokens_per_s"),
        "speedup": ratio(ours, hf),
        "mfu_989": ours.get("mfu_989"),
        "mfu_measured_peak": ours.get("mfu_measured_peak"),
        "hf_mfu_989": hf.get("mfu_989"),
        "checkpointing": first,
        "decode_speedup": decode.get("speedup"),
        "attention_convention": "12*L*d*s^2 per sample (full square); mfu_989_causal in the train lines uses 6",
        "precision": f"pure {str(s.dtype).removeprefix('torch.')} (weights, grads, AdamW states)",
    }
    if both:
        summary["speedup_nockpt"] = ratio(extra["ours_nockpt"], extra["hf_nockpt"])
        summary["mfu_989_nockpt"] = extra["ours_nockpt"].get("mfu_989")
    if s.compile:
        summary["compiled_real_tokens_per_s"] = extra["ours_compiled"].get("real_tokens_per_s")
        summary["compiled_mfu_989"] = extra["ours_compiled"].get("mfu_989")
        summary["speedup_compiled"] = ratio(extra["ours_compiled"], hf)
    best_mfu = max([r.get("mfu_989") or 0 for r in [ours, *extra.values()] if r.get("section", "").startswith("train_ours")],
                   default=0)
    summary["goals"] = {"mfu_989>=0.45": bool(summary["mfu_989"] and summary["mfu_989"] >= 0.45),
                        "best_mfu_989": best_mfu,
                        "speedup>=1.8": bool(summary["speedup"] and summary["speedup"] >= 1.8)}
    summary["failed"] = [r["section"] for r in RESULTS if "error" in r]
    summary["skipped"] = [r["section"] for r in RESULTS if "skipped" in r]
    summary["elapsed_s"] = round(time.perf_counter() - s.started, 1)
    emit(summary)
    return summary


if __name__ == "__main__":
    main()
