#!/usr/bin/env bash
# RESULTS.md "Pruned students after 150 steps": each student shape of scripts/prune-dolly.sh trained for the same
# 150 steps of 8 (dolly-cpu's data and fine-tuned teacher) with one method, then evaluated greedily on the first
# 100 rows of Dolly's valid split (the choice) and test split (reported beside it), before (student_init) and after
# training. One `python -m kdlab.run` per row; each run's results.json holds the ROUGE-L and loss of both splits,
# its metrics.jsonl the step time (train/step_time_s). A finished run's small files (results.json, metrics.jsonl,
# config.yaml) are kept in $KEPT/shape-<name>-<method>/ (default results/shapes-dolly, what
# scripts/shapes-table.py reads); rows kept there are skipped (on a fresh clone too), interrupted ones resume (on
# the same machine: their checkpoints are not kept).
#   scripts/shapes-dolly.sh sft     # one method per call: RESULTS.md ran `sft` and `kd` side by side, one thread each
#   scripts/shapes-dolly.sh kd
#   OUT=... (default outputs) shares the fine-tuned teacher and the pruned students with the other scripts.
set -uo pipefail
method=${1:?usage: scripts/shapes-dolly.sh <method> [row ...]}; shift
OUT=${OUT:-outputs}
KEPT=${KEPT:-results/shapes-dolly}
python=${PYTHON:-python}
valid='{valid:{source:jsonl,path:../shared/data/dolly-1k/valid.jsonl,file_split:test,max_prompt_length:128,max_length:192}}'
common=(+experiment=dolly-cpu student=smollm2-6l "method=$method" "output_dir=$OUT" train.max_steps=150 train.epochs=null
        train.eval_every=null eval.test_examples=100 eval.analysis.enabled=false '~eval.datasets' "+eval.datasets=$valid")
pruned=(student.init=pruned student.num_layers=null)   # on smollm2-6l: its prune settings are all defaults
declare -A rows=(
  [depth-width-50-loss]="${pruned[*]} student.prune={num_layers:20,intermediate_size:1024,depth_criterion:loss,calibration_rows:16}"
  [even-15]="student.num_layers=15"
  [bi-15]="${pruned[*]} student.prune={calibration_rows:64,num_layers:15,depth_criterion:block_influence}"
  [width-50-mlp]="${pruned[*]} student.prune={calibration_rows:64,intermediate_size:512}"
  [loss-15]="${pruned[*]} student.prune={num_layers:15,depth_criterion:loss,calibration_rows:16}"
  [width-50]="${pruned[*]} student.prune={calibration_rows:64,num_attention_heads:6,intermediate_size:640}"
  [angular-15]="${pruned[*]} student.prune={calibration_rows:64,num_layers:15,depth_criterion:angular}"
  [depth-width-25b-loss]="${pruned[*]} student.prune={num_layers:10,intermediate_size:1024,depth_criterion:loss,calibration_rows:16}"
  [even-8]="student.num_layers=8"
  [bi-8]="${pruned[*]} student.prune={calibration_rows:64,num_layers:8,depth_criterion:block_influence}"
  [width-25]="${pruned[*]} student.prune={calibration_rows:64,num_attention_heads:3,intermediate_size:256}"
  [loss-8]="${pruned[*]} student.prune={num_layers:8,depth_criterion:loss,calibration_rows:16}"
  [angular-8]="${pruned[*]} student.prune={calibration_rows:64,num_layers:8,depth_criterion:angular}"
)
# the order they run in: the dolly-cpu student and its rivals at 50 % first, then 25 %
order=(depth-width-50-loss even-15 bi-15 width-50-mlp loss-15 depth-width-25b-loss even-8 bi-8 width-25
       width-50 angular-15 loss-8 angular-8)
[ $# -gt 0 ] && order=("$@")
status=0
for name in "${order[@]}"; do
  [ -n "${rows[$name]:-}" ] || { echo "unknown row $name; rows: ${!rows[*]}" >&2; exit 2; }
  models='[student_init,student]'
  [ "$name" = depth-width-50-loss ] && [ "$method" = sft ] && models='[teacher,student_init,student]'
  read -r -a overrides <<< "${rows[$name]}"
  run=shape-$name-$method
  if [ -f "$KEPT/$run/results.json" ]; then
    echo "# $method $name: kept in $KEPT/$run, skipped" >&2
    continue
  fi
  echo "# $method $name" >&2
  "$python" -m kdlab.run "${common[@]}" "run_name=$run" "student.name=$name" "eval.models=$models" \
    "${overrides[@]}" || status=1
  for found in "$OUT/runs/$run"/*/results.json; do
    [ -f "$found" ] || continue
    bash "$(dirname "$0")/keep-run.sh" "$(dirname "$found")" "$KEPT/$run" || status=1
  done
done
exit $status
