#!/usr/bin/env bash
# RESULTS.md "Pruned students": the default main job's student size (6 of 30 blocks' parameters, the embedded
# synthetic data) cut evenly (today's default, smollm2-6l), pruned by each depth criterion, and by depth + width
# (row bi-12x512 is smollm2-pruned-20); starting loss on its valid and test splits, forward passes only
# (importance on 16 calibration rows of the training split). One JSON line per row.
#   OUT=/tmp/prune-default scripts/prune-default.sh > prune-default.jsonl
set -euo pipefail
OUT=${OUT:-outputs}
python=${PYTHON:-python}
common=("output_dir=$OUT" 'report.splits=[valid,test]' report.teacher=true)
row() { echo "# $*" >&2; "$python" -m kdlab.prune "${common[@]}" "$@" | tail -n 1; }
row student.name=even-6
row student.name=bi-6 student.init=pruned student.num_layers=null 'student.prune={num_layers:6,depth_criterion:block_influence,calibration_rows:16}'
row student.name=loss-6 student.init=pruned student.num_layers=null 'student.prune={num_layers:6,depth_criterion:loss,calibration_rows:16}'
# depth + width at the same block parameters as 6 whole blocks (21.2 M): more blocks, fewer MLP neurons
row student.name=bi-12x512 student.init=pruned student.num_layers=null 'student.prune={num_layers:12,intermediate_size:512,depth_criterion:block_influence,calibration_rows:16}'
row student.name=bi-10x768 student.init=pruned student.num_layers=null 'student.prune={num_layers:10,intermediate_size:768,depth_criterion:block_influence,calibration_rows:16}'
