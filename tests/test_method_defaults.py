"""The defaults that the methods' and experiments' docstrings (and the papers) state are the composed ones:
every conf/method/*.yaml through the top config (method=<m>) and every experiment (+experiment=<name>)."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from kdlab.cli import CONF_DIR, validate_config

ROOT = Path(CONF_DIR).parent
METHODS = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))

# dotted key -> value, as each method's docstring (and its paper) states them
METHOD_DEFAULTS = {
    "sft": {"method.lr": 5e-4},
    "kd": {"method.alpha": 0.5, "divergence.name": "fkl"},
    "seqkd": {"method.generation.do_sample": False},
    "gkd": {"divergence.name": "jsd", "divergence.beta": 0.5, "method.lmbda": 0.5, "method.temperature": 1.0,
            "method.normalize": "sequence", "method.top_k": 0, "method.top_p": 1.0, "method.max_new_tokens": 128},
    "imitkd": {"divergence.name": "fkl", "method.schedule": "exponential", "method.exp_base": 200,
               "method.temperature": 1.0, "method.top_k": 0, "method.top_p": 1.0},
    "minillm": {"method.alpha": 0.2, "method.clip_ratio": 0.2, "method.gamma": 0.95, "method.reward_scale": 0.5,
                "method.reward_clip": 100.0, "method.rollouts": 256, "method.ppo_epochs": 4, "method.lr": 5e-6,
                "method.schedule": "constant", "method.length_norm": True, "method.single_step": True,
                "method.ptx_weight": 0.5, "method.ptx_kd_ratio": 0.5, "method.ptx_source": "corpus",
                "method.disable_dropout": True, "method.temperature": 1.0, "method.top_k": 0, "method.top_p": 1.0},
    "dpkd": {"method.beta": 0.1, "method.kd_ratio": 0.5, "method.lm_coef": 0.5, "method.lr": 5e-4},
    "okd": {"method.rank": 32, "method.online_module": "lora", "method.weight_decay": 0.0},
}

# what each experiment's header states
PAPER_SETUP = {"dataset.name": "dolly", "dataset.max_prompt_length": 256, "dataset.max_length": 512,
               "eval.do_sample": True, "eval.temperature": 1.0, "eval.seeds": [10, 20, 30, 40, 50],
               "eval.datasets": ["selfinst", "vicuna", "sni", "unni"]}
SMOKE_SCALE = {"teacher.name": "smollm2-135m", "student.name": "smollm2-6l", "dataset.name": "synthetic",
               "train.max_steps": 100, "eval.test_examples": 50}
EXPERIMENT_DEFAULTS = {
    "smoke": {"teacher.name": "tiny", "student.name": "tiny", "train.max_steps": 6},
    "minillm-setup": PAPER_SETUP,
    "minillm-table": {**PAPER_SETUP, "teacher.name": "gpt2-xl", "student.name": "gpt2-base",
                      "method.name": "minillm", "method.sft_epochs": 3, "train.max_steps": 5000,
                      "train.batch_size": 64, "method.rollouts": 256, "method.ppo_epochs": 4, "method.lr": 5e-6,
                      "method.schedule": "constant", "method.temperature": 1.0, "method.max_new_tokens": 256,
                      "method.ptx_corpus": "data/openwebtext.jsonl"},
    "dpkd-table": {**PAPER_SETUP, "teacher.name": "gpt2-xl", "train.epochs": 30, "train.batch_size": 8},
    "okd-table2": {**PAPER_SETUP, "teacher.name": "gpt2-xl", "student.name": "gpt2-base", "train.warmup_ratio": 0.03},
    "okd-table3": {"dataset.name": "dolly", "dataset.max_length": 2048, "teacher.name": "llama2-7b",
                   "student.name": "tinyllama-1.1b"},
    "okd-ablation": {**PAPER_SETUP, "method.name": "okd", "teacher.name": "gpt2-xl"},
    "minillm-table-smoke": SMOKE_SCALE,
    "dpkd-table-smoke": SMOKE_SCALE,
    "okd-table2-smoke": SMOKE_SCALE,
    "okd-ablation-smoke": {**SMOKE_SCALE, "method.name": "okd"},
    "dolly-cpu": {"dataset.name": "dolly", "teacher.name": "smollm2-135m", "student.name": "smollm2-pruned-50",
                  "eval.datasets": ["sni", "unni"], "eval.do_sample": False},
}


def compose_with(*overrides):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def value(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    if dotted == "eval.datasets" and hasattr(node, "keys"):   # the mapping form names its sets by its keys
        return list(node)
    return list(node) if hasattr(node, "__len__") and not isinstance(node, str) and not hasattr(node, "keys") else node


def test_every_method_and_experiment_has_its_stated_defaults_listed():
    assert sorted(METHOD_DEFAULTS) == METHODS and sorted(EXPERIMENT_DEFAULTS) == EXPERIMENTS


@pytest.mark.parametrize("name", METHODS)
def test_method_defaults(name):
    cfg = compose_with(f"method={name}")
    validate_config(cfg)
    assert cfg.method.name == name
    assert {k: value(cfg, k) for k in METHOD_DEFAULTS[name]} == METHOD_DEFAULTS[name]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_defaults(name):
    # GPU experiments compose with hardware=cpu here (no CUDA device on the test machine)
    cfg = compose_with(f"+experiment={name}", "hardware=cpu")
    assert cfg.experiment == name
    assert {k: value(cfg, k) for k in EXPERIMENT_DEFAULTS[name]} == EXPERIMENT_DEFAULTS[name]


# The one assertion that waits for the OKD branch of issue 13 (conf/method/okd.yaml: lora_layers null):
# OKD Sec. V-A adds a standard LoRA module, i.e. in every block, to the teacher's query and value projections.
@pytest.mark.parametrize("experiment", [None] + [e for e in EXPERIMENTS if e.startswith("okd")])
def test_okd_lora_is_in_every_block(experiment):
    cfg = compose_with("method=okd", *([f"+experiment={experiment}", "hardware=cpu"] if experiment else []))
    assert cfg.method.lora_layers is None
