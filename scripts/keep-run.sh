#!/usr/bin/env bash
# Copy a finished run's small files (metrics.jsonl and config.yaml where it has them, then results.json) from one
# folder to another: results.json goes last, under a temporary name, so a folder copied halfway never looks
# complete. Used to keep finished runs and kdlab.eval's reference rows (which have no metrics.jsonl) beside the
# results (scripts/dolly-cpu.sh, scripts/shapes-dolly.sh) and to put them back on a fresh clone.
#   scripts/keep-run.sh <from> <to>
set -euo pipefail
from=$1 to=$2
[ -f "$from/results.json" ] || { echo "keep-run.sh: $from has no results.json: not a finished run" >&2; exit 1; }
mkdir -p "$to"
for small in metrics.jsonl config.yaml; do
  [ -f "$from/$small" ] && cp "$from/$small" "$to/"
done
cp "$from/results.json" "$to/.results.json.copying"
mv "$to/.results.json.copying" "$to/results.json"
