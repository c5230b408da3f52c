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

