"""Config composition: groups, the family teacher default, and validation before anything loads."""
import pytest
from hydra import compose, initialize_config_dir

from kdlab.config import ConfigError
from kdlab.cli import CONF_DIR, validate_config

from conftest import run_kdlab


def cfg(*overrides):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("student,teacher", [("smollm2-6l", "smollm2-135m"), ("gpt2-base", "gpt2-xl"),
                                             ("gpt2-medium", "gpt2-xl"), ("gpt2-large", "gpt2-xl"),
                                             ("tinyllama-1.1b", "llama2-7b"), ("llama-68m", "llama2-7b"),
                                             ("tiny", "tiny")])
def test_student_brings_its_family_teacher(student, teacher):
    c = cfg(f"student={student}")
    assert c.teacher.name == teacher and c.student.name == student
    validate_config(c)


def test_teacher_override_wins_over_the_family_default():
    assert cfg("student=gpt2-base", "teacher=smollm2-135m").teacher.name == "smollm2-135m"


def test_every_group_option_validates():
    import pathlib
    for group in ["teacher", "student", "method", "divergence", "dataset", "hardware", "logger"]:
        for path in sorted((pathlib.Path(CONF_DIR) / group).glob("*.yaml")):
            c = cfg(f"{group}={path.stem}")
            if group == "hardware" and c.hardware.device == "cuda":
                continue  # validated on GPU machines only
            if group == "dataset" and c.dataset.source == "jsonl":
                c.dataset.path = "/tmp"
            validate_config(c)


@pytest.mark.parametrize("override,message", [
    ("method.alpha=2", "method.alpha=2 is out of range"),
    ("method.lr=-1", "method.lr=-1 is out of range"),
    ("train.batch_size=0", "train.batch_size=0"),
    ("+method.alhpa=0.3", "method.alhpa is not a known key"),
    ("seed=abc", "seed='abc'"),
    # both lengths set: max_steps would decide alone and epochs be ignored
    ("train.epochs=2", r"train.max_steps=150 and train.epochs=2 are both set.*train.max_steps=null to train 2 "
                       r"epoch\(s\), or train.epochs=null to train 150 steps"),
    ("train.max_steps=null", "train.max_steps and train.epochs are both null"),
    ("+teacher.finetune={max_steps:100,epochs:1}", "teacher.finetune.max_steps=100 and teacher.finetune.epochs=1 "
                                                   "are both set"),
])
def test_out_of_range_values_are_rejected_with_the_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg(override))


def test_cli_rejects_bad_values_before_loading_models():
    proc = run_kdlab("method.alpha=2", "output_dir=/tmp/kdlab-test-outputs", check=False, timeout=120)
    assert proc.returncode == 2
    assert "method.alpha=2 is out of range; set method.alpha to a number in [0, 1]" in proc.stderr
    assert "Loading" not in proc.stderr  # no model was loaded
    proc = run_kdlab("method=foo", check=False, timeout=120)
    assert proc.returncode != 0
    assert "Could not find 'method/foo'" in proc.stderr and "kd" in proc.stderr and "sft" in proc.stderr


def test_offline_hub_student_fails_within_seconds_in_one_line(tmp_path):
    import time
    start = time.time()
    proc = run_kdlab("method=kd", "student=gpt2-base", f"hydra.run.dir={tmp_path}", check=False, timeout=120)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("kdlab: error")]
    assert len(lines) == 1 and "MiniLLM/teacher-gpt2-1.5B" in lines[0] and "teacher.path=" in lines[0]
    assert time.time() - start < 60  # interpreter + imports dominate; the check itself is instant


def test_the_headline_command_parses_and_needs_only_the_models(tmp_path):
    """`python -m kdlab.run method=okd student=gpt2-base -m seed=1,2,3,4,5` exactly as written: here the GPT-2
    models are not cached, so every job stops at once with the one-line model message, not a parser error."""
    proc = run_kdlab("method=okd", "student=gpt2-base", "-m", "seed=1,2,3,4,5", f"hydra.sweep.dir={tmp_path}",
                     check=False, timeout=300)
    assert "unrecognized arguments" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("kdlab: error")]
    assert errors and "MiniLLM/teacher-gpt2-1.5B" in errors[0]
