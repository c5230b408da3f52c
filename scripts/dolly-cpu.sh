#!/usr/bin/env bash
# RESULTS.md's comparison (experiments/dolly-cpu.yaml): every method x 3 seeds, seed by seed so that a partial
# run has every method, then the reference rows (fine-tuned teacher, student_init) and the report with paired
# intervals against SFT. Finished jobs are skipped and interrupted ones resume: run it again to continue.
#   scripts/dolly-cpu.sh            (estimated 8-9 hours on 2 idle CPU cores, RESULTS.md; OUTPUT_DIR=... to write elsewhere)
set -uo pipefail
out=${OUTPUT_DIR:-outputs}
python=${PYTHON:-python}
status=0
for seed in 1 2 3; do
  for sweep in dolly-cpu dolly-cpu-rkl dolly-cpu-minillm; do
    "$python" -m kdlab.run +experiment=dolly-cpu +sweep=$sweep hydra.sweeper.params.seed=$seed "output_dir=$out" || status=1
  done
done
"$python" -m kdlab.run +experiment=dolly-cpu method=sft 'eval.models=[teacher,student_init,student]' "output_dir=$out" || status=1
"$python" -m kdlab.report "$out/multirun/dolly-cpu" --out results/dolly-cpu --baseline sft || status=1
exit $status
