"""Evaluation throughput: generated tokens/s of batched vs one-prompt-at-a-time greedy generation.

The model is the embedded student ``smollm2-6l`` (6 of SmolLM2-135M-Instruct's 30 blocks, built from
the teacher as in training), generating for the first ``--prompts`` Dolly test prompts (MiniLLM's
test split, ``/work/shared/data/dolly/test.jsonl``) with the teacher's chat template, batch by batch
as :func:`kdlab.metrics.evaluate.generate_texts` does (collate, :func:`kdlab.generation.generate`, decode).
Generated tokens are those of the responses up to and including EOS, counted the same way in both
modes; one prompt at a time stops at its own EOS, a batch runs until its last row stops. Target (issue):
batched >= 4x the tokens/s of one prompt at a time.

Args: ``--prompts`` (32), ``--max_new_tokens`` (64), ``--batch_size`` (32), ``--threads`` (torch
threads; default: torch's), ``--data`` (the Dolly test file).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from kdlab.config import load_option
from kdlab.data import collate, encode
from kdlab.generation import generate
from kdlab.student import build_student
from kdlab.teacher import load_teacher

ROOT = Path(__file__).resolve().parents[1]
DOLLY = ROOT.parent / "shared" / "data" / "dolly"


def generate_all(model, tokenizer, items, batch_size: int, max_new_tokens: int) -> int:
    """Greedy responses for ``items``, ``batch_size`` prompts at a time; returns the generated tokens."""
    tokens = 0
    for i in range(0, len(items), batch_size):
        batch = collate(items[i:i + batch_size], tokenizer.pad_token_id)
        out = generate(model, tokenizer, batch.prompt_ids, batch.prompt_mask, max_new_tokens=max_new_tokens)
        out.texts(tokenizer)
        tokens += int(out.response_mask.sum())
    return tokens


def run(args: dict) -> dict:
    if args.get("threads"):
        torch.set_num_threads(int(args["threads"]))
    n, max_new = int(args.get("prompts", 32)), int(args.get("max_new_tokens", 64))
    batch_size = int(args.get("batch_size", 32))
    teacher_cfg = load_option("teacher", "smollm2-135m")
    teacher, tokenizer = load_teacher(teacher_cfg, torch.float32)
    student, tokenizer = build_student(load_option("student", "smollm2-6l"), teacher,
                                       tokenizer, teacher_cfg.name, torch.float32)
    del teacher
    student.eval()
    data = Path(args.get("data", DOLLY / "test.jsonl"))
    examples = [json.loads(line) for line in data.read_text().splitlines()[:n]]
    items = encode(examples, tokenizer, teacher_cfg.template, 256, 512)

    rows = []
    for mode, size in (("one at a time", 1), (f"batched ({batch_size})", batch_size)):
        generate_all(student, tokenizer, items[:size], size, 4)  # warm-up
        start = time.perf_counter()
        tokens = generate_all(student, tokenizer, items, size, max_new)
        seconds = time.perf_counter() - start
        rows.append({"mode": mode, "prompts": len(items), "generated tokens": tokens, "seconds": seconds,
                     "tokens/s": tokens / seconds})
    speedup = rows[1]["tokens/s"] / rows[0]["tokens/s"]
    rows[1]["speed-up"] = speedup
    return {"rows": rows, "notes": [
        f"smollm2-6l student, fp32 on CPU ({torch.get_num_threads()} torch threads), greedy, max_new_tokens="
        f"{max_new}, first {len(items)} Dolly test prompts (chat template); one timed pass per mode after a "
        f"warm-up. Target: batched >= 4x one-at-a-time tokens/s: {'met' if speedup >= 4 else 'NOT met'} "
        f"({speedup:.1f}x)."]}
