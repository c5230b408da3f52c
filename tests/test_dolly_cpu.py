"""experiments/dolly-cpu.yaml and its sweeps compose into valid jobs on the real Dolly folder."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from kdlab.run import CONF_DIR, validate_config

METHODS = ["sft", "kd", "seqkd", "imitkd", "gkd", "minillm", "dpkd", "okd"]


@pytest.mark.parametrize("method", METHODS)
def test_dolly_cpu_composes_for_every_method(method):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", ["+experiment=dolly-cpu", f"method={method}"])
    validate_config(cfg)
    assert cfg.dataset.name == "dolly" and cfg.dataset.path.endswith("shared/data/dolly-1k")
    assert cfg.teacher.name == "smollm2-135m" and cfg.teacher.finetune.max_steps > 0
    assert cfg.student.init == "teacher_layers" and cfg.student.num_layers == 15
    assert list(cfg.eval.datasets) == ["sni", "unni"] and cfg.eval.analysis.enabled


def test_dolly_cpu_sweeps_cover_every_method_with_three_seeds():
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        params = {name: compose("config", ["+experiment=dolly-cpu", f"+sweep={name}"],
                                return_hydra_config=True).hydra.sweeper.params
                  for name in ("dolly-cpu", "dolly-cpu-rkl", "dolly-cpu-minillm")}
    methods = set(params["dolly-cpu"]["method"].split(","))
    assert methods | {"minillm"} == set(METHODS)
    assert all(p["seed"] == "1,2,3" for p in params.values())
    assert Path(CONF_DIR, "sweep", "dolly-cpu-rkl.yaml").read_text().count("rkl") >= 1
