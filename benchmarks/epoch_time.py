"""Wall time of one training epoch per method through ``python -m kdlab.run``: ``python -m benchmarks epoch_time``.

Issue 5's comparison: OKD against GKD (lambda = 1, fully on-policy) and MiniLLM on the same models
(the embedded SmolLM2-135M teacher, the ``smollm2-6l`` student) and data (``--train`` synthetic
examples, batch ``--batch``, so ``train/batch`` optimizer steps make the epoch). Each job is a real
``kdlab.run`` with evaluation and checkpoints switched off; the time is its ``results.json``
``train_time_s`` (training loop only, model loading excluded). On-policy methods generate up to
``--new_tokens`` tokens. MiniLLM is timed in its cheapest per-epoch form: no SFT phase
(``sft_steps=0``, a student already fine-tuned), one PPO pass (``ppo_epochs=1``) over a rollout buffer of
one batch, so every prompt is sampled once and used for one update, as in the other methods' epoch.
Target: OKD <= 0.35 x GKD and <= 0.35 x MiniLLM.

Args: ``--methods`` (kd,okd,gkd,minillm; also okd-all-blocks, imitkd), ``--train`` (64), ``--batch`` (8), ``--new_tokens`` (64).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import as_list

ROOT = Path(__file__).resolve().parents[1]
METHOD_ARGS = {
    "kd": ["method=kd"],
    "okd": ["method=okd"],
    "okd-all-blocks": ["method=okd", "method.lora_layers=null"],   # LoRA in every block (see benchmarks/okd.py)
    "gkd": ["method=gkd", "method.lmbda=1.0", "method.max_new_tokens={new_tokens}"],
    "imitkd": ["method=imitkd", "method.max_new_tokens={new_tokens}"],
    "minillm": ["method=minillm", "method.sft_steps=0", "method.ppo_epochs=1", "method.rollouts={batch}",
                "method.max_new_tokens={new_tokens}"],
}


def run(args: dict) -> dict:
    train, batch, new_tokens = args.get("train", 64), args.get("batch", 8), args.get("new_tokens", 64)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in as_list(args.get("methods", ["kd", "okd", "gkd", "minillm"])):
            extra = [a.format(batch=batch, new_tokens=new_tokens) for a in METHOD_ARGS[name]]
            run_dir = Path(tmp) / name
            cmd = [sys.executable, "-m", "kdlab.run", *extra, f"dataset.sizes={{train:{train},valid:8,test:8}}",
                   "train.max_steps=null", "train.epochs=1", f"train.batch_size={batch}", "train.eval_every=null",
                   "train.save_every=null", "eval.models=[]", "logger=none", f"hydra.run.dir={run_dir}"]
            subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
            result = json.loads((run_dir / "results.json").read_text())
            rows.append({"method": name, "steps": train // batch, "epoch_s": result["run"]["train_time_s"]})
    by = {r["method"]: r["epoch_s"] for r in rows}
    notes = []
    for okd in ("okd", "okd-all-blocks"):
        for other in ("gkd", "minillm"):
            if okd in by and other in by:
                ratio = by[okd] / by[other]
                notes.append(f"{okd} / {other}: {ratio:.2f} (target <= 0.35: {'met' if ratio <= 0.35 else 'not met'})")
    for r in rows:
        r["x_kd"] = r["epoch_s"] / by["kd"] if "kd" in by else None
    return {"rows": rows, "notes": notes}
