"""`python -m kdlab.clean`: the checkpoints of completed runs go, everything a run still needs stays."""
import json
import shutil

from conftest import run_kdlab
from kdlab import runlock


def test_clean_removes_only_completed_runs_checkpoints_and_a_cleaned_run_still_reports(tmp_path):
    sweep = tmp_path / "sweep"
    finished = sweep / "finished"
    run_kdlab("+experiment=smoke", f"hydra.run.dir={finished}")
    assert (finished / "checkpoints" / "LAST").exists()
    results = json.loads((finished / "results.json").read_text())
    unfinished = sweep / "unfinished"   # a job killed before its evaluation: checkpoints, no results.json
    shutil.copytree(finished, unfinished)
    (unfinished / "results.json").unlink()
    unreadable = sweep / "unreadable"   # not kdlab's (its writes are atomic): never taken for completed
    shutil.copytree(finished, unreadable)
    (unreadable / "results.json").write_text((finished / "results.json").read_text()[:100])
    held = sweep / "held"
    shutil.copytree(finished, held)

    with runlock.hold(held):
        dry = run_kdlab(str(sweep), "--dry-run", module="kdlab.clean")
        assert (finished / "checkpoints").is_dir(), "a dry run removed a checkpoint"
        assert f"would remove {finished}/checkpoints" in dry.stdout
        done = run_kdlab(str(sweep), module="kdlab.clean")
    assert not (finished / "checkpoints").exists()
    assert all((run / "checkpoints" / "LAST").exists() for run in (unfinished, unreadable, held))
    assert f"skipped: {held} is in use by another job" in done.stdout
    assert "removed the checkpoints of 1 completed run(s)" in done.stdout
    assert (finished / "student" / "config.json").exists() and (finished / "results.json").exists()

    again = run_kdlab("+experiment=smoke", f"hydra.run.dir={finished}")
    assert "already complete" in again.stdout
    assert json.loads((finished / "results.json").read_text()) == results


def test_clean_refuses_a_folder_that_is_not_there(tmp_path):
    proc = run_kdlab(str(tmp_path / "nowhere"), module="kdlab.clean", check=False)
    assert proc.returncode == 2 and f"{tmp_path / 'nowhere'} is not a folder" in proc.stderr


def test_a_folder_that_cannot_be_locked_is_skipped_with_the_reason(tmp_path, monkeypatch):
    from kdlab import clean, runlock

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "results.json").write_text('{"run": {"status": "completed"}}')

    def no_flock(fd, op):
        raise OSError(37, "No locks available")
    monkeypatch.setattr(runlock.fcntl, "flock", no_flock)
    removed, skipped = clean.clean([tmp_path])
    assert removed == [] and (run / "checkpoints").is_dir()
    assert len(skipped) == 1 and "does not support flock" in skipped[0]
