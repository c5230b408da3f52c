"""Every named experiment and sweep composes and validates; sweeps launch the grid they promise."""
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from kdlab.cli import CONF_DIR, validate_config

ROOT = Path(CONF_DIR).parent
EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))
SWEEPS = sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml"))


def compose_with(*overrides):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_validates(name):
    # GPU experiments are validated with hardware=cpu here (no CUDA device on the test machine)
    cfg = compose_with(f"+experiment={name}", "hardware=cpu")
    assert cfg.experiment == name
    validate_config(cfg)


def test_paper_experiments_use_the_papers_setup():
    cfg = compose_with("+experiment=okd-table2", "hardware=cpu")
    assert (cfg.teacher.name, cfg.student.name, cfg.dataset.name) == ("gpt2-xl", "gpt2-base", "dolly")
    assert cfg.eval.do_sample and list(cfg.eval.seeds) == [10, 20, 30, 40, 50]
    assert list(cfg.eval.datasets) == ["selfinst", "vicuna", "sni", "unni"]
    assert cfg.dataset.max_prompt_length == 256 and cfg.dataset.max_length == 512
    assert compose_with("+experiment=okd-table3", "hardware=cpu").dataset.max_length == 2048


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_is_a_multirun_over_valid_choices(name):
    spec = yaml.safe_load((ROOT / "sweeps" / f"{name}.yaml").read_text())
    assert spec["hydra"]["mode"] == "MULTIRUN"
    params = spec["hydra"]["sweeper"]["params"]
    experiment = {"okd-ablation-divergence": "okd-ablation", "okd-ablation-module": "okd-ablation",
                  "okd-ablation-rank": "okd-ablation", "okd-ablation-alpha": "okd-ablation",
                  "okd-ablation-blocks": "okd-ablation"}.get(name)
    base = [f"+experiment={experiment}", "hardware=cpu"] if experiment else []
    for key, values in params.items():
        for value in str(values).split(","):
            cfg = compose_with(*base, f"{key}={value.strip()}")
            validate_config(cfg)
