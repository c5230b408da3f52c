"""Whole-run wall time per method through ``python -m kdlab.run``: ``python -m benchmarks epoch_time``.

The OKD paper's speed claim (Rao et al. Sec. I and V-C: about 1/4 of the training time of the
on-policy methods) on the same models (the embedded SmolLM2-135M teacher, the ``smollm2-6l`` student)
and data: ``--train`` synthetic examples, batch ``--batch``, every example used once. Each job is a
real ``kdlab.run`` with evaluation and checkpoints off; the time is its ``results.json``
``train_time_s`` (training loop only, model loading excluded). Methods at their defaults:

- ``kd``, ``okd`` (LoRA in every block, the paper's), ``okd-last-quarter`` (``method.lora_layers=0.25``),
  ``okd-nodrop`` (``method.dropout=0``): one pass over the examples.
- ``gkd``: fully on-policy (lambda = 1, the setting the issue compares), sampling at temperature 1
  (GKD's paper), up to ``--new_tokens`` new tokens.
- ``minillm``: phase 2 at its paper defaults per example: one rollout per prompt from the
  teacher-mixed sampler and ``ppo_epochs`` (4) PPO passes over it, so ``4 x train / batch`` minibatch
  updates. The rollout buffer holds one batch (``method.rollouts=<batch>``): rollouts are sampled in
  minibatch-sized chunks whatever the buffer size, so this changes no per-example cost, only the
  whitening pool. No phase 1 (``sft_steps=0``): the SFT'd student is an input, as for the other methods.
  Rollouts up to ``--new_tokens`` tokens.

Methods run round by round (``--repeats`` rounds, every method once per round) so that load from other
processes hits them alike; the table gives medians. Target (issue 13): OKD <= 0.3 x GKD and <= 0.3 x MiniLLM.

Args: ``--methods`` (kd,okd,gkd,minillm; also okd-last-quarter, okd-nodrop, imitkd), ``--train`` (64),
``--batch`` (8), ``--new_tokens`` (128), ``--repeats`` (3), ``--threads`` (torch threads per job,
``hardware.num_threads``; null: torch's default. 1 avoids thread thrashing on a shared, oversubscribed CPU).
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import as_list

ROOT = Path(__file__).resolve().parents[1]
PPO_EPOCHS = 4  # conf/method/minillm.yaml's ppo_epochs (MiniLLM App. B: 4 inner epochs)
METHOD_ARGS = {
    "kd": {"method": "kd"},
    "okd": {"method": "okd"},
    "okd-last-quarter": {"method": "okd", "method.lora_layers": "0.25"},
    "okd-nodrop": {"method": "okd", "method.dropout": "0.0"},
    "gkd": {"method": "gkd", "method.lmbda": "1.0", "method.temperature": "1.0", "method.max_new_tokens": "{new_tokens}"},
    "imitkd": {"method": "imitkd", "method.max_new_tokens": "{new_tokens}"},
    "minillm": {"method": "minillm", "method.sft_steps": "0", "method.rollouts": "{batch}",
                "method.max_new_tokens": "{new_tokens}", "train.max_steps": "{ppo_steps}"},
}


def run(args: dict) -> dict:
    train, batch = int(args.get("train", 64)), int(args.get("batch", 8))
    new_tokens, repeats = int(args.get("new_tokens", 128)), int(args.get("repeats", 3))
    threads = args.get("threads")
    names = as_list(args.get("methods", ["kd", "okd", "gkd", "minillm"]))
    fields = {"batch": batch, "new_tokens": new_tokens, "ppo_steps": PPO_EPOCHS * train // batch}
    times = {name: [] for name in names}
    steps = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(repeats):
            for name in names:
                run_dir = Path(tmp) / f"{name}-{round_}"
                overrides = {"dataset.sizes": f"{{train:{train},valid:8,test:8}}", "train.max_steps": "null",
                             "train.epochs": "1", "train.batch_size": str(batch), "train.eval_every": "null",
                             "train.save_every": "null", "eval.models": "[]", "logger": "none",
                             "hardware.num_threads": "null" if threads is None else str(threads),
                             "hydra.run.dir": str(run_dir)}
                overrides.update({k: v.format(**fields) for k, v in METHOD_ARGS[name].items()})
                cmd = [sys.executable, "-m", "kdlab.run", *(f"{k}={v}" for k, v in overrides.items())]
                subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
                result = json.loads((run_dir / "results.json").read_text())
                times[name].append(result["run"]["train_time_s"])
                steps[name] = int(overrides["train.max_steps"]) if overrides["train.max_steps"] != "null" else train // batch
    by = {name: statistics.median(ts) for name, ts in times.items()}
    rows = [{"method": name, "steps": steps[name], "median run s": by[name], "runs s": ", ".join(f"{t:.1f}" for t in ts),
             "x kd": by[name] / by["kd"] if "kd" in by else None} for name, ts in times.items()]
    notes = []
    for okd in ("okd", "okd-last-quarter", "okd-nodrop"):
        for other in ("gkd", "minillm"):
            if okd in by and other in by:
                ratio = by[okd] / by[other]
                per_round = statistics.median(a / b for a, b in zip(times[okd], times[other]))
                notes.append(f"{okd} / {other}: {ratio:.2f} (median of per-round ratios {per_round:.2f}; "
                             f"target <= 0.3: {'met' if ratio <= 0.3 else 'not met'})")
    return {"rows": rows, "notes": notes}
