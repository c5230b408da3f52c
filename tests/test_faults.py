"""Faults: two jobs in one run folder, kill -9, SIGTERM, Ctrl-C, a damaged checkpoint, a full disk, the
umask. The end-to-end tests run real `python -m kdlab.run` processes on smoke jobs and real signals."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, kdlab_env, run_kdlab
from kdlab import checkpoint, runlock
from kdlab.checkpoint import atomic_write_json, load_checkpoint, save_checkpoint


def start(run_dir: Path, *args: str, log: Path) -> subprocess.Popen:
    """A job in the background; its output goes to ``log`` (a pipe nobody reads would fill and block it). Its
    SIGINT is the default whatever pytest inherited: a shell without job control starts background commands
    (``make test &``) with SIGINT ignored, and an ignored SIGINT stays ignored in the job, so Ctrl-C tests hang."""
    cmd = [sys.executable, "-m", "kdlab.run", "+experiment=smoke", "method=kd", *args, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=kdlab_env(), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def wait_until(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the job ended (status {proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def student_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "student" / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = student_weights(a), student_weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{b} ended with other student weights than {a}"


# -- two jobs, kill -9, leftovers, Ctrl-C ------------------------------------------------------------------

def test_second_job_is_refused_a_killed_one_does_not_block_and_its_leftovers_go(tmp_path):
    run_dir = tmp_path / "run"
    args = ["train.max_steps=100000", "train.save_every=null", "train.eval_every=null", "train.log_every=1"]
    first = start(run_dir, *args, log=tmp_path / "first.log")
    try:
        wait_until(lambda: logged_steps(run_dir), first, "the first job trained a step")
        second = run_kdlab("+experiment=smoke", "method=kd", *args, f"hydra.run.dir={run_dir}", check=False,
                           timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        errors = [line for line in second.stderr.splitlines() if line.startswith("kdlab: error:")]
        assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
        assert f"pid {first.pid}" in errors[0] and socket.gethostname() in errors[0] and "since" in errors[0]
        assert first.poll() is None, "the refused job stopped the one holding the folder"
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        first.kill()
    killed_at = logged_steps(run_dir)
    assert killed_at, "the first job logged nothing"
    # what writes cut short by a kill leave behind
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    leftovers = [run_dir / "checkpoints" / ".step-0000001.abc123.tmp", run_dir / ".student_best.x1y2.tmp",
                 run_dir / "eval" / ".teacher.json.q9.tmp", run_dir / ".metrics.jsonl.r7.tmp"]
    for path in leftovers[:2]:
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"\0" * 1024)
    for path in leftovers[2:]:
        path.write_text("{")

    inode = (run_dir / "metrics.jsonl").stat().st_ino
    rerun = start(run_dir, *args, log=tmp_path / "rerun.log")
    try:
        # no checkpoint to resume from: it starts again at step 1 and must first drop the killed job's lines
        # (a rewrite is a new file); without that, its lines come after them
        def trained_two_steps() -> bool:
            rewritten = (run_dir / "metrics.jsonl").stat().st_ino != inode
            return len(logged_steps(run_dir)) >= (2 if rewritten else len(killed_at) + 2)

        wait_until(trained_two_steps, rerun, "the rerun trained two steps")
        assert [p for p in leftovers if p.exists()] == []
        rerun.send_signal(signal.SIGINT)
        rerun.wait(timeout=120)
    finally:
        rerun.kill()
    steps = logged_steps(run_dir)
    assert steps == list(range(1, len(steps) + 1)), f"steps logged twice after a restart: {steps}"
    out = (tmp_path / "rerun.log").read_text()
    assert rerun.returncode == 130 and "Traceback" not in out, out[-3000:]
    assert out.count("kdlab: interrupted") == 1


# -- SIGTERM, a damaged checkpoint, the umask ------------------------------------------------------------

ARGS = ["train.max_steps=8", "train.save_every=6"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted job (umask 022; checkpoints at steps 6 and 8)."""
    run_dir = tmp_path_factory.mktemp("faults") / "reference"
    before = os.umask(0o022)
    try:
        run_kdlab("+experiment=smoke", "method=kd", *ARGS, f"hydra.run.dir={run_dir}")
    finally:
        os.umask(before)
    return run_dir


def test_files_and_folders_honour_the_umask(reference):
    modes = {p.relative_to(reference): stat.S_IMODE(p.stat().st_mode) for p in [reference, *reference.rglob("*")]}
    wrong = {str(p): oct(m) for p, m in modes.items() if m != (0o755 if (reference / p).is_dir() else 0o644)}
    assert not wrong, f"not what umask 022 gives (0644 files, 0755 folders): {wrong}"
    assert {Path("results.json"), Path("config.yaml"), Path("eval/teacher.json"), Path("checkpoints/LAST"),
            Path("student/model.safetensors"), Path("checkpoints/step-0000008/params.safetensors")} <= set(modes)


def test_sigterm_checkpoints_the_step_and_the_rerun_matches(reference, tmp_path):
    run_dir = tmp_path / "preempted"
    job = start(run_dir, *ARGS, log=tmp_path / "job.log")
    try:
        wait_until(lambda: logged_steps(run_dir), job, "the first step was logged")
        job.send_signal(signal.SIGTERM)
        job.wait(timeout=120)
    finally:
        job.kill()
    out = (tmp_path / "job.log").read_text()
    assert job.returncode == 128 + signal.SIGTERM and "Traceback" not in out, out[-3000:]
    last = (run_dir / "checkpoints" / "LAST").read_text().strip()
    step = int(last.split("-")[1])
    assert 2 <= step < 6, f"the checkpoint at the signal's step is {last}"   # before the first regular one
    assert f"stopped by SIGTERM after step {step}" in out
    assert not (run_dir / "results.json").exists()

    run_kdlab("+experiment=smoke", "method=kd", *ARGS, f"hydra.run.dir={run_dir}")
    assert_same_weights(reference, run_dir)
    assert logged_steps(run_dir) == logged_steps(reference)


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path):
    run_dir = tmp_path / "damaged"
    shutil.copytree(reference, run_dir)
    # a job killed after its step-8 checkpoint, before the final student and evaluation, whose last
    # checkpoint write was then cut short
    for path in ("results.json", "results.md", "eval/student.json"):
        (run_dir / path).unlink()
    shutil.rmtree(run_dir / "student")
    params = run_dir / "checkpoints" / "step-0000008" / "params.safetensors"
    params.write_bytes(params.read_bytes()[:100])

    proc = run_kdlab("+experiment=smoke", "method=kd", *ARGS, f"hydra.run.dir={run_dir}")
    said = [line for line in proc.stderr.splitlines() if "does not load" in line]
    assert len(said) == 1 and "step-0000008" in said[0] and said[0].endswith("step-0000006"), proc.stderr[-3000:]
    assert_same_weights(reference, run_dir)
    assert logged_steps(run_dir) == logged_steps(reference)


# -- in-process ------------------------------------------------------------------------------------------

def checkpoints(root: Path, steps=(3, 6)) -> None:
    for step in steps:
        save_checkpoint(root, step, {"student": [torch.full((4,), float(step))]}, {"step": step})


@pytest.mark.parametrize("damage", ["truncated state", "truncated params", "missing params", "LAST garbage",
                                    "LAST names a missing folder", "LAST missing"])
def test_load_checkpoint_falls_back_with_one_line(tmp_path, damage):
    checkpoints(tmp_path)
    latest = tmp_path / "step-0000006"
    if damage == "truncated state":
        (latest / "state.pt").write_bytes((latest / "state.pt").read_bytes()[:50])
    elif damage == "truncated params":
        (latest / "params.safetensors").write_bytes((latest / "params.safetensors").read_bytes()[:-3])
    elif damage == "missing params":
        (latest / "params.safetensors").unlink()
    elif damage == "LAST garbage":
        (tmp_path / "LAST").write_bytes(b"\xff\xfe\0garbage")
    elif damage == "LAST names a missing folder":
        shutil.rmtree(latest)
    else:
        (tmp_path / "LAST").unlink()
    said = []
    flat, state = load_checkpoint(tmp_path, say=said.append)
    expected = 6 if damage in ("LAST garbage", "LAST missing") else 3
    assert state["step"] == expected and torch.equal(flat["student/0"], torch.full((4,), float(expected)))
    assert len(said) == 1 and said[0].endswith(f"step-{expected:07d}"), said


def test_load_checkpoint_says_so_when_none_loads_and_keeps_quiet_when_all_is_well(tmp_path):
    checkpoints(tmp_path)
    said = []
    assert load_checkpoint(tmp_path, say=said.append)[1]["step"] == 6 and said == []
    for folder in tmp_path.glob("step-*"):
        (folder / "state.pt").write_bytes(b"junk")
    assert load_checkpoint(tmp_path, say=said.append) is None
    assert len(said) == 1 and "starts from step 0" in said[0]


def test_two_checkpoints_are_kept_and_abandoned_later_ones_removed(tmp_path):
    checkpoints(tmp_path, (3, 6, 9, 12))
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000009", "step-0000012"]
    checkpoints(tmp_path, (10,))   # resumed from step 9: the old step-12 is from a trajectory left behind
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000009", "step-0000010"]


def test_a_full_disk_leaves_the_previous_files_and_no_temporaries(tmp_path, monkeypatch):
    atomic_write_json(tmp_path / "results.json", {"ok": 1})
    checkpoints(tmp_path, (3,))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_json(tmp_path / "results.json", {"ok": 2})
    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(OSError, match="No space"):
        checkpoints(tmp_path, (6,))
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before, "a failed write replaced or added a file"
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_only_rank_0_of_a_distributed_job_takes_the_lock(tmp_path, monkeypatch):
    for var in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    assert runlock.main_process()
    with runlock.hold(tmp_path):
        with pytest.raises(runlock.RunFolderBusy, match=f"pid {os.getpid()}"):
            with runlock.hold(tmp_path):   # another open file description: refused like another process
                pass
        monkeypatch.setenv("RANK", "1")
        assert not runlock.main_process()
        with runlock.hold(tmp_path, locks=runlock.main_process()):
            pass
        monkeypatch.setenv("RANK", "0")
        assert runlock.main_process()
    with runlock.hold(tmp_path):   # released at the end of the block
        pass


def test_only_rank_0_clears_leftovers_and_writes_the_config(tmp_path, monkeypatch):
    """The ranks of a torchrun job open the folder at the same moment: a config.yaml temporary written by
    rank 1 while rank 0 clears leftovers was deleted as one, and rank 1 crashed on its rename (CI,
    2026-12-04). Rank 1 must write nothing there."""
    import types

    from omegaconf import OmegaConf

    from kdlab import cli
    hydra_cfg = types.SimpleNamespace(runtime=types.SimpleNamespace(output_dir=str(tmp_path)))
    monkeypatch.setattr("hydra.core.hydra_config.HydraConfig.get", staticmethod(lambda: hydra_cfg))
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    cfg = OmegaConf.create({"seed": 1})
    in_flight = tmp_path / ".config.yaml.x1y2.tmp"   # the other rank's write in progress
    in_flight.write_text("seed: 1\n")

    monkeypatch.setenv("RANK", "1")
    with cli.open_run_folder(cfg) as (run_dir, finished):
        assert run_dir == tmp_path and finished is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [in_flight.name], "rank 1 wrote into the run folder"

    monkeypatch.setenv("RANK", "0")
    with cli.open_run_folder(cfg) as (run_dir, finished):
        assert finished is None
    assert not in_flight.exists()   # a leftover to the lock holder
    assert (tmp_path / "config.yaml").read_text() == OmegaConf.to_yaml(cfg, resolve=True)


def test_a_file_system_without_flock_is_one_line(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runlock.fcntl, "flock", no_locks)
    with pytest.raises(runlock.ConfigError, match="does not support flock"):
        with runlock.hold(tmp_path):
            pass


def test_a_signal_waits_for_the_step_boundary_then_reaches_the_handler_it_had():
    """submitit's handlers (requeue on SIGUSR2) must run after kdlab's checkpoint, not mid-step."""
    from kdlab.preemption import StopSignals

    seen = []
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        with StopSignals() as signals:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert seen == [] and signals.requested("cpu") == signal.SIGUSR2   # recorded, not acted on
            stop = signals.stop(signals.requested("cpu"), step=7)
        assert "stopped by SIGUSR2 after step 7" in str(stop)
        stop.chain()
        assert seen == [signal.SIGUSR2]
        with StopSignals():   # arriving after the last step's check: delivered when training ends
            os.kill(os.getpid(), signal.SIGUSR2)
            assert seen == [signal.SIGUSR2]
        assert seen == [signal.SIGUSR2, signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, before)
