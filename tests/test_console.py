"""What the user sees (issue 23, item 8): plain progress lines in a log that is not a terminal, kdlab's own
lines on lines of their own, a local sweep that runs every job and says which failed, and a strict-JSON
``metrics.jsonl``. Real processes (stderr is a pipe, as under SLURM)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

from conftest import ROOT, kdlab_env
from kdlab.loggers import JsonlSink, PlainProgress


def test_a_log_that_is_not_a_terminal_gets_whole_lines(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kdlab.run", "+experiment=smoke", f"hydra.run.dir={tmp_path}"],
                          cwd=ROOT, env=kdlab_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "\r" not in output and "\x1b[" not in output, [line for line in output.split("\n") if "\r" in line][:3]
    lines = proc.stderr.splitlines()
    assert "kd: 1/6 (17%) steps [0 s]" in [line.replace("[1 s]", "[0 s]") for line in lines]
    assert any(line.startswith("kd: 6/6 (100%) steps loss=") for line in lines), lines
    assert "kdlab: results in" in proc.stdout


def test_plain_progress_says_the_first_step_then_at_most_one_line_per_interval(capsys, monkeypatch):
    clock = iter(range(0, 1000, 7))   # 7 s per step
    monkeypatch.setattr("kdlab.loggers.time.time", lambda: float(next(clock)))
    for _ in PlainProgress(range(10), desc="train"):
        pass
    for _ in PlainProgress(range(10), desc="eval", leave=False):
        pass
    said = capsys.readouterr().err.splitlines()
    train, evaluation = [s for s in said if s.startswith("train")], [s for s in said if s.startswith("eval")]
    assert train[0].startswith("train: 1/10 (10%) it") and train[-1].startswith("train: 10/10 (100%)")
    assert len(train) == 3   # 7 s, then 35 s (>= 30 s later), then the end
    assert evaluation and evaluation[0].startswith("eval: 5/10")   # not its first step: only once 30 s have passed


def test_one_failing_job_of_a_local_sweep_does_not_stop_the_others(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "kdlab.run", "-m", "+experiment=smoke", "train.max_steps=2",
                           "eval.models=[student]", "train.batch_size=4,100,2", f"hydra.sweep.dir={sweep}"],
                          cwd=ROOT, env=kdlab_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    finished = sorted(p.parent.name for p in sweep.rglob("results.json"))
    assert finished == [f"eval.models=[student],train.batch_size={size},train.max_steps=2" for size in (2, 4)], finished
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdlab: error:")]
    assert errors[0].startswith("kdlab: error: train.batch_size=100 is larger than the training set")
    assert errors[-1].startswith("kdlab: error: 1 job(s) of the sweep failed") and "#1 (" in errors[-1]
    assert "train.batch_size=100" in errors[-1]


def test_metrics_jsonl_holds_no_bare_nan(tmp_path):
    sink = JsonlSink(tmp_path)
    sink.log({"train/loss": math.nan, "train/grad_norm": math.inf, "lr": -math.inf, "ok": 1.5}, step=3)
    sink.finish()

    def refuse(constant):
        raise ValueError(f"bare {constant} in metrics.jsonl")

    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line, parse_constant=refuse) == {"step": 3, "train/loss": "nan", "train/grad_norm": "inf",
                                                       "lr": "-inf", "ok": 1.5}
