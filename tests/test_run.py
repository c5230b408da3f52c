"""End to end: `python -m kdlab.run` on tiny models (smoke) — outputs, multirun, resume after a kill."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, kdlab_env, run_kdlab

METHODS = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.parametrize("method", METHODS)
def test_smoke_experiment_runs_every_method(method, tmp_path):
    run_dir = tmp_path / method
    run_kdlab("+experiment=smoke", f"method={method}", f"hydra.run.dir={run_dir}", f"output_dir={tmp_path}")
    res = results(run_dir)
    assert res["run"]["status"] == "completed" and res["run"]["method"] == method
    assert set(res["eval"]) == {"teacher", "student_init", "student"}
    for model in res["eval"].values():
        assert 0 <= model["synthetic"]["rougeL"] <= 100 and model["synthetic"]["loss"] > 0
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in l for l in lines) and any("valid/rougeL" in l for l in lines)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    tok = AutoTokenizer.from_pretrained(run_dir / "student")
    assert model(torch.tensor([tok.encode("hi")])).logits.shape[-1] >= len(tok)
    assert (run_dir / "config.yaml").exists() and (run_dir / ".hydra" / "config.yaml").exists()


def test_training_lowers_the_loss_on_held_out_data(tmp_path):
    run_dir = tmp_path / "sft"
    proc = run_kdlab("+experiment=smoke", "method=sft", "train.max_steps=40", "method.lr=3e-3",
                     "train.eval_every=40", f"hydra.run.dir={run_dir}")
    res = results(run_dir)["eval"]
    assert res["student"]["synthetic"]["loss"] < res["student_init"]["synthetic"]["loss"] - 0.5, proc.stdout[-2000:]
    # what kdlab.report tells configurations apart by (seed, method, experiment... are excluded)
    assert results(run_dir)["run"]["overrides"] == "method.lr=3e-3,train.eval_every=40,train.max_steps=40"
    # what the numbers measured: the decoding (the smoke experiment's eval: greedy) and the test rows scored
    decoding, counts = results(run_dir)["run"]["decoding"], results(run_dir)["data"]["test"]["synthetic"]
    assert decoding.startswith("greedy, at most ") and counts["dropped"] == counts["truncated"] == 0
    assert (run_dir / "results.md").read_text().splitlines()[-1] == (
        f"Measured: generations {decoding}; test rows scored: synthetic {counts['kept']} of {counts['rows']}.")


def test_multirun_seeds_go_to_separate_folders(tmp_path):
    # -m in the middle, as users type it: `python -m kdlab.run method=okd student=gpt2-base -m seed=1,2,3,4,5`
    run_kdlab("method=kd", "+experiment=smoke", "-m", "seed=1,2", f"hydra.sweep.dir={tmp_path}")
    found = sorted(tmp_path.rglob("results.json"))
    assert len(found) == 2
    seeds = sorted(json.loads(p.read_text())["run"]["seed"] for p in found)
    assert seeds == [1, 2]


def test_killed_job_resumes_to_the_same_final_metrics(tmp_path):
    args = ["+experiment=smoke", "method=kd", "train.max_steps=40", "train.save_every=4", "train.eval_every=10"]
    reference = tmp_path / "uninterrupted"
    run_kdlab(*args, f"hydra.run.dir={reference}")

    resumed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "kdlab.run", *args, f"hydra.run.dir={resumed}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=kdlab_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = resumed / "checkpoints" / "LAST"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if pointer.exists() and int(pointer.read_text().split("-")[1]) >= 12:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    assert not (resumed / "results.json").exists()

    run_kdlab(*args, f"hydra.run.dir={resumed}")
    a, b = results(reference), results(resumed)
    assert a["eval"] == b["eval"]
    steps = [json.loads(l)["step"] for l in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "resumed job logged some steps twice"
    ref_steps = [json.loads(l)["step"] for l in (reference / "metrics.jsonl").read_text().splitlines()]
    assert steps == ref_steps


def test_rerunning_a_finished_job_does_not_train_again(tmp_path):
    run_kdlab("+experiment=smoke", f"hydra.run.dir={tmp_path}")
    before = (tmp_path / "results.json").stat().st_mtime_ns
    proc = run_kdlab("+experiment=smoke", f"hydra.run.dir={tmp_path}")
    assert "already complete" in proc.stdout
    assert (tmp_path / "results.json").stat().st_mtime_ns == before
    changed = run_kdlab("+experiment=smoke", "method.alpha=0.9", f"hydra.run.dir={tmp_path}", check=False)
    assert changed.returncode == 2 and "different config" in changed.stderr


def test_machine_text_names_the_cpu_model_cores_and_threads(monkeypatch):
    """results.json's run.machine: the CPU model (/proc/cpuinfo's first "model name" where Linux has one), the
    cores and torch's thread count, so that times from different machines are told apart."""
    from kdlab.hardware import machine_text

    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    text = machine_text()
    assert text.endswith(f", {os.cpu_count()} CPUs, 1 torch thread"), text
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "model name" in cpuinfo.read_text():
        model = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("model name"))
        assert text.startswith(model.split(":", 1)[1].strip() + ", ")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H100 80GB HBM3")
    assert machine_text().endswith(" CPUs, 3 torch threads, 2 x NVIDIA H100 80GB HBM3")
