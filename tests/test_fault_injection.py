"""Faults injected into real processes: NaN and infinite settings, a training that turns non-finite, a run
folder holding another job's outputs, a full disk (a real tmpfs, at results.md and at a checkpoint), and
kill -9 while a shared store publishes an entry. Each test fails without the guarantee it checks
(docs/RELIABILITY.md, "Bad numbers, reused folders, full disks, store leftovers")."""
from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import ROOT, kdlab_env, run_kdlab
from kdlab import cli, runlock
from kdlab.checkpoint import atomic_dir
from kdlab.config import ConfigError, Range

SMOKE = ("+experiment=smoke", "method=kd")


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The job ended with exit status 2 and exactly one ``kdlab: error:`` line, no traceback (a progress bar may
    stand before it on its line)."""
    errors = re.findall(r"kdlab: error: [^\r\n]*", proc.stderr)
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def all_finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(path).values())


# -- NaN and infinity ------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("check", [Range(0, 1), Range(0, low_open=True), Range(), Range(0, optional=True)],
                         ids=["[0,1]", "(0,inf)", "unbounded", "optional"])
def test_every_range_refuses_non_finite_values(check, value):
    with pytest.raises(ConfigError, match=r"^method\.x=.* is not a finite number; set method\.x to a number"):
        check("method.x", value)


@pytest.mark.parametrize("override", ["method.alpha=nan", "method.lr=inf"])
def test_nan_and_infinite_settings_are_refused_before_anything_runs(tmp_path, override):
    run_dir = tmp_path / "run"
    line = one_error_line(run_kdlab(*SMOKE, override, f"hydra.run.dir={run_dir}", check=False))
    key = override.split("=")[0]
    assert f"{key}=" in line and "not a finite number" in line, line
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists()


def test_a_training_that_turns_non_finite_stops_at_that_step_and_saves_nothing_of_it(tmp_path):
    """lr=1e30: the first step's update is finite, the next step's gradient overflows; without the check the
    weights become NaN, are checkpointed, and evaluation crashes on them, again on every rerun."""
    run_dir = tmp_path / "run"
    proc = run_kdlab(*SMOKE, "method.lr=1e30", "train.save_every=1", "train.log_every=1", f"hydra.run.dir={run_dir}",
                     check=False)
    line = one_error_line(proc)
    step = int(re.search(r"diverged at step (\d+)", line).group(1))
    assert re.search(r"=(nan|inf|-inf)\b", line) and "nothing of this step was saved" in line, line
    saved = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))
    assert saved and saved[-1] == step - 1, f"diverged at step {step}, checkpoints {saved}"
    assert (run_dir / "checkpoints" / "LAST").read_text().strip() == f"step-{step - 1:07d}"
    written = [*(run_dir / "checkpoints").glob("step-*/params.safetensors"), *run_dir.glob("student*/*.safetensors")]
    assert all(all_finite(path) for path in written), "non-finite weights were written"
    assert not (run_dir / "student").exists() and not (run_dir / "results.json").exists()
    logged = [int(s) for s in re.findall(r'"step": (\d+)', (run_dir / "metrics.jsonl").read_text())]
    assert logged and max(logged) < step


# -- a reused run folder ---------------------------------------------------------------------------------

def test_a_folder_holding_another_jobs_student_best_is_refused(tmp_path):
    """A job killed after its first student_best/ and before any checkpoint, evaluation or result: a job with
    another config must not take the folder as unused (it would report that student as its own)."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "kdlab.run", *SMOKE, "eval.models=[student]", "train.max_steps=100000",
           "train.eval_every=1", "train.save_every=null", f"hydra.run.dir={run_dir}"]
    first = subprocess.Popen(cmd, cwd=ROOT, env=kdlab_env(), stdout=(tmp_path / "first.log").open("w"),
                             stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not (run_dir / "student_best" / "config.json").exists():
            assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        first.kill()
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "eval").exists()
    kept = (run_dir / "student_best" / "config.json").read_bytes()

    other = run_kdlab(*SMOKE, "eval.models=[student]", "train.eval_every=null", "train.save_every=null",
                      f"hydra.run.dir={run_dir}", check=False)
    line = one_error_line(other)
    assert "holds a job with a different config" in line and "student_best" in line, line
    assert not (run_dir / "results.json").exists() and (run_dir / "student_best" / "config.json").read_bytes() == kept


def test_only_a_folder_without_outputs_takes_a_new_config(tmp_path, monkeypatch):
    """Hydra's files, the lock and the config are no outputs: a job that stopped before writing any (a missing
    model) is started again with the new config. Anything else is, config.yaml missing or not."""
    import types

    monkeypatch.setattr("hydra.core.hydra_config.HydraConfig.get", staticmethod(
        lambda: types.SimpleNamespace(runtime=types.SimpleNamespace(output_dir=str(tmp_path)))))
    for var in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 1\n")
    (tmp_path / "cli.log").write_text("")
    (tmp_path / "config.yaml").write_text("seed: 1\n")
    new = OmegaConf.create({"seed": 2})
    with cli.open_run_folder(new):
        pass
    assert (tmp_path / "config.yaml").read_text() == "seed: 2\n"
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"holds a job with a different config \(metrics\.jsonl\)"):
        with cli.open_run_folder(OmegaConf.create({"seed": 3})):
            pass
    with cli.open_run_folder(new):   # the same config: its own outputs
        pass
    (tmp_path / "config.yaml").unlink()
    with pytest.raises(ConfigError, match="outputs of a job whose config.yaml is missing"):
        with cli.open_run_folder(new):
            pass


# -- a full disk -----------------------------------------------------------------------------------------

def _mount_options(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items())


@contextlib.contextmanager
def tmpfs(folder: Path, **options):
    """A real small file system at ``folder`` (needs root: skipped elsewhere)."""
    folder.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", _mount_options(options), "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): a real full disk needs one")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def remount(folder: Path, **options) -> None:
    subprocess.run(["mount", "-o", "remount," + _mount_options(options), str(folder)], check=True)


def test_a_full_disk_at_results_md_is_one_line_and_the_rerun_writes_it(tmp_path):
    """The disk fills at the job's last new file, results.md, after results.json: the job ends with one line
    naming it, and the rerun (which finds the job complete) writes it from results.json."""
    args = (*SMOKE, "train.eval_every=null", "train.save_every=null")
    with tmpfs(tmp_path / "measure", size="64m") as disk:
        run_kdlab(*args, f"hydra.run.dir={disk / 'run'}")
        expected = (disk / "run" / "results.md").read_text()
        fs = os.statvfs(disk)
        files = fs.f_files - fs.f_ffree
    with tmpfs(tmp_path / "disk", size="64m", nr_inodes=files - 1) as disk:   # one file less: no results.md
        run_dir = disk / "run"
        line = one_error_line(run_kdlab(*args, f"hydra.run.dir={run_dir}", check=False))
        assert f"writing {run_dir / 'results.md'} (" in line and "no free inodes" in line, line
        assert (run_dir / "results.json").exists() and not (run_dir / "results.md").exists()
        assert not [p for p in run_dir.rglob("*.tmp")]
        remount(disk, nr_inodes=files + 100)
        again = run_kdlab(*args, f"hydra.run.dir={run_dir}")
        assert "already complete" in again.stdout
        assert (run_dir / "results.md").read_text() == expected


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_rerun_finishes(tmp_path):
    """160 KiB: the run's first files and the checkpoint's params fit, its state.pt (torch.save, which reports a
    full disk as a RuntimeError) does not."""
    args = (*SMOKE, "train.eval_every=null", "train.save_every=3")
    with tmpfs(tmp_path / "disk", size="160k") as disk:
        run_dir = disk / "run"
        line = one_error_line(run_kdlab(*args, f"hydra.run.dir={run_dir}", check=False))
        assert f"No space left on device writing {run_dir / 'checkpoints' / 'step-0000003'} (" in line, line
        free, needed = re.search(r"\(([\d.]+) KiB free there, about ([\d.]+) KiB needed\)", line).groups()
        assert float(free) < float(needed), line
        assert not (run_dir / "checkpoints" / "LAST").exists() and not [p for p in run_dir.rglob("*.tmp")]
        remount(disk, size="64m")
        run_kdlab(*args, f"hydra.run.dir={run_dir}")
        assert (run_dir / "checkpoints" / "LAST").read_text().strip() == "step-0000006"
        written = sum(p.stat().st_size for p in (run_dir / "checkpoints" / "step-0000003").iterdir()) / 1024
        assert 0.9 < float(needed) / written < 1.1, f"{needed} KiB needed said, {written:.1f} KiB written"
        assert all_finite(run_dir / "student" / "model.safetensors") and (run_dir / "results.md").read_text()


@pytest.mark.parametrize("failure", ["torch.save", "safetensors", "quota", "unrelated"])
def test_a_full_disk_however_a_library_reports_it_is_one_diskfull(tmp_path, monkeypatch, failure):
    """Without root (no tmpfs): the errors the libraries raise on a full disk, injected where they raise them."""
    import errno

    from kdlab import checkpoint

    def torch_save(obj, f):   # what torch.save does with a file object on a full disk
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    def save_file(tensors, path):
        message = {"safetensors": "No space left on device (os error 28)", "quota": "Disk quota exceeded (os error 122)",
                   "unrelated": "shape mismatch"}[failure]
        raise RuntimeError(f"Error while serializing: I/O error: {message}")

    if failure == "torch.save":
        monkeypatch.setattr(checkpoint.torch, "save", torch_save)
    else:
        monkeypatch.setattr(checkpoint, "save_file", save_file)
    params = {"student": [torch.zeros(1000)]}
    if failure == "unrelated":   # a roomy disk: the library's own error stays
        with pytest.raises(RuntimeError, match="shape mismatch"):
            checkpoint.save_checkpoint(tmp_path, 3, params, {"step": 3})
    else:
        with pytest.raises(checkpoint.DiskFull) as caught:
            checkpoint.save_checkpoint(tmp_path, 3, params, {"step": 3})
        line = str(caught.value)
        assert f"writing {tmp_path / 'step-0000003'} (" in line and "\n" not in line, line
        assert ("Disk quota exceeded" if failure == "quota" else "No space left on device") in line
        assert caught.value.needed >= 4000 and "run the same command again" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a failed write left something"


# -- a kill while a store publishes ----------------------------------------------------------------------

KILL_AT_PUBLISH = """
import os, re, runpy, signal, sys
pattern = re.compile(sys.argv.pop(1))
replace = os.replace
def replace_or_die(src, dst, *args, **kwargs):
    if pattern.search(os.fspath(src)):   # the entry is complete under its temporary name: kill -9 now
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst, *args, **kwargs)
os.replace = replace_or_die
module = sys.argv.pop(1)
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def killed_at_publish(pattern: str, module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module args`` killed (SIGKILL) just before it renames a temporary matching ``pattern``."""
    proc = subprocess.run([sys.executable, "-c", KILL_AT_PUBLISH, pattern, module, *args], cwd=ROOT,
                          env=kdlab_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return proc


def test_a_teacher_cache_killed_while_published_is_removed_by_the_next_build(tmp_path):
    out = tmp_path / "cache"
    args = (*SMOKE[:1], "cache.top_k=8", f"cache.out={out}")
    killed_at_publish(r"/cache/\.[^/]+\.tmp$", "kdlab.cache_teacher", *args)
    left = list(out.glob(".*.tmp"))
    assert len(left) == 1 and (left[0] / "manifest.json").exists(), left   # a full copy
    run_kdlab(*args, module="kdlab.cache_teacher")
    assert not list(out.glob(".*.tmp")) and len(list(out.glob("*/manifest.json"))) == 1


def test_a_fine_tuned_teacher_killed_while_published_is_removed_by_the_next_job(tmp_path):
    args = (*SMOKE, "teacher.finetune={max_steps:2,batch_size:4}", "eval.models=[student]", "train.max_steps=2",
            f"output_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}")
    killed_at_publish(r"/teachers/\.[^/]+\.tmp$", "kdlab.run", *args)
    teachers = tmp_path / "teachers"
    left = list(teachers.glob(".*.tmp"))
    assert len(left) == 1 and (left[0] / "finetune.json").exists(), left
    run_kdlab(*args)
    assert not list(teachers.glob(".*.tmp")) and len(list(teachers.glob("*/finetune.json"))) == 1


WRITE_FOREVER = """
import sys, time
from pathlib import Path
from kdlab.checkpoint import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    print(tmp, flush=True)
    time.sleep(300)
"""


def test_stale_temporaries_go_but_not_a_live_writers_nor_another_programs(tmp_path):
    store = tmp_path
    with atomic_dir(store / "published") as tmp:   # what is published holds no writer lock
        (tmp / "weights").write_text("w")
    assert [p.name for p in (store / "published").iterdir()] == ["weights"]
    live, dead = (subprocess.Popen([sys.executable, "-c", WRITE_FOREVER, str(store / name)], cwd=ROOT, env=kdlab_env(),
                                   stdout=subprocess.PIPE, text=True) for name in ("busy", "dead"))
    try:
        busy_tmp, dead_tmp = (Path(proc.stdout.readline().strip()) for proc in (live, dead))
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        (store / ".theirs.a1b2c3d4.tmp").mkdir()   # no writer lock: another program's, left alone
        (store / "done").mkdir()
        (store / ".done.old").mkdir()              # a kill between atomic_dir's renames: the new one is there
        (store / ".restored.old").mkdir()          # the new one missing, no writer: the old one is renamed back
        (store / ".busy.old").mkdir()              # the new one missing while its writer lives: its business
        removed = runlock.remove_stale_temporaries(store)
        assert sorted(p.name for p in removed) == sorted([dead_tmp.name, ".done.old"])
        assert busy_tmp.is_dir() and (store / ".theirs.a1b2c3d4.tmp").is_dir() and (store / ".busy.old").is_dir()
        assert (store / "restored").is_dir() and not (store / ".restored.old").exists()
    finally:
        for proc in (live, dead):
            proc.kill()
            proc.wait()
    assert [p.name for p in runlock.remove_stale_temporaries(store)] == [busy_tmp.name]   # its writer is dead now
