"""The layout of conf/: the shared model base of teacher/student options, the debug group that scales an
experiment down (and the named smoke variants built from it), and the optional, git-ignored conf/local/."""
import re
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kdlab.cli import CONF_DIR, validate_config

ROOT = Path(CONF_DIR).parent
EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))
SMOKE_VARIANTS = [e for e in EXPERIMENTS if "/debug/embedded" in (ROOT / "experiments" / f"{e}.yaml").read_text()]


def compose_in(conf_dir, *overrides):
    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def plain(cfg):
    return OmegaConf.to_container(cfg)


@pytest.mark.parametrize("group", ["teacher", "student"])
def test_options_state_only_what_differs_from_their_base(group):
    base = OmegaConf.load(ROOT / "conf" / "model" / f"{group}.yaml")
    base = {**OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "source.yaml")),
            **{k: v for k, v in OmegaConf.to_container(base).items() if k != "defaults"}}
    for path in sorted((ROOT / "conf" / group).glob("*.yaml")):
        own = OmegaConf.to_container(OmegaConf.load(path))
        assert f"/model/{group}@_here_" in own.pop("defaults"), path.name
        assert not {k for k, v in own.items() if k in base and base[k] == v}, f"{path.name} restates its base"
        cfg = compose_in(CONF_DIR, f"{group}={path.stem}", *(["student=tiny"] if group == "teacher" else []))
        assert set(cfg[group]) == set(base) and cfg[group].name == path.stem


def test_model_bases_are_not_options_of_a_group():
    # `python -m kdlab.run` lists a group's options by globbing conf/<group>/*.yaml (kdlab.cli)
    bases = {p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")}
    assert {"source", "teacher", "student"} <= bases
    for group in ("teacher", "student"):
        assert not bases & {p.stem for p in (ROOT / "conf" / group).glob("*.yaml")}


@pytest.mark.parametrize("name", SMOKE_VARIANTS)
def test_a_smoke_variant_is_its_experiment_plus_debug_embedded(name):
    base = re.search(r"^defaults: \[([\w-]+), /debug/embedded\]$", (ROOT / "experiments" / f"{name}.yaml").read_text(),
                     re.M).group(1)
    variant = plain(compose_in(CONF_DIR, f"+experiment={name}"))
    scaled = plain(compose_in(CONF_DIR, f"+experiment={base}", "+debug=embedded"))
    assert variant.pop("experiment") == name and scaled.pop("experiment") == base
    assert variant == scaled


# dolly-cpu is a CPU experiment already, on Dolly rows of its own (dataset.path): not one to scale down
@pytest.mark.parametrize("name", [e for e in EXPERIMENTS if e not in SMOKE_VARIANTS and e != "dolly-cpu"])
def test_debug_embedded_scales_any_experiment_down(name):
    cfg = compose_in(CONF_DIR, f"+experiment={name}", "+debug=embedded")
    validate_config(cfg)
    assert (cfg.teacher.name, cfg.dataset.name, cfg.hardware.device, cfg.logger.name) == (
        "smollm2-135m", "synthetic", "cpu", "csv")
    assert cfg.student.name == "smollm2-6l"
    assert (cfg.train.max_steps, cfg.train.epochs, cfg.eval.test_examples, cfg.eval.do_sample,
            cfg.eval.datasets) == (100, None, 50, False, None)
    assert cfg.experiment == name


# The example of docs/SLURM.md, as a user would save it to conf/local/default.yaml.
LOCAL_EXAMPLE = re.search(r"```yaml\n(# @package _global_\n# conf/local/default.yaml.*?)```",
                          (ROOT / "docs" / "SLURM.md").read_text(), re.S).group(1)


@pytest.fixture
def conf_copy(tmp_path):
    """conf/ (symlinked experiments and sweeps resolved) copied, so a test can add conf/local/ to it."""
    shutil.copytree(ROOT / "conf", tmp_path / "conf", ignore=shutil.ignore_patterns("local"))
    return tmp_path / "conf"


def test_without_a_local_file_the_config_is_as_without_the_entry(conf_copy):
    with_entry = [OmegaConf.to_yaml(compose_in(conf_copy, *o)) for o in ((), ("+experiment=smoke",))]
    config = conf_copy / "config.yaml"
    text = config.read_text()
    assert "  - optional local: default" in text
    config.write_text("".join(line for line in text.splitlines(True) if "optional local" not in line))
    assert with_entry == [OmegaConf.to_yaml(compose_in(conf_copy, *o)) for o in ((), ("+experiment=smoke",))]


def test_a_local_file_is_merged_under_experiments_and_the_command_line(conf_copy):
    without = plain(compose_in(conf_copy, "+experiment=smoke"))
    (conf_copy / "local").mkdir()
    (conf_copy / "local" / "default.yaml").write_text(LOCAL_EXAMPLE)
    cfg = compose_in(conf_copy)
    assert (cfg.output_dir, cfg.hardware.slurm.partition, cfg.hardware.slurm.account) == (
        "/scratch/me/kdlab", "gpu", "myproj")
    validate_config(cfg)
    # over another hardware group (here chosen by an experiment), and under what the command line sets
    cfg = compose_in(conf_copy, "+experiment=minillm-setup", "hardware.slurm.account=other")
    assert (cfg.hardware.name, cfg.hardware.slurm.partition, cfg.hardware.slurm.account) == ("gpu", "gpu", "other")
    # nothing else changes
    with_local = plain(compose_in(conf_copy, "+experiment=smoke"))
    assert (with_local.pop("output_dir"), without.pop("output_dir")) == ("/scratch/me/kdlab", "outputs")
    for d in (with_local, without):
        d["hardware"]["slurm"].pop("partition"), d["hardware"]["slurm"].pop("account")
    assert with_local == without
