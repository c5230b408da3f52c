#!/usr/bin/env bash
# kdlab's GPU check: one prepared command for a bare CUDA machine with no network (`make gpu-check`).
#
#   tests/gpu/run_gpu_check.sh [STEP ...]     run every step (or only the named ones)
#   tests/gpu/run_gpu_check.sh --list         print the steps (name, timeout, command) and exit
#
# It stops at once with one line `gpu-check: no CUDA device (...)` and exit code 2 where torch sees no
# CUDA device. Otherwise it installs the wheels of wheelhouse/ (tests/gpu/build_wheelhouse.sh, built on
# a machine with PyPI) into a scratch folder, then runs each step under its own timeout, continuing past
# failures: bf16 `hardware=gpu` smoke jobs of every method (+experiment=smoke: tiny random models, no
# embedded teacher), `hardware=zero2|zero3` through torchrun on one GPU, and the generation, kd_step and
# onpolicy benchmarks in bf16 on a teacher of the embedded one's shape with random weights (from the
# wheelhouse's smollm2-135m/; without it, on tiny models) and its 6-layer student; where vLLM is installed,
# a kd job whose teacher is the embedded GGUF served by `vllm serve` (tests/gpu/served_vllm.sh). Results go
# to one folder: $GPU_CHECK_RESULTS, else $OUT, else gpu-check-results/: summary.json (pass/fail/seconds
# of each step, each job's results.json, the machine), gpu-check.log (every step's output) and
# benchmarks.jsonl (the benchmark records). Exit code: 0 when every step passed, 1 otherwise.
#
# Environment: PYTHON (python3), GPU_CHECK_WHEELHOUSE (wheelhouse/), GPU_CHECK_WORK (a fresh /tmp folder:
# run folders and installed wheels), GPU_CHECK_BUDGET_S (540: steps that would start later are skipped,
# so that the whole check fits one 10-minute command).
set -uo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
python=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET_S:-540}
work=${GPU_CHECK_WORK:-/tmp/kdlab-gpu-check-$$}
wheelhouse=${GPU_CHECK_WHEELHOUSE:-$root/wheelhouse}

# name <TAB> timeout seconds <TAB> shell command; job steps write their run folder to $work/runs/<name>
plan() {
  local smoke="+experiment=smoke logger=csv"
  local bench="--device=cuda" lengths=""
  if [ -f "$wheelhouse/smollm2-135m/config.json" ]; then
    # the embedded teacher's shape and tokenizer with random weights, and its 6-layer student
    bench="$bench --teacher_shape=$wheelhouse/smollm2-135m"
  else
    # tiny's byte-level tokenizer makes the synthetic prompts long in tokens
    bench="$bench --teacher=tiny --student=tiny" lengths="--max_prompt_length=384 --max_length=512"
  fi
  printf 'imports\t120\t%s\n' "$python -c 'import hydra, omegaconf, rouge_score.rouge_scorer, deepspeed, kdlab.run'"
  for file in conf/method/*.yaml; do
    local method; method=$(basename "$file" .yaml)
    printf 'smoke-%s\t150\t%s\n' "$method" \
      "$python -m kdlab.run $smoke method=$method hardware=gpu hydra.run.dir=$work/runs/smoke-$method"
  done
  for zero in zero2 zero3; do
    printf '%s-kd\t240\t%s\n' "$zero" \
      "$python -m torch.distributed.run --standalone --nproc_per_node=1 -m kdlab.run $smoke method=kd hardware=$zero hydra.run.dir=$work/runs/$zero-kd"
  done
  printf 'bench-generation\t180\t%s\n' "$python -m benchmarks generation $bench $lengths"
  printf 'bench-kd_step\t180\t%s\n' "$python -m benchmarks kd_step $bench"
  printf 'bench-onpolicy\t180\t%s\n' "$python -m benchmarks onpolicy $bench $lengths --trl=false"
  # a served teacher: `vllm serve` the embedded GGUF and train kd from it (only where vLLM is installed)
  if "$python" -c 'import vllm' 2>/dev/null; then
    local tokenizer=""
    [ -f "$wheelhouse/smollm2-135m/tokenizer.json" ] && tokenizer="$wheelhouse/smollm2-135m"
    printf 'served-vllm\t300\t%s\n' "bash tests/gpu/served_vllm.sh $work/runs/served-vllm $tokenizer"
  fi
  # on-policy sampling under ZeRO-3 (every forward collective): last, as the costliest job
  printf 'zero3-gkd\t240\t%s\n' \
    "$python -m torch.distributed.run --standalone --nproc_per_node=1 -m kdlab.run $smoke method=gkd hardware=zero3 hydra.run.dir=$work/runs/zero3-gkd"
}

if [ "${1:-}" = "--list" ]; then
  plan
  exit 0
fi

if ! detail=$("$python" -c '
import torch
if not torch.cuda.is_available():
    raise SystemExit(f"torch {torch.__version__}: torch.cuda.is_available() is False")
' 2>&1); then
  echo "gpu-check: no CUDA device (${detail##*$'\n'}); run it on a machine with an NVIDIA GPU"
  exit 2
fi

results=${GPU_CHECK_RESULTS:-${OUT:-$root/gpu-check-results}}
mkdir -p "$results" "$work/runs"
log=$results/gpu-check.log
steps=$work/steps.tsv
: >"$log"
: >"$steps"
started=$(date +%s)

if compgen -G "$wheelhouse/*.whl" >/dev/null; then
  # --target: the image's own packages stay as they are; --no-deps: everything needed is in the folder
  if ! "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" \
       "$wheelhouse"/*.whl >>"$log" 2>&1; then
    echo "gpu-check: error: installing the wheels of $wheelhouse failed; see $log"
    exit 1
  fi
  export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "gpu-check: no wheels in $wheelhouse: using the packages installed here" | tee -a "$log"
fi
# kdlab from this checkout, not installed: an editable install would need setuptools from the network
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 WANDB_MODE=disabled
bench_lines=$(wc -l <benchmarks/results.jsonl 2>/dev/null || echo 0)

while IFS=$'\t' read -r name limit command; do
  if [ $# -gt 0 ] && [[ " $* " != *" $name "* ]]; then
    continue
  fi
  left=$((budget - ($(date +%s) - started)))
  if [ "$left" -lt 30 ]; then
    printf '%s\tskipped\t\t0\t%s\n' "$name" "$command" >>"$steps"
    echo "gpu-check: $name skipped: the ${budget} s budget is spent"
    continue
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  printf '\n===== %s (timeout %s s): %s\n' "$name" "$limit" "$command" >>"$log"
  t0=$(date +%s.%N)
  timeout --kill-after=20 "$limit" bash -c "$command" >>"$log" 2>&1 </dev/null
  rc=$?
  seconds=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  case $rc in
    0) status=pass ;;
    124 | 137) status=timeout ;;
    *) status=fail ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$seconds" "$command" >>"$steps"
  echo "gpu-check: $name $status (exit $rc, $seconds s)"
done < <(plan)

tail -n +"$((bench_lines + 1))" benchmarks/results.jsonl >"$results/benchmarks.jsonl" 2>/dev/null
"$python" "$root/tests/gpu/summary.py" "$steps" "$work/runs" "$results/summary.json"
