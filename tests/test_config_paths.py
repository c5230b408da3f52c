"""Config values that become paths (issue 23, item 5): names are checked before anything is written, every
store path stays under its root, and a ``checkpoints/LAST`` that points anywhere but at a checkpoint folder
is a damaged pointer. Real processes and real files."""
from __future__ import annotations

import re
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import run_kdlab
from kdlab.checkpoint import load_checkpoint, save_checkpoint
from kdlab.cli import CONF_DIR, validate_config
from kdlab.config import ConfigError, check_under


def composed(*overrides):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("config", overrides=["+experiment=smoke", *overrides])


def test_a_traversing_teacher_name_writes_nothing_outside_and_is_one_line(tmp_path):
    outside = tmp_path / "outside"
    out = tmp_path / "out" / "deeper"
    proc = run_kdlab("+experiment=smoke", f"teacher.name=../../outside/x", "teacher.finetune={max_steps:1}",
                     f"output_dir={out}", f"hydra.run.dir={tmp_path / 'run'}", check=False, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdlab: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "teacher.name='../../outside/x'" in errors[0]
    assert not outside.exists() and not (tmp_path / "out" / "teachers").exists()


@pytest.mark.parametrize("key,value", [
    ("student.name", "../s"), ("teacher.name", ".hidden"), ("dataset.name", "a/b"), ("experiment", "../../e"),
    ("run_name", "/abs"), ("teacher.name", ""), ("student.name", "a\\b"), ("teacher.name", 3),
])
def test_names_that_become_path_components_are_checked_at_validation(key, value):
    cfg = composed()
    OmegaConf.update(cfg, key, value)
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=.* is not a valid name"):
        validate_config(cfg)


def test_an_eval_dataset_name_is_checked_too():
    cfg = composed()
    cfg.eval.datasets = {"../x": {"source": "jsonl", "path": "x.jsonl"}}
    with pytest.raises(ConfigError, match=r"^eval\.datasets\.\.\./x\.name='\.\./x' is not a valid name"):
        validate_config(cfg)


def test_the_shipped_names_pass():
    validate_config(composed("eval.datasets=[sni]"))


def test_a_store_path_outside_its_root_is_refused(tmp_path):
    assert check_under(tmp_path, tmp_path / "a" / "b", "x") == tmp_path / "a" / "b"
    for escaping in (tmp_path / ".." / "x", tmp_path, tmp_path / "a" / ".." / ".."):
        with pytest.raises(ConfigError, match="is not inside"):
            check_under(tmp_path, escaping, "teacher.finetune")
    (tmp_path / "link").symlink_to(tmp_path.parent)
    with pytest.raises(ConfigError, match="is not inside"):
        check_under(tmp_path, tmp_path / "link" / "x", "teacher.finetune")


@pytest.mark.parametrize("pointer", ["..", ".", "/etc", "notes", "step-0000003/../step-0000006", "step-x"])
def test_a_last_pointing_outside_the_checkpoints_falls_back(tmp_path, pointer):
    for step in (3, 6):
        save_checkpoint(tmp_path, step, {"student": [torch.full((2,), float(step))]}, {"step": step})
    (tmp_path / "notes").mkdir()
    (tmp_path / "step-x").mkdir()
    (tmp_path / "LAST").write_text(pointer + "\n")
    said = []
    flat, state = load_checkpoint(tmp_path, say=said.append)
    assert state["step"] == 6 and torch.equal(flat["student/0"], torch.full((2,), 6.0))
    assert len(said) == 1 and "which is not a checkpoint folder" in said[0] and said[0].endswith("step-0000006")


def test_a_job_whose_last_is_dotdot_resumes_from_its_newest_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    args = ["+experiment=smoke", "train.max_steps=3", "train.save_every=3", f"hydra.run.dir={run_dir}"]
    run_kdlab(*args)
    # a job that stopped after its last checkpoint, before its results, then had its pointer damaged
    (run_dir / "results.json").unlink()
    shutil.rmtree(run_dir / "student")
    (run_dir / "checkpoints" / "LAST").write_text("..\n")
    proc = run_kdlab(*args, check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if "not a checkpoint folder" in line]
    assert len(said) == 1 and said[0].endswith("step-0000003"), proc.stderr[-3000:]
    assert "kdlab: resuming from step 3" in proc.stderr
    assert (run_dir / "results.json").exists()
