#!/usr/bin/env bash
# Print the newest complete checkpoint (highest step) in DIR, or in the checkpoint.dirpath of a
# YAML config, or nothing when there is none.
#   scripts/slurm/newest-checkpoint.sh runs/salamandra-7b-siglip/stage2-fsdp/checkpoints
#   scripts/slurm/newest-checkpoint.sh configs/salamandra-7b-siglip-stage2-fsdp.yaml
# Complete: a sharded checkpoint directory with its meta.pt, or a single-file checkpoint. An
# interrupted save leaves only a hidden .NAME.partial-* directory, which never matches. last.ckpt
# is left out on purpose: with several ranks Lightning may resolve it to another file than the
# newest (Lightning#19932), and the step-numbered ones say what they hold.
set -euo pipefail
dir=${1:?usage: newest-checkpoint.sh CHECKPOINT_DIR | CONFIG.yaml}
if [ -f "$dir" ]; then
    dir=$(python -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["checkpoint"]["dirpath"])' "$dir")
fi
[ -d "$dir" ] || exit 0
for path in "$dir"/*step=*.ckpt; do
    [ -e "$path" ] || continue
    if [ -f "$path/meta.pt" ] || [ -f "$path" ]; then
        step=${path##*step=}
        echo "${step%.ckpt} $path"
    fi
done | sort -n | tail -n 1 | cut -d' ' -f2-
