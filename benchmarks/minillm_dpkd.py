"""Step time of the on-policy methods ``minillm`` and ``dpkd`` on the embedded models.

Teacher SmolLM2-135M-Instruct (GGUF, fp32), student ``smollm2-6l`` (6 of its blocks), synthetic
prompts in the chat template. One step = ``method.loss`` (with its sampling) + backward + AdamW step.
MiniLLM's time is the mean over whole buffer cycles (a refill every ``rollouts * ppo_epochs / batch``
steps), so the rollout cost is amortised as in training; DPKD's sequence level is timed with a cold
teacher cache (first epoch: the teacher generates every step) and warm (later epochs).

Args: ``--batch`` (4), ``--new_tokens`` (32), ``--steps`` (4), ``--rollouts`` (8), ``--ppo_epochs`` (2).
"""
from __future__ import annotations

import time

import torch
from omegaconf import OmegaConf

from kdlab.config import load_option
from kdlab.data import batches, encode, load_splits
from kdlab.methods import build_method
from kdlab.methods.base import Context
from kdlab.student import build_student
from kdlab.teacher import load_teacher
from kdlab.optim import make_optimizer


def timed_steps(method, data, steps: int) -> float:
    opt = make_optimizer(method.param_groups()["student"].params, 1e-6, 0.0)
    t0 = time.perf_counter()
    for step in range(steps):
        method.loss(next(data)[2], step).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps


def run(args: dict) -> dict:
    batch, new_tokens, steps = int(args.get("batch", 4)), int(args.get("new_tokens", 32)), int(args.get("steps", 4))
    rollouts, ppo_epochs = int(args.get("rollouts", 8)), int(args.get("ppo_epochs", 2))
    torch.manual_seed(0)
    teacher_cfg = load_option("teacher", "smollm2-135m")
    teacher, tok = load_teacher(teacher_cfg, torch.float32)
    student, tok = build_student(load_option("student", "smollm2-6l"), teacher, tok, teacher_cfg.name,
                                 torch.float32)
    data_cfg = OmegaConf.load("conf/dataset/synthetic.yaml")
    data_cfg.sizes = {"train": 64, "valid": 8, "test": 8}
    items = encode(load_splits(data_cfg, 1)["train"], tok, "chat", 256, 512)
    ctx = Context(teacher, student, tok, None, None, None)

    def method(name, **overrides):
        cfg = OmegaConf.load(f"conf/method/{name}.yaml")
        cfg.merge_with({"max_new_tokens": new_tokens, **overrides})
        return build_method(cfg, ctx)

    cycle = max(1, rollouts * ppo_epochs // batch)
    rows = []
    cases = [("minillm", {"sft_steps": 0, "rollouts": rollouts, "ppo_epochs": ppo_epochs}, cycle * max(1, steps // cycle)),
             ("dpkd sequence (teacher cache cold)", {"level": "sequence"}, steps),
             ("dpkd token", {"level": "token"}, steps)]
    for label, overrides, n in cases:
        m = method(label.split()[0], **overrides)
        data = batches(items, batch, tok.pad_token_id, seed=0)
        rows.append({"method": label, "batch": batch, "new tokens": new_tokens, "steps": n,
                     "s/step": timed_steps(m, data, n)})
        if label.startswith("dpkd sequence"):
            warm = batches(items, batch, tok.pad_token_id, seed=0)  # the same prompts again: cached
            rows.append({"method": "dpkd sequence (teacher cache warm)", "batch": batch, "new tokens": new_tokens,
                         "steps": n, "s/step": timed_steps(m, warm, n)})
    note = (f"minillm: rollouts={rollouts}, ppo_epochs={ppo_epochs}, one PPO minibatch of {batch} per step, mean "
            f"over {rows[0]['steps']} steps (whole buffer cycles, refills included); responses capped at "
            f"{new_tokens} tokens.")
    return {"rows": rows, "notes": [note]}
