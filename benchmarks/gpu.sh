#!/bin/bash
# The GPU benchmark on the device machine, in one command:  bash benchmarks/gpu.sh [gpu.py options]
# (default options: --budget-s 420 --compile; the whole run stays under 8 minutes).
# The machine has torch, transformers and lightning but not open_clip_torch, webdataset or xformers:
# put their wheels in .whl/ first, on a machine with internet (xformers built for this machine's torch
# and CUDA); they are installed here with --no-deps --no-index into /tmp/site.
# Output: JSON lines on stdout, also written to $OUT/gpu.jsonl (stderr to $OUT/gpu.stderr.log) when $OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -n "${OUT:-}" ] && mkdir -p "$OUT" && : > "$OUT/gpu.jsonl"
note() { echo "$1"; [ -n "${OUT:-}" ] && echo "$1" >> "$OUT/gpu.jsonl"; return 0; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
    || note '{"section": "install", "error": "pip install of .whl/*.whl failed"}'
else
  note '{"section": "install", "error": "no .whl/*.whl: put the open_clip_torch, webdataset and xformers wheels in .whl/ first (open_clip and xformers sections will fail)"}'
fi
export HF_HUB_OFFLINE=1  # nothing here may reach the network
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--budget-s 420 --compile)
if [ -n "${OUT:-}" ]; then
  timeout -s INT -k 30 480 python3 benchmarks/gpu.py "${args[@]}" 2> "$OUT/gpu.stderr.log" | tee -a "$OUT/gpu.jsonl"
else
  timeout -s INT -k 30 480 python3 benchmarks/gpu.py "${args[@]}"
fi
status=${PIPESTATUS[0]}
[ "$status" -eq 124 ] && note '{"section": "timeout", "error": "gpu.py passed 480 s and was stopped"}'
# 124 would read as the device tool's own timeout: report ours as 3.
exit $(( status == 124 ? 3 : status ))
