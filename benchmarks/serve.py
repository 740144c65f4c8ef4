"""Serving throughput: `salamandra-vl serve` with batching on (--max-batch, default 32 here: every
client may join one batch; the server's own default is 8) and off (--max-batch 1), the same 32
concurrent clients against each, alternating round by round.

Each client sends one chat-completion request (a held-out demo image as a data: URL and the caption
prompt of one of the demo's languages, greedy, --max-tokens new tokens) through HTTP to a
`salamandra-vl serve` process (one per side; only one is busy at a time). Throughput is requests per second from the first request to the last
answer; latency is per request. Batched and unbatched answers are compared before timing (answers_equal).

    python benchmarks/serve.py --checkpoint runs/demo/checkpoint      # one JSON line on stdout
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import emit, machine_info  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(checkpoint: str, max_batch: int):
    """`salamandra-vl serve` in its own process (as it is deployed: the clients' threads do not share
    its interpreter), once it answers /health."""
    import subprocess

    import httpx

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "multimodal.cli", "serve", "--checkpoint", str(checkpoint),
                                "--port", str(port), "--max-batch", str(max_batch), "--model-name", "bench"],
                               cwd=ROOT, stdout=subprocess.DEVNULL)
    for _ in range(1200):
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode})")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process, f"http://127.0.0.1:{port}"
        except httpx.TransportError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("the server did not start")


def requests_for(clients: int, max_tokens: int) -> list[dict]:
    from multimodal.demo import synthetic
    from multimodal.prompts import caption_prompt

    bodies = []
    for index, seed in enumerate(synthetic.split_seeds("test", clients, seed=0)):
        buffer = io.BytesIO()
        synthetic.render(synthetic.scene(seed)).save(buffer, format="PNG")
        url = f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"
        language = synthetic.LANGUAGES[index % len(synthetic.LANGUAGES)]
        bodies.append({"model": "bench", "max_tokens": max_tokens, "temperature": 0, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": caption_prompt(language)}]}]})
    return bodies


def run_round(url: str, bodies: list[dict]) -> tuple[float, list[float], list[str]]:
    """All clients at once (each its own thread and connection from one pool: a client per request
    would spend more time building its TLS context than the server spends answering)."""
    import httpx

    payloads = [json.dumps(body).encode() for body in bodies]
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    with httpx.Client(timeout=600, limits=limits) as http:
        def one(payload: bytes) -> tuple[float, str]:
            started = time.perf_counter()
            response = http.post(f"{url}/v1/chat/completions", content=payload,
                                 headers={"Content-Type": "application/json"})
            response.raise_for_status()
            return time.perf_counter() - started, response.json()["choices"][0]["message"]["content"]

        started = time.perf_counter()
        with ThreadPoolExecutor(len(bodies)) as pool:
            results = list(pool.map(one, payloads))
    return time.perf_counter() - started, [r[0] for r in results], [r[1] for r in results]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="runs/demo/checkpoint", help="a save_pretrained directory")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32,
                        help="the batched server's --max-batch (32: every client can share one batch)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per side, alternating")
    args = parser.parse_args(argv)

    if not (Path(args.checkpoint) / "config.json").exists():
        raise SystemExit(f"{args.checkpoint} is not a checkpoint: run `make demo` first (it writes runs/demo/checkpoint)")
    bodies = requests_for(args.clients, args.max_tokens)
    sides = {"batched": start(args.checkpoint, args.max_batch), "unbatched": start(args.checkpoint, 1)}
    # Warm-up and check: one round each, the same answers.
    answers = {name: run_round(url, bodies)[2] for name, (_, url) in sides.items()}
    # Greedy answers agree unless a near-tie flips with the batch's float rounding: counted, not hidden.
    equal = sum(a == b for a, b in zip(answers["batched"], answers["unbatched"]))
    walls = {name: [] for name in sides}
    latencies = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, (_, url) in sides.items():
            wall, latency, _ = run_round(url, bodies)
            walls[name].append(wall)
            latencies[name] += latency
    for process, _ in sides.values():
        process.terminate()
        process.wait(timeout=30)
    throughput = {name: args.clients * len(w) / sum(w) for name, w in walls.items()}
    result = {
        "benchmark": "serve",
        "speedup": round(throughput["batched"] / throughput["unbatched"], 3),
        "batched_requests_per_s": round(throughput["batched"], 2),
        "unbatched_requests_per_s": round(throughput["unbatched"], 2),
        **{f"{name}_latency_p50_s": round(statistics.median(lat), 3) for name, lat in latencies.items()},
        **{f"{name}_latency_p95_s": round(percentile(lat, 0.95), 3) for name, lat in latencies.items()},
        "clients": args.clients, "max_batch": args.max_batch, "max_tokens": args.max_tokens, "rounds": args.rounds,
        "answers_equal": f"{equal}/{args.clients}", "checkpoint": str(args.checkpoint),
        "answer_example": answers["batched"][0],
        "machine": machine_info(),
    }
    return emit(result)


if __name__ == "__main__":
    main()
