#!/usr/bin/env bash
# RESULTS.md's comparison (experiments/dolly-cpu.yaml): every method x 3 seeds (27 jobs), seed by seed so that a
# partial run has every method, then the reference rows (the fine-tuned teacher and student_init, evaluated by
# kdlab.eval without training; their table: results/dolly-cpu/reference/report.md) and the reports with paired
# intervals (results/dolly-cpu/). Run it again to continue: finished jobs and reference rows are skipped (on a
# fresh clone too: those kept under results/dolly-cpu/runs/ and reference/ are put back first), interrupted jobs
# resume (on the same machine: their checkpoints are not kept).
#   scripts/dolly-cpu.sh                            one job at a time
#   JOBS=2 OMP_NUM_THREADS=1 scripts/dolly-cpu.sh   two jobs side by side, one thread each (RESULTS.md: about the
#                                                   throughput of one job on 2 threads, every job timed alike)
#   OUTPUT_DIR=... to write the runs elsewhere (default outputs), RESULTS_DIR=... the reports (default
#   results/dolly-cpu); PYTHON=... for another interpreter.
set -uo pipefail
out=${OUTPUT_DIR:-outputs}
python=${PYTHON:-python}
results=${RESULTS_DIR:-results/dolly-cpu}
jobs=${JOBS:-1}
status=0
# A fresh clone (a new machine or session) holds only the kept small files of the finished jobs (below): they are
# put back where their jobs run, so those jobs are found complete and skipped (a kept config.yaml that differs from
# the job's resolved config makes that job refuse its folder in one line; scripts/keep-run.sh copies results.json
# last, so a folder restored halfway never looks complete). A job's own results are never overwritten.
shopt -s nullglob
for kept in "$results"/runs/*/*/results.json; do
  from=$(dirname "$kept"); to="$out/multirun/dolly-cpu/$(basename "$(dirname "$from")")/$(basename "$from")"
  [ -e "$to/results.json" ] && continue
  bash "$(dirname "$0")/keep-run.sh" "$from" "$to" || status=1
done
# One line per job: its sweep and the overrides that pick one job of it (each job is a one-job multirun, so it
# lands in the sweep's own folder, outputs/multirun/dolly-cpu/<method>-<student>-s<seed>/).
for seed in 1 2 3; do
  for method in sft kd seqkd imitkd gkd dpkd okd; do
    echo "dolly-cpu hydra.sweeper.params.seed=$seed hydra.sweeper.params.method=$method"
  done
  echo "dolly-cpu-rkl hydra.sweeper.params.seed=$seed"
  echo "dolly-cpu-minillm hydra.sweeper.params.seed=$seed"
done | xargs -P "$jobs" -L 1 bash -c \
  'python=$0 out=$1 sweep=$2; shift 2; "$python" -m kdlab.run +experiment=dolly-cpu "+sweep=$sweep" "$@" "output_dir=$out"' \
  "$python" "$out" || status=1
# The reference rows: the fine-tuned teacher, and the pruned student before training (kdlab.eval's `student`
# row without student.path is the student as its group builds it: student_init). Measured once: rows kept by an
# earlier clone (results/dolly-cpu/reference/) are put back like the runs, and finished rows are not measured again.
reference="$out/eval/dolly-cpu-reference"
if [ ! -e "$reference/results.json" ] && [ -f "$results/reference/results.json" ]; then
  bash "$(dirname "$0")/keep-run.sh" "$results/reference" "$reference" || status=1
fi
if [ ! -e "$reference/results.json" ]; then
  "$python" -m kdlab.eval +experiment=dolly-cpu 'eval.models=[teacher,student]' "output_dir=$out" \
    "hydra.run.dir=$reference" || status=1
fi
# The tables each claim is read from (RESULTS.md): every method against SFT, against forward-KL KD (reverse KL,
# on-policy methods, DPKD), against GKD and MiniLLM (OKD), and the exposure bias against MiniLLM.
report() { "$python" -m kdlab.report "$out/multirun/dolly-cpu" "$@" || status=1; }
report --out "$results" --baseline sft
report --out "$results/vs-kd" --baseline 'kd (fkl)'
report --out "$results/vs-gkd" --baseline gkd
report --out "$results/vs-minillm" --baseline minillm
report --out "$results/exaccerr" --baseline minillm --metric exaccerr.l=16
# What the students learnt besides ROUGE-L, against SFT: the loss on the gold test responses (every scored row),
# the forward KL from the teacher on them (the first 50 rows, teacher-forced), and the greedy outputs' Dist-4.
for metric in loss kl dist4; do report --out "$results/$metric" --baseline sft --metric "$metric"; done
mkdir -p "$results" && "$python" scripts/dolly-cpu-claims.py "$results" > "$results/claims.md" || status=1
# Each finished job's small files (scores, per-row ROUGE-L, samples, curves, config) are kept beside the reports,
# under its job and override folder (kd and kd with reverse KL share a job name).
if [ -f "$reference/results.json" ]; then
  bash "$(dirname "$0")/keep-run.sh" "$reference" "$results/reference" || status=1
  "$python" -m kdlab.report "$reference" --out "$results/reference" > /dev/null || status=1   # its table: report.md
fi
for found in "$out"/multirun/dolly-cpu/*/*/results.json; do
  run=$(dirname "$found"); job=$(basename "$(dirname "$run")")
  dest="$results/runs/$job/$(basename "$run")"
  bash "$(dirname "$0")/keep-run.sh" "$run" "$dest" || status=1
done
exit $status
