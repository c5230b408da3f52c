"""experiments/dolly-cpu.yaml and its sweeps compose into valid jobs on the real Dolly folder."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from kdlab.cli import CONF_DIR, validate_config

METHODS = ["sft", "kd", "seqkd", "imitkd", "gkd", "minillm", "dpkd", "okd"]


@pytest.mark.parametrize("method", METHODS)
def test_dolly_cpu_composes_for_every_method(method):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", ["+experiment=dolly-cpu", f"method={method}"])
    validate_config(cfg)
    assert cfg.dataset.name == "dolly" and cfg.dataset.path.endswith("shared/data/dolly-1k")
    assert cfg.teacher.name == "smollm2-135m" and cfg.teacher.finetune.max_steps == 100
    assert cfg.teacher.finetune.epochs is None
    assert cfg.student.name == "smollm2-pruned-50" and cfg.student.init == "pruned"   # measured: RESULTS.md
    assert cfg.train.epochs == 1 and cfg.train.max_steps is None and cfg.eval.test_examples >= 100
    assert list(cfg.eval.datasets) == ["sni", "unni"] and cfg.eval.analysis.enabled


@pytest.mark.parametrize("method", METHODS)
def test_every_method_of_the_sweep_builds_with_its_length_in_epochs(method, tmp_path):
    """Each job's method built from the sweep's own method and train sections (one epoch, train.max_steps null),
    on tiny random models, and given training examples: what kdlab.run does before its first step. ImitKD once
    stopped there (its beta schedule needed train.max_steps), which only the 27-job sweep would have shown."""
    import torch

    from conftest import conf_option
    from kdlab.data import encode
    from kdlab.data.synthetic import make_synthetic
    from kdlab.divergences import build_divergence
    from kdlab.hardware import Runtime
    from kdlab.methods import build_method
    from kdlab.methods.base import Context
    from kdlab.modeling import byte_tokenizer, freeze, random_model
    from kdlab.trainer import run_steps

    sweep = "dolly-cpu-minillm" if method == "minillm" else "dolly-cpu"
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", ["+experiment=dolly-cpu", f"+sweep={sweep}", f"method={method}",
                                 f"output_dir={tmp_path}"]
                      + (["method.generation.max_new_tokens=4"] if method == "seqkd" else []))   # kept short
    tok = byte_tokenizer()
    teacher = freeze(random_model(conf_option("teacher", "tiny").random, len(tok)).eval())
    ctx = Context(teacher=teacher, student=random_model(conf_option("student", "tiny").random, len(tok)),
                  tokenizer=tok, divergence=build_divergence(cfg.divergence), runtime=Runtime(torch.device("cpu"),
                  torch.float32), train_cfg=cfg.train)
    built = build_method(cfg.method, ctx)
    rows = make_synthetic(0, {"train": 16, "valid": 1, "test": 1})["train"]
    items = encode(rows, tok, "alpaca", 320, 400)
    trained_on = built.prepare_data(items)
    assert len(trained_on) == len(items) and built.phases()
    if method == "imitkd":
        assert built.decay_steps == run_steps(cfg.train, len(items)) == 16 // cfg.train.batch_size


def test_dolly_cpu_sweeps_cover_every_method_with_three_seeds():
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        params = {name: compose("config", ["+experiment=dolly-cpu", f"+sweep={name}"],
                                return_hydra_config=True).hydra.sweeper.params
                  for name in ("dolly-cpu", "dolly-cpu-rkl", "dolly-cpu-minillm")}
    methods = set(params["dolly-cpu"]["method"].split(","))
    assert methods | {"minillm"} == set(METHODS)
    assert all(p["seed"] == "1,2,3" for p in params.values())
    assert Path(CONF_DIR, "sweep", "dolly-cpu-rkl.yaml").read_text().count("rkl") >= 1


def test_the_sweep_script_runs_27_distinct_jobs_then_the_reference_rows_and_the_report(tmp_path):
    """scripts/dolly-cpu.sh with a stand-in interpreter that records its arguments: with JOBS=2 every one of the
    27 (sweep, method, seed) jobs is started once, as a one-job multirun of its sweep, before the reference rows
    (kdlab.eval) and the report."""
    import os
    import subprocess

    calls = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    fake.chmod(0o755)
    root = Path(CONF_DIR).parent
    subprocess.run(["bash", "scripts/dolly-cpu.sh"], cwd=root, check=True, timeout=60,
                   env={**os.environ, "JOBS": "2", "PYTHON": str(fake), "OUTPUT_DIR": str(tmp_path / "out")})
    lines = calls.read_text().splitlines()
    runs = [line.split() for line in lines if line.startswith("-m kdlab.run ")]
    jobs = set()
    for args in runs:
        given = dict(a.split("=", 1) for a in args[2:] if "=" in a)
        assert given["+experiment"] == "dolly-cpu" and given["output_dir"] == str(tmp_path / "out")
        params = {k.removeprefix("hydra.sweeper.params."): v for k, v in given.items() if k.startswith("hydra.")}
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            swept = compose("config", ["+experiment=dolly-cpu", f"+sweep={given['+sweep']}",
                                       *(f"hydra.sweeper.params.{k}={v}" for k, v in params.items())],
                            return_hydra_config=True).hydra.sweeper.params
        assert all("," not in str(v) for v in swept.values()), swept   # one job per call
        jobs.add((swept["method"] if "method" in swept else "minillm", swept.get("divergence"), swept["seed"]))
    assert len(runs) == len(jobs) == 27
    assert {m for m, _, _ in jobs} == set(METHODS)
    after = lines[len(runs):]
    assert after[0].startswith("-m kdlab.eval +experiment=dolly-cpu eval.models=[teacher,student]")
    assert after[1].startswith("-m kdlab.report") and "--baseline sft" in after[1]
    assert {line.split("--baseline ")[1].split(" ")[0] for line in after[1:]} == {"sft", "kd", "gkd", "minillm"}


SMOKE = ["dataset.max_examples={train:16,valid:4,test:4}", "teacher.finetune.max_steps=2",
         "teacher.finetune.epochs=null", "teacher.finetune.batch_size=4", "teacher.finetune.save_every=1",
         "train.max_steps=2", "train.epochs=null", "train.eval_every=null",
         "train.batch_size=4", "train.save_every=1", "train.valid_examples=4", "eval.test_examples=4",
         "eval.batch_size=4", "eval.max_new_tokens=8", "eval.analysis.max_examples=2",
         "hardware.num_threads=2"]


def test_dolly_cpu_smoke_two_methods_one_seed_and_its_report(tmp_path):
    """The experiment end to end at a few rows and steps (the real Dolly, S-NI and UnNI files and the embedded
    teacher, fine-tuned once and shared by both jobs, the student pruned from it once), then RESULTS.md's
    report command on its folder."""
    import json

    from conftest import run_kdlab

    run_kdlab("+experiment=dolly-cpu", *SMOKE, "-m", "method=sft,kd", "seed=1", f"output_dir={tmp_path}")
    found = sorted((tmp_path / "multirun" / "dolly-cpu").rglob("results.json"))
    runs = [json.loads(p.read_text()) for p in found]
    assert sorted(r["run"]["method"] for r in runs) == ["kd", "sft"]
    for r in runs:
        assert r["run"]["status"] == "completed"
        assert set(r["eval"]["student"]) == {"dolly", "sni", "unni"}
        assert all(0 <= m["rougeL"] <= 100 and m["loss"] > 0 for m in r["eval"]["student"].values())
    assert len(list((tmp_path / "teachers").glob("*/finetune.json"))) == 1   # one teacher for both methods
    assert len(list((tmp_path / "students").glob("*/prune.json"))) == 1      # one pruning for both
    proc = run_kdlab(str(tmp_path / "multirun" / "dolly-cpu"), module="kdlab.report")
    report = (tmp_path / "multirun" / "dolly-cpu" / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| smollm2-135m | smollm2-pruned-50 |")]
    assert sorted(row.split(" | ")[2].split(" ")[0] for row in rows) == ["kd", "sft"], proc.stdout[-2000:]
    # the reference rows, as scripts/dolly-cpu.sh measures them: kdlab.eval of the teacher and the untrained
    # pruned student, reusing the sweep's fine-tuned teacher and pruned student
    run_kdlab("+experiment=dolly-cpu", *SMOKE, "eval.models=[teacher,student]", f"output_dir={tmp_path}",
              module="kdlab.eval")
    [reference] = [json.loads(p.read_text()) for p in (tmp_path / "eval").rglob("results.json")]
    assert set(reference["eval"]) == {"teacher", "student"}
    assert all(set(rows) == {"dolly", "sni", "unni"} for rows in reference["eval"].values())
    assert len(list((tmp_path / "teachers").glob("*/finetune.json"))) == 1
    assert len(list((tmp_path / "students").glob("*/prune.json"))) == 1

