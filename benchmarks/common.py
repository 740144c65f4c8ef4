"""What the benchmarks share: the machine they ran on, the small VLM they build, Hugging Face
loading, timing, and the JSON line they print.

Each benchmark is a script (`python benchmarks/NAME.py`) that puts the repository root on sys.path
and imports this module as `benchmarks.common`.

- `cpu_info()`, `machine_info(*packages)`: the CPU model, its vector extensions (from
  /proc/cpuinfo's flags) and the kernels torch picked for it (`cpu_capability`), so that a figure
  can be read against the hardware that made it: matrix products in bf16 run at full speed only
  with AVX-512 BF16 or AMX; AVX2-only CPUs emulate them.
- `native_dtype(device)`: the dtype this machine computes natively (bf16 on CUDA and on CPUs with
  avx512_bf16 / amx_bf16, else float32).
- `add_model_args(parser, **defaults)`, `build_vlm(args, max_seq_len)`: the ~50M-parameter model of
  train_step and decode (open_clip ViT tower, depth-2 MLP projector, Llama-shaped decoder).
- `build_onevision_vlm(args, max_seq_len)`: the same decoder and projector behind a SigLIP-style
  timm tower at OneVision's geometry (`register_siglip_tower`: 384 px / patch 14 by default, 729
  tokens a view), in LLaVA-OneVision's anyres layout (train_step_onevision).
- `load_hf_llava(model, directory, dtype)`: the same weights as transformers'
  LlavaForConditionalGeneration (sdpa attention), through `multimodal.export.export_hf_llava`;
  `load_hf_llava_onevision(...)`: LlavaOnevisionForConditionalGeneration, through
  `multimodal.export_onevision.export_hf_llava_onevision`.
- `FlopModel.of(model).training_flops(sample_lengths, images)`: useful FLOPs of a training step.
- `sync(device)`, `timed(fn, device)`, `median_seconds(runs, warmup, repeats)`,
  `matmul_tflops(n, dtype, device)`, `matmul_timer(...)`: timing (runs alternate, so a slow stretch of a shared machine
  hits every side alike).
- `rounded(value)`, `emit(result)`: the one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

# /proc/cpuinfo flags that decide how fast the benchmarks' kernels run, in the order of the ISA
# generations. AVX-512 BF16 and AMX make bf16 matrix products native; without them torch emulates
# bf16 through fp32 and a bf16 run is several times slower than fp32.
VECTOR_FLAGS = (
    "sse4_2", "avx", "f16c", "fma", "avx2", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "amx_fp16",
    # Arm: NEON (asimd), SVE, bf16 dot products
    "asimd", "sve", "sve2", "bf16",
)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# Environment variables that cap the instruction sets of torch's kernels: ATen's (and inductor's
# vector code, which follows it), the -march of inductor's C++ (native by default), oneDNN's, MKL's.
ISA_SETTINGS = ("ATEN_CPU_CAPABILITY", "TORCHINDUCTOR_CPP_MARCH", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")

TOKENIZER_TEXTS = [
    "A red circle on a blue background.",
    "Un círculo rojo sobre un fondo azul.",
    "Un cercle vermell sobre un fons blau.",
    "Describe the image in English, please.",
    "Describe la imagen en español.",
    "Descriu la imatge en català, si us plau.",
] * 20


# --- the machine ---------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _proc_cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo; ("", {}) where there is none."""
    model, flags = "", frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
        if model and flags:
            break
    return model, flags


def cpu_info() -> dict[str, Any]:
    """The CPU: model, usable cores, vector extensions, and the ATen kernel set torch runs."""
    model, flags = _proc_cpuinfo()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": model or platform.processor() or platform.machine(),
        "arch": platform.machine(),
        "cpus": cpus,
        "vector_extensions": [flag for flag in VECTOR_FLAGS if flag in flags],
        # What ATen dispatched to (DEFAULT / AVX2 / AVX512 / ...): lower than the flags allow when
        # ATEN_CPU_CAPABILITY says so.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": has_native_bf16(),
        # Settings that make the kernels use less than the CPU has (e.g. to run as an AVX2 CPU).
        "isa_settings": {name: os.environ[name] for name in ISA_SETTINGS if name in os.environ},
    }


def has_native_bf16() -> bool:
    """Whether torch multiplies bf16 matrices in hardware here: the CPU has AVX-512 BF16 or AMX-BF16
    and neither ATEN_CPU_CAPABILITY nor ONEDNN_MAX_CPU_ISA holds the kernels below them."""
    if not any(flag in _proc_cpuinfo()[1] for flag in BF16_FLAGS):
        return False
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return (torch.backends.cpu.get_cpu_capability().startswith("AVX512")
            and (onednn == "ALL" or "BF16" in onednn or "AMX" in onednn))


def native_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bf16 where the device computes it natively (CUDA with bf16 support; a CPU with AVX-512 BF16
    or AMX), else float32: a bf16 benchmark on a CPU without bf16 units measures the emulation."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if has_native_bf16() else torch.float32


def package_version(name: str) -> str | None:
    """The installed version of a distribution, from its metadata (no import: some cost seconds)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(*packages: str) -> dict[str, Any]:
    """`cpu_info()` plus torch's thread count, the load when measured, and software versions
    (torch and python always; `packages` by distribution name)."""
    info = cpu_info()
    info.update({
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    })
    for name in packages:
        info[name] = package_version(name)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# --- the model -----------------------------------------------------------------------------------


def add_model_args(parser: argparse.ArgumentParser, **defaults: int) -> argparse.ArgumentParser:
    """The model's size options (defaults: about 50M parameters); keyword arguments override the
    defaults by destination name (image_size=224, ...)."""
    group = parser.add_argument_group("model (random weights; defaults: about 50M parameters)")
    values = {"image_size": 112, "patch_size": 14, "vision_width": 384, "vision_layers": 6, "vocab_size": 16384,
              "d_model": 512, "layers": 8, "heads": 8, "kv_heads": 4, "d_ff": 1408, **defaults}
    group.add_argument("--image-size", type=int, default=values["image_size"])
    group.add_argument("--patch-size", type=int, default=values["patch_size"])
    group.add_argument("--vision-width", type=int, default=values["vision_width"])
    group.add_argument("--vision-layers", type=int, default=values["vision_layers"],
                       help="open_clip tower blocks (the last one's output is not used: feature layer -2)")
    group.add_argument("--vocab-size", "--vocab", dest="vocab_size", type=int, default=values["vocab_size"],
                       help="decoder vocabulary (output head width)")
    group.add_argument("--d-model", type=int, default=values["d_model"])
    group.add_argument("--layers", type=int, default=values["layers"], help="decoder blocks")
    group.add_argument("--heads", type=int, default=values["heads"])
    group.add_argument("--kv-heads", type=int, default=values["kv_heads"])
    group.add_argument("--d-ff", type=int, default=values["d_ff"])
    return parser


def build_vlm(args: argparse.Namespace, max_seq_len: int = 2048, seed: int = 0):
    """A VisionLanguageModel of the sizes in `args` (see add_model_args), random weights (speed
    does not depend on them; exact token or loss agreement with Hugging Face still tests the path):
    an open_clip ViT tower with LLaVA-1.5's choices (penultimate layer, class token dropped), an MLP
    projector of depth 2, and a Llama-shaped decoder whose vocabulary is wider than the small
    tokenizer's, as Salamandra's output head is a large share of its work."""
    import projector
    from encoders import OpenCLIPEncoder
    from lm.tokenizer import train_tokenizer
    from multimodal import VisionLanguageModel

    torch.manual_seed(seed)
    tokenizer = train_tokenizer(TOKENIZER_TEXTS, vocab_size=420)
    heads = max(1, args.vision_width // 64)
    clip = {
        "embed_dim": 64,
        "vision_cfg": {"image_size": args.image_size, "patch_size": args.patch_size, "width": args.vision_width,
                       "layers": args.vision_layers, "head_width": args.vision_width // heads},
    }
    encoder = OpenCLIPEncoder(clip, feature_layer=-2, drop_cls=True)
    proj = projector.build("mlp", encoder.hidden_size, args.d_model, depth=2)
    return VisionLanguageModel(encoder, proj, _decoder(args, max_seq_len), tokenizer,
                               image_token_id=tokenizer.reserved_token_id(1))


def _decoder(args: argparse.Namespace, max_seq_len: int):
    """The Llama-shaped decoder of the sizes in `args` (sdpa attention)."""
    from lm import Decoder, LMConfig

    return Decoder(LMConfig(
        vocab_size=args.vocab_size, n_layers=args.layers, d_model=args.d_model, n_heads=args.heads,
        n_kv_heads=args.kv_heads, d_ff=args.d_ff, max_seq_len=max_seq_len, attention="sdpa",
    ))


def register_siglip_tower(image_size: int, patch_size: int, width: int, depth: int, heads: int) -> str:
    """Register with timm (once) a SigLIP-style ViT of these sizes, random weights, no download: timm's
    vit_base_patch16_siglip_224 (what open_clip's SigLIP configs build) at another resolution, patch,
    width and depth; returns its timm name, which says the sizes."""
    import timm
    from timm.models import register_model

    name = f"vit_salamandra_bench_siglip{image_size}_p{patch_size}_w{width}_d{depth}_h{heads}"
    if timm.is_model(name):
        return name

    def create(pretrained: bool = False, **kwargs):
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        return timm.create_model("vit_base_patch16_siglip_224", pretrained=False, img_size=image_size,
                                 patch_size=patch_size, embed_dim=width, depth=depth, num_heads=heads, **kwargs)

    create.__name__ = create.__qualname__ = name
    register_model(create)
    return name


def build_onevision_vlm(args: argparse.Namespace, max_seq_len: int = 16384, seed: int = 0):
    """A VisionLanguageModel in LLaVA-OneVision's anyres layout (anyres_max_9 over the 36 pinpoints of
    --image-size tiles), random weights: a SigLIP-style timm tower (register_siglip_tower: --image-size,
    --patch-size, --vision-width, --vision-layers blocks of which the last is dropped, feature layer -2
    as OneVision keeps 26 of SigLIP's 27; tanh GELU; mean and std 0.5; all tokens kept), the MLP
    projector of depth 2, the decoder of build_vlm, an image and a video placeholder token."""
    import projector
    from encoders import OpenCLIPEncoder
    from lm.tokenizer import train_tokenizer
    from multimodal import VisionLanguageModel
    from multimodal.layouts import ImageLayout, onevision_pinpoints

    torch.manual_seed(seed)
    tokenizer = train_tokenizer(TOKENIZER_TEXTS, vocab_size=420)
    heads = max(1, args.vision_width // 64)
    tower = register_siglip_tower(args.image_size, args.patch_size, args.vision_width, args.vision_layers, heads)
    siglip = {
        "embed_dim": 64,
        "vision_cfg": {"image_size": args.image_size, "timm_model_name": tower, "timm_model_pretrained": False,
                       "timm_pool": "map", "timm_proj": "none"},
    }
    encoder = OpenCLIPEncoder(siglip, feature_layer=-2, activation="gelu_tanh",
                              preprocess_cfg={"mean": 0.5, "std": 0.5, "resize_mode": "squash"})
    proj = projector.build("mlp", encoder.hidden_size, args.d_model, depth=2)
    layout = ImageLayout.anyres("anyres_max_9", onevision_pinpoints(args.image_size))
    return VisionLanguageModel(encoder, proj, _decoder(args, max_seq_len), tokenizer,
                               image_token_id=tokenizer.reserved_token_id(1), layout=layout,
                               video_token_id=tokenizer.reserved_token_id(2))


def transformers_dtype_kwarg() -> str:
    """`dtype` replaced `torch_dtype` in transformers 4.56; older versions pass unknown names on."""
    import transformers

    version = tuple(int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if version >= (4, 56) else "torch_dtype"


def load_hf_llava(model, directory: Path, dtype: torch.dtype = torch.float32, attention: str = "sdpa"):
    """`model` written with export_hf_llava under `directory` and read back as transformers'
    LlavaForConditionalGeneration: the same weights on both sides of a comparison. Returns
    (hf_model, export directory)."""
    import transformers

    from multimodal.export import export_hf_llava

    out = export_hf_llava(model, Path(directory) / "llava")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(
        out, attn_implementation=attention, **{transformers_dtype_kwarg(): dtype})
    return hf, Path(out)


def load_hf_llava_onevision(model, directory: Path, dtype: torch.dtype = torch.float32, attention: str = "sdpa"):
    """`model` (anyres layout) written with export_hf_llava_onevision under `directory` and read back
    as transformers' LlavaOnevisionForConditionalGeneration. Returns (hf_model, export directory)."""
    import transformers

    from multimodal.export_onevision import export_hf_llava_onevision

    out = export_hf_llava_onevision(model, Path(directory) / "llava-onevision")
    hf = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(
        out, attn_implementation=attention, **{transformers_dtype_kwarg(): dtype})
    return hf, Path(out)


def param_count(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Parameters of `module`, without those whose name contains any of `skip`."""
    return sum(p.numel() for name, p in module.named_parameters() if not any(k in name for k in skip))


@dataclass
class FlopModel:
    """Useful FLOPs of a stage-2 training step (everything trains), counted as the project counts
    them (the performance notes): padding never counts;
      decoder   6 * N_dec per real token, N_dec the decoder without its input embedding (the output
                head included), plus attention 12 * L * d * s^2 per sample of s tokens (the full
                square; causal=True counts half of it, 6 * L * d * s^2);
      vision    3 * (2 * N_v + 4 * L_v * d_v * T_v) per image token (a trained tower; N_v without
                the position table, L_v the blocks that run, T_v its tokens per image);
      projector 6 * N_p per image token.
    An "image" here is one input of the encoder: an image in the fixed layout, a view (base view or
    tile) in the anyres layout, whose projector keeps every token (the newline embeddings, the
    unpadding and the bilinear reduction of OneVision's layout are not counted)."""

    n_decoder: int
    layers: int
    d_model: int
    n_vision: int
    vision_layers: int
    vision_width: int
    vision_tokens: int
    n_projector: int
    image_tokens: int  # projector output tokens per encoder input (image or view)

    @classmethod
    def of(cls, model) -> "FlopModel":
        encoder, decoder = model.encoder, model.decoder
        return cls(
            n_decoder=param_count(decoder, skip=("embed_tokens",)),
            layers=decoder.config.n_layers, d_model=decoder.config.d_model,
            n_vision=param_count(encoder, skip=("pos_embed", "positional_embedding")),
            vision_layers=encoder.num_layers, vision_width=encoder.hidden_size, vision_tokens=encoder.num_tokens,
            n_projector=param_count(model.projector),
            image_tokens=model.projector.num_output_tokens(encoder.num_tokens),
        )

    def training_flops(self, sample_lengths: list[int], images: int, causal: bool = False) -> float:
        """Useful FLOPs of one stage-2 step over samples of these lengths holding `images` images
        (encoder inputs: views in the anyres layout)."""
        attention = (6 if causal else 12) * self.layers * self.d_model
        decoder = sum(6 * self.n_decoder * n + attention * n * n for n in sample_lengths)
        per_vision_token = 2 * self.n_vision + 4 * self.vision_layers * self.vision_width * self.vision_tokens
        vision = 3 * per_vision_token * self.vision_tokens * images
        proj = 6 * self.n_projector * self.image_tokens * images
        return float(decoder + vision + proj)


# --- timing --------------------------------------------------------------------------------------


def sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | str | None = None) -> tuple[Any, float]:
    """(fn(), wall seconds), the device's queue drained before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def median_seconds(runs: dict[str, Callable[[], object]], warmup: int, repeats: int,
                   device: torch.device | str | None = None) -> dict[str, float]:
    """Median wall time of each run after `warmup` untimed rounds; the runs alternate within each
    round, so that a slow stretch of a shared machine hits every side alike."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            seconds[name].append(timed(run, device)[1])
    return {name: statistics.median(values) for name, values in seconds.items()}


def matmul_timer(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 iters: int | None = None) -> Callable[[], float]:
    """A function that times `iters` n x n x n matrix products (2 n^3 FLOPs each) in `dtype` and
    returns their TFLOP/s; the operands are made and warmed up once, here."""
    device = torch.device(device)
    iters = iters or (50 if device.type == "cuda" else 3)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(2 if device.type == "cpu" else 5):
        torch.mm(a, b, out=out)

    def run() -> None:
        for _ in range(iters):
            torch.mm(a, b, out=out)

    return lambda: 2 * n**3 * iters / timed(run, device)[1] / 1e12


def matmul_tflops(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  iters: int | None = None, rounds: int = 3) -> float:
    """The measured peak of an n x n x n matrix product in `dtype`, TFLOP/s: the best of `rounds`
    rounds of `iters` products (the least disturbed by other processes)."""
    measure = matmul_timer(n, dtype, device, iters)
    return max(measure() for _ in range(rounds))


# --- output --------------------------------------------------------------------------------------


def rounded(value: Any, digits: int = 4) -> Any:
    """Floats to `digits` decimals (non-finite ones to None: JSON has no NaN); the rest as is."""
    if isinstance(value, float):
        return round(value, digits) if math.isfinite(value) else None
    return value


def emit(result: dict[str, Any]) -> dict[str, Any]:
    """Print `result` as one JSON line on stdout (flushed) and return it."""
    print(json.dumps(result, default=str), flush=True)
    return result
