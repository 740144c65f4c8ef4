"""Peak memory of the next-token loss over a 256k vocabulary: ours against full fp32 logits.

- full: `F.cross_entropy((hidden @ weight.T).float(), targets)`, logits for every token at once;
- ours: `lm.loss.chunked_cross_entropy(hidden, weight, targets)` at its default chunk size.

Both run forward and backward (gradients for the hidden states and for the output head), each in a
subprocess of its own: on CPU the peak is the rise of the process's peak resident memory (VmHWM,
reset through /proc/self/clear_refs once the inputs exist) over its resident memory at that
moment; on CUDA it is torch.cuda.max_memory_allocated over the memory allocated at that moment.
The weight's gradient is part of both peaks. Each subprocess saves its loss and gradients, and
the parent compares them (max abs difference).

Inputs: hidden states ~ N(0, 1) (what a final RMSNorm gives), head weight ~ N(0, 0.02), targets
uniform over the vocabulary, all labelled. --dtype bfloat16 or float32; by default the dtype the
device computes natively (benchmarks.common.native_dtype: bf16 on CUDA and on CPUs with AVX-512
BF16 or AMX, else float32, since a CPU without bf16 units emulates bf16 products through fp32 and
the run then takes tens of minutes). The JSON line says which dtype ran and why.

What the peaks hold, at the defaults (256k vocabulary, 2048 wide, 4096 tokens): full holds the
logits three times over at its peak (fp32 logits, their log-softmax and its gradient: 3.9 GB each in
fp32) plus the head's gradient; ours holds the head's gradient (2 GB in fp32, 1 GB in bf16) plus
one chunk's buffers, which `chunked_cross_entropy` sizes by bytes (lm.loss.default_chunk_size).

    python benchmarks/loss_memory.py                   # one JSON line on stdout
    python benchmarks/loss_memory.py --dtype float32   # the same figures in fp32 on any machine
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import BF16_FLAGS, cpu_info, emit, has_native_bf16, machine_info, native_dtype  # noqa: E402
from lm.loss import chunked_cross_entropy, default_chunk_size  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
VARIANTS = ("full", "ours")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab-size", type=int, default=256_000)
    parser.add_argument("--hidden-size", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=4096, help="labelled tokens")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="of hidden states and head weight (default: the device's native one, see above)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="ours; default: chunked_cross_entropy's own (sized by memory)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- one variant, in its own process ---------------------------------------------------------------


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _start_peak(device: torch.device) -> int:
    """Bytes in use now, with the peak counter reset to it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    return _status_kb("VmRSS") * 1024


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _status_kb("VmHWM") * 1024


def full_logits_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((hidden @ weight.t()).float(), targets)


def run_variant(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    generator = torch.Generator(device).manual_seed(args.seed)
    # Drawn directly in the target dtype: an fp32 draw of the weight would leave a 2 GB high-water mark.
    hidden = torch.randn(args.tokens, args.hidden_size, generator=generator, device=device, dtype=dtype)
    weight = torch.randn(args.vocab_size, args.hidden_size, generator=generator, device=device, dtype=dtype)
    weight.mul_(0.02)
    targets = torch.randint(0, args.vocab_size, (args.tokens,), generator=generator, device=device)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    options = {} if args.chunk_size is None else {"chunk_size": args.chunk_size}

    baseline = _start_peak(device)
    start = time.perf_counter()
    if args.worker == "full":
        loss = full_logits_loss(hidden, weight, targets)
    else:
        loss = chunked_cross_entropy(hidden, weight, targets, **options)
    loss.backward()
    peak = _peak(device)
    seconds = time.perf_counter() - start
    torch.save({"loss": loss.detach().cpu(), "hidden_grad": hidden.grad.cpu(), "weight_grad": weight.grad.cpu(),
                "peak_bytes": peak - baseline, "seconds": seconds}, args.out)


# --- the parent --------------------------------------------------------------------------------------


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor, rows: int = 16384) -> float:
    """In slices of rows, so that comparing two head gradients needs no fp32 copy of either."""
    return max(float((a[i:i + rows].float() - b[i:i + rows].float()).abs().max()) for i in range(0, a.shape[0], rows))


def default_dtype(device: str) -> tuple[str, str]:
    """(dtype name, why) for a run without --dtype."""
    dtype = native_dtype(device)
    name = str(dtype).removeprefix("torch.")
    if torch.device(device).type == "cuda":
        return name, f"default: native on {torch.cuda.get_device_name(device)}"
    cpu = cpu_info()
    found = [flag for flag in BF16_FLAGS if flag in cpu["vector_extensions"]]
    if has_native_bf16():
        return name, f"default: this CPU has {' and '.join(found)}"
    if found:
        return name, f"default: this CPU has {' and '.join(found)}, but the kernels are held below them " \
                     f"({cpu['isa_settings']}; bf16 would be emulated)"
    return name, "default: this CPU has neither avx512_bf16 nor amx_bf16 (bf16 would be emulated)"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        run_variant(args)
        return {}
    if args.dtype is None:
        args.dtype, dtype_reason = default_dtype(args.device)
    else:
        dtype_reason = "given (--dtype)"
    forwarded = ["--vocab-size", str(args.vocab_size), "--hidden-size", str(args.hidden_size), "--tokens",
                 str(args.tokens), "--dtype", args.dtype, "--device", args.device, "--threads", str(args.threads),
                 "--seed", str(args.seed)]
    if args.chunk_size is not None:
        forwarded += ["--chunk-size", str(args.chunk_size)]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            out = Path(tmp) / f"{variant}.pt"
            subprocess.run([sys.executable, str(Path(__file__).resolve()), *forwarded, "--worker", variant,
                            "--out", str(out)], check=True)
            runs[variant] = torch.load(out)
            out.unlink()  # the head gradient alone is 1 GB in bf16
    full, ours = runs["full"], runs["ours"]
    gib = 2**30
    weight_grad_bytes = args.vocab_size * args.hidden_size * DTYPES[args.dtype].itemsize
    result = {
        "benchmark": "loss_memory",
        "memory_ratio": round(ours["peak_bytes"] / full["peak_bytes"], 4),
        "ours_peak_gib": round(ours["peak_bytes"] / gib, 3),
        "full_peak_gib": round(full["peak_bytes"] / gib, 3),
        "head_grad_gib": round(weight_grad_bytes / gib, 3),
        "loss_ours": float(ours["loss"]),
        "loss_full": float(full["loss"]),
        "loss_diff": abs(float(ours["loss"]) - float(full["loss"])),
        "hidden_grad_max_diff": _max_abs_diff(ours["hidden_grad"], full["hidden_grad"]),
        "hidden_grad_max": float(full["hidden_grad"].abs().max()),
        "weight_grad_max_diff": _max_abs_diff(ours["weight_grad"], full["weight_grad"]),
        "weight_grad_max": float(full["weight_grad"].abs().max()),
        "ours_seconds": round(ours["seconds"], 2),
        "full_seconds": round(full["seconds"], 2),
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "tokens": args.tokens,
        "dtype": args.dtype,
        "dtype_reason": dtype_reason,
        "chunk_size": args.chunk_size or default_chunk_size(args.vocab_size, DTYPES[args.dtype]),
        "chunk_size_source": "given (--chunk-size)" if args.chunk_size else "chunked_cross_entropy's default",
        "device": args.device,
        "measure": "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "VmHWM rise (RSS)",
        "threads": args.threads,
        "machine": machine_info(),
    }
    return emit(result)


if __name__ == "__main__":
    main()
