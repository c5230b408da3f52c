#!/usr/bin/env bash
# The "Pruned students" table of RESULTS.md: the starting loss (response tokens, nats) on Dolly's valid split
# and test split (first 100 rows each, minus prompts over dolly-cpu's 128 tokens) of students cut from
# SmolLM2-135M-Instruct at ~50 % and ~25 % of its transformer-block parameters: the even cut, depth pruning by
# each criterion, width pruning, depth + width. Forward passes only: `python -m kdlab.prune` per row (its last
# line is a JSON object). The importance is measured once, on the first 64 training rows (2 shared CPU cores:
# the default 256 costs a full-teacher pass over 256 rows), and shared by every row
# (<output_dir>/students/*.importance.json). student=smollm2-6l: a base whose prune settings are all defaults, so
# that each row sets its whole shape (dolly-cpu's own student is pruned, and its settings would merge in).
#   OUT=/tmp/prune-dolly scripts/prune-dolly.sh > prune-dolly.jsonl
set -euo pipefail
OUT=${OUT:-outputs}
common=(+experiment=dolly-cpu student=smollm2-6l train.valid_examples=null eval.test_examples=100 "output_dir=$OUT"
        "report.splits=[valid,test]" report.teacher=false)
pruned=(student.init=pruned student.num_layers=null)
row() { echo "# $*" >&2; python -m kdlab.prune "${common[@]}" "$@" | tail -n 1; }
prune() { row student.name="$1" "${pruned[@]}" "student.prune={calibration_rows:64,$2}"; }

row student.name=even-15 student.num_layers=15                      # 50 % of the block parameters
prune bi-15 num_layers:15,depth_criterion:block_influence
prune width-50 num_attention_heads:6,intermediate_size:640
row student.name=even-8 student.num_layers=8                        # 27 %
prune bi-8 num_layers:8,depth_criterion:block_influence
prune width-25 num_attention_heads:3,intermediate_size:256          # 25 %
prune angular-15 num_layers:15,depth_criterion:angular
prune angular-8 num_layers:8,depth_criterion:angular
prune depth-width-50 num_layers:20,intermediate_size:1024           # 50 %
prune depth-width-25 num_layers:15,num_attention_heads:6,intermediate_size:640   # 25 %
# the loss criterion costs one calibration pass per block (30): measured on 16 calibration rows
prune loss-15 num_layers:15,depth_criterion:loss,calibration_rows:16
prune loss-8 num_layers:8,depth_criterion:loss,calibration_rows:16
row student.name=teacher-30 student.num_layers=30                   # all 30 blocks: the teacher itself
# more shapes of the same sizes, after the first results (depth + width led at 50 %, the loss criterion at depth)
prune depth-width-50-loss num_layers:20,intermediate_size:1024,depth_criterion:loss,calibration_rows:16
prune depth-width-25b num_layers:10,intermediate_size:1024                                     # 25 %
prune depth-width-25b-loss num_layers:10,intermediate_size:1024,depth_criterion:loss,calibration_rows:16
prune width-50-mlp intermediate_size:512                                                       # 50 %
prune width-50-l2 num_attention_heads:6,intermediate_size:640,width_aggregation:l2
prune depth-width-25c num_layers:12,intermediate_size:768                                      # 25 %
# Minitron's teacher correction: the same shape pruned from the fine-tuned teacher (dolly-cpu's teacher.finetune)
prune depth-width-50-loss-ft num_layers:20,intermediate_size:1024,depth_criterion:loss,calibration_rows:16,source:finetuned
