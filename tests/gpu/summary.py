"""summary.json of a GPU check (tests/gpu/run_gpu_check.sh): ``python summary.py STEPS_TSV RUNS_DIR OUT``.

STEPS_TSV holds one line per step: name, status (pass, fail, timeout, skipped), exit code, seconds,
command. A job step (one with a run folder RUNS_DIR/<name>) passes only if its process exited 0 *and*
the run folder holds a completed ``results.json``, ran on CUDA, and logged only finite training losses;
its summary carries the run block of ``results.json``, the hardware it ran on, its first and last
training loss and steps/s, and each evaluated model's test loss and ROUGE-L. Prints one line per step
and the totals; exits 1 when any step did not pass.
"""
from __future__ import annotations

import json
import math
import platform
import sys
from pathlib import Path


def job_summary(run_dir: Path) -> tuple[dict, str | None]:
    """What a job's run folder shows, and why it fails the check (None: it passes)."""
    results_file = run_dir / "results.json"
    if not results_file.exists():
        return {}, f"no {results_file}"
    results = json.loads(results_file.read_text())
    info: dict = {"run": results.get("run", {})}
    config = run_dir / "config.yaml"
    if config.exists():
        import yaml

        hardware = yaml.safe_load(config.read_text()).get("hardware", {})
        info["hardware"] = {k: hardware.get(k) for k in ("name", "device", "dtype", "strategy")}
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (run_dir / "metrics.jsonl").exists() else []
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    times = [m["train/step_time_s"] for m in metrics if "train/step_time_s" in m]
    if losses:
        info["train_loss_first_last"] = [losses[0], losses[-1]]
    if times:
        info["train_steps_per_s"] = len(times) / sum(times)
    info["eval"] = {model: {ds: {k: v.get(k) for k in ("loss", "rougeL", "num_examples")} for ds, v in sets.items()}
                    for model, sets in results.get("eval", {}).items()}
    if info["run"].get("status") != "completed":
        return info, f"results.json status is {info['run'].get('status')!r}, not 'completed'"
    if info.get("hardware", {}).get("device") != "cuda":
        return info, f"ran on {info.get('hardware', {}).get('device')!r}, not cuda"
    if not losses or not all(math.isfinite(x) for x in losses):
        return info, f"training losses {losses} are not all finite"
    return info, None


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
    return info


def main(steps_tsv: str, runs_dir: str, out: str) -> int:
    steps = []
    for line in Path(steps_tsv).read_text().splitlines():
        name, status, rc, seconds, command = line.split("\t", 4)
        step = {"name": name, "status": status, "exit_code": int(rc) if rc else None, "seconds": float(seconds),
                "command": command}
        run_dir = Path(runs_dir) / name
        if run_dir.is_dir():
            step["job"], problem = job_summary(run_dir)
            if problem and status == "pass":
                step["status"], step["problem"] = "fail", problem
        steps.append(step)
    counts = {s: sum(step["status"] == s for step in steps) for s in ("pass", "fail", "timeout", "skipped")}
    summary = {"machine": machine(), "counts": counts, "seconds": round(sum(s["seconds"] for s in steps), 1),
               "steps": steps}
    Path(out).write_text(json.dumps(summary, indent=2) + "\n")
    for step in steps:
        print(f"{step['status']:8} {step['seconds']:7.1f} s  {step['name']}" + (f"  ({step['problem']})"
                                                                            if "problem" in step else ""))
    others = "".join(f", {n} {s}" for s, n in counts.items() if s != "pass" and n)
    print(f"gpu-check: {counts['pass']}/{len(steps)} steps passed{others}; summary: {out}")
    return 0 if counts["pass"] == len(steps) else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
