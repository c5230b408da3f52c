#!/usr/bin/env bash
# Copy a finished run's small files (metrics.jsonl, config.yaml, then results.json) from one folder to another:
# results.json goes last, under a temporary name, so a folder copied halfway never looks complete. Used to keep
# finished runs beside the results (scripts/dolly-cpu.sh, scripts/shapes-dolly.sh) and to put them back on a
# fresh clone.   scripts/keep-run.sh <from> <to>
set -euo pipefail
from=$1 to=$2
mkdir -p "$to"
cp "$from/metrics.jsonl" "$from/config.yaml" "$to/"
cp "$from/results.json" "$to/.results.json.copying"
mv "$to/.results.json.copying" "$to/results.json"
