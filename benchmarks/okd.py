"""OKD step time against KD on the embedded models: ``python -m benchmarks okd``.

Teacher SmolLM2-135M-Instruct (GGUF, fp32), student ``smollm2-6l`` (6 of its 30 blocks), the same
batch for both: ``--batch`` sequences (4) of ``--prompt`` (96) prompt + ``--response`` (32) response
tokens, random ids, logits at response positions only. A step is what the trainer does: ``loss``,
backward, one AdamW step per parameter group. KD (``conf/method/kd.yaml``, forward KL) runs its teacher
without gradients; OKD (``conf/method/okd.yaml``) backpropagates through the frozen teacher into the
online module. Steps of the methods alternate, so a shared, busy CPU slows them alike; the ratio is the
median of the per-round ratios. Target (issue 5): OKD step <= 1.3 x KD step.

Args: ``--variants`` (``lora,lora@all``; any of lora (the default: the last quarter of the blocks),
prefix, ptuning, ``lora@all`` (every block), ``lora@K`` (the last K blocks) or ``lora@0.5`` (a fraction
of them)), ``--repeats`` (3), ``--batch``, ``--prompt``, ``--response``, ``--memory`` (true: peak tensor
bytes of one step), ``--seed`` (0).
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
from omegaconf import OmegaConf

from benchmarks.harness import as_list, peak_tensor_bytes
from kdlab.data import Encoded, collate
from kdlab.divergences import build_divergence
from kdlab.hardware import Runtime
from kdlab.methods import build_method
from kdlab.methods.base import Context
from kdlab.student import build_student
from kdlab.teacher import load_teacher
from kdlab.trainer import make_optimizer

GB = 1024**3


def make_step(method, batch):
    opts = [make_optimizer(g.params, g.lr, 0.0) for g in method.param_groups().values()]

    def step():
        method.loss(batch, 0).loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def okd_config(variant: str):
    module, _, last = variant.partition("@")
    cfg = OmegaConf.merge(OmegaConf.load("conf/method/okd.yaml"), {"online_module": module})
    if last:
        cfg.lora_layers = None if last == "all" else float(last) if "." in last else int(last)
    return cfg


def run(args: dict) -> dict:
    repeats = int(args.get("repeats", 3))
    b, p, r = int(args.get("batch", 4)), int(args.get("prompt", 96)), int(args.get("response", 32))
    torch.manual_seed(int(args.get("seed", 0)))
    t0 = time.time()
    teacher, tok = load_teacher(OmegaConf.load("conf/teacher/smollm2-135m.yaml"), torch.float32)
    student_cfg = OmegaConf.load("conf/student/smollm2-6l.yaml")
    student, _ = build_student(student_cfg, teacher, tok, "smollm2-135m", torch.float32)
    load_s = time.time() - t0
    vocab = len(tok)
    items = [Encoded(torch.randint(0, vocab, (p,)).tolist(), torch.randint(0, vocab, (r,)).tolist(), {})
             for _ in range(b)]
    batch = collate(items, tok.pad_token_id)
    runtime = Runtime(torch.device("cpu"), torch.float32)

    def method(cfg):
        ctx = Context(teacher=copy.deepcopy(teacher), student=copy.deepcopy(student), tokenizer=tok,
                      divergence=build_divergence({"name": "fkl"}), runtime=runtime, train_cfg=None,
                      vocab_size=vocab)
        return build_method(cfg, ctx)

    steps = {"kd": make_step(method(OmegaConf.load("conf/method/kd.yaml")), batch)}
    for variant in as_list(args.get("variants", "lora,lora@all")):
        steps[f"okd {variant}"] = make_step(method(okd_config(variant)), batch)
    for step in steps.values():  # warm-up (allocator growth, first-call overheads)
        step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, ts in times.items():
        ratios = [t / k for t, k in zip(ts, times["kd"])]
        row = {"method": name, "median step s": statistics.median(ts), "min step s": min(ts),
               "ratio to kd (median of rounds)": statistics.median(ratios)}
        if name != "kd":
            row["target <= 1.3 met"] = row["ratio to kd (median of rounds)"] <= 1.3
        if args.get("memory", True):
            row["peak GB"] = peak_tensor_bytes(steps[name]) / GB
        rows.append(row)
    return {"rows": rows, "notes": [(
        f"batch {b} x ({p} prompt + {r} response) tokens, {r * b} response rows, vocab {vocab}; teacher+student "
        f"load {load_s:.0f} s; {repeats} alternating rounds after one warm-up step each; torch threads "
        f"{torch.get_num_threads()}. 'peak GB': tensor bytes allocated during one step (torch.profiler).")]}

