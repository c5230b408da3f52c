"""RESULTS.md "Pruned students": the training-step time of each student shape of scripts/prune-dolly.sh, measured
alone on an idle machine. Step time depends on the shape only (not on which blocks, heads or neurons were
kept), so each distinct shape of ``results/prune-dolly.jsonl`` is built as a randomly initialised Llama of that
shape (SmolLM2-135M's vocabulary and tied embeddings) and timed on one full-length batch: forward, backward and
an AdamW step on 8 sequences of 192 tokens (dolly-cpu's batch and length limit; real batches are padded to their
longest row, so this is the upper bound), plus the teacher's forward alone, which a KD step adds. The median of
``--steps`` steps after one warm-up step, at torch's default thread count.
    python scripts/shape-step-times.py results/prune-dolly.jsonl > results/shape-step-times.md
"""
import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

BATCH, LENGTH, VOCAB = 8, 192, 49152


def build(shape: dict) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"], head_dim=shape["head_dim"], tie_word_embeddings=True))


def median_time(step, steps: int) -> float:
    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step_time(model, tokens, steps: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
    return median_time(step, steps)


def forward_time(model, tokens, steps: int) -> float:
    def step():
        with torch.no_grad():
            model(input_ids=tokens)
    return median_time(step, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rows", help="results/prune-dolly.jsonl (scripts/prune-dolly.sh)")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    tokens = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    shapes: dict[tuple, list[str]] = {}
    teacher = None
    for line in open(args.rows):
        row = json.loads(line)
        shape = row["shape"]
        key = tuple(shape[k] for k in ("num_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                                       "num_key_value_heads", "head_dim"))
        shapes.setdefault(key, []).append(row["student"])
        teacher = row["teacher_shape"]
    print(f"Step times: batch {BATCH} x {LENGTH} tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps after one warm-up.\n")
    print("| blocks | hidden | MLP neurons | heads (KV) | rows of prune-dolly.jsonl | SFT step (s) |")
    print("|---:|---:|---:|---|---|---:|")
    for key, names in shapes.items():
        shape = dict(zip(("num_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                          "num_key_value_heads", "head_dim"), key))
        seconds = train_step_time(build(shape).train(), tokens, args.steps)
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} ({key[4]}) | {', '.join(names)} | {seconds:.2f} |",
              flush=True)
    seconds = forward_time(build(teacher).eval(), tokens, args.steps)
    print(f"\nThe teacher's forward alone ({teacher['num_layers']} blocks), which a KD step adds: {seconds:.2f} s.")


if __name__ == "__main__":
    main()
