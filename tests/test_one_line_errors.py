"""Bad files and values that used to end in a traceback (issue 23, items 6 and 7): each is one line naming the
file or key and the fix, or (a trust_remote_code student) works. Real processes and real damaged files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, run_kdlab, tiny_teacher_cache

CUSTOM_CONFIG = '''from transformers import LlamaConfig


class KdTinyConfig(LlamaConfig):
    model_type = "kdtiny"
'''
CUSTOM_MODEL = '''from transformers import LlamaForCausalLM

from .configuration_kdtiny import KdTinyConfig


class KdTinyForCausalLM(LlamaForCausalLM):
    config_class = KdTinyConfig
'''


def custom_code_model(folder: Path) -> Path:
    """A tiny LLaMA whose architecture lives in the folder's own Python files (``auto_map``), with kdlab's
    byte tokenizer: what ``trust_remote_code=true`` is for, without a network."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdlab.modeling import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=256, eos_token_id=256, pad_token_id=256)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    saved.update(model_type="kdtiny", architectures=["KdTinyForCausalLM"],
                 auto_map={"AutoConfig": "configuration_kdtiny.KdTinyConfig",
                           "AutoModelForCausalLM": "modeling_kdtiny.KdTinyForCausalLM"})
    (folder / "config.json").write_text(json.dumps(saved))
    (folder / "configuration_kdtiny.py").write_text(CUSTOM_CONFIG)
    (folder / "modeling_kdtiny.py").write_text(CUSTOM_MODEL)
    return folder


def test_a_trust_remote_code_student_trains_and_its_best_student_reloads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = custom_code_model(tmp_path / "custom")
    run_dir = tmp_path / "run"
    args = ["+experiment=smoke", f"student.path={folder}", "student.trust_remote_code=true",
            "eval.models=[student]", f"hydra.run.dir={run_dir}"]
    proc = run_kdlab(*args, check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["run"]["selected"] == "best" and "student" in results["eval"]
    assert json.loads((run_dir / "student_best" / "config.json").read_text())["model_type"] == "kdtiny"
    # without the flag the same folder is refused in one line, not loaded
    proc = run_kdlab("+experiment=smoke", f"student.path={folder}", "eval.models=[student]",
                     f"hydra.run.dir={tmp_path / 'refused'}", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdlab: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "student.trust_remote_code=true" in errors[0]


def one_error_line(proc) -> str:
    """The single ``kdlab: error:`` line of a job that ended with status 2 and no traceback."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdlab: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


# -- model folders ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    from omegaconf import OmegaConf

    from kdlab.modeling import byte_tokenizer, random_model

    folder = tmp_path_factory.mktemp("model") / "m"
    tokenizer = byte_tokenizer()
    random_model(OmegaConf.load(ROOT / "conf/student/tiny.yaml").random, len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def spec_of(folder: Path, trust_remote_code: bool = False):
    from omegaconf import OmegaConf

    return OmegaConf.create({"name": "m", "path": str(folder), "package": None, "hub_id": None, "random": None,
                             "gguf_file": None, "revision": None, "trust_remote_code": trust_remote_code})


def edit_json(file: Path, **changes) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


@pytest.mark.parametrize("damage, match", [
    ("config", r"config.json is not valid JSON \(.*\); copy or save the model again"),
    ("tokenizer", r"tokenizer.json is not valid JSON \(.*\); copy or save the model again"),
    ("model_type", r"config.json's model_type='nosuch' is not an architecture transformers .* knows; fix model_type"),
    ("shape", r"model.safetensors holds model.layers.0.mlp.\w+.weight of shape \[\d+, \d+\], but config.json "
              r"makes it \[\d+, \d+\]: the weights and config.json come from different models"),
    ("not_causal", r"config.json does not describe a causal language model transformers can build \(ValueError"),
    ("custom_code", r"holds its own model code \(config.json's auto_map\).* set student.trust_remote_code=true"),
])
def test_a_damaged_model_folder_is_one_line_before_anything_loads(model_folder, tmp_path, damage, match):
    from kdlab.modeling import ModelUnavailable, load_model, load_tokenizer, resolve_folder

    folder = Path(shutil.copytree(model_folder, tmp_path / "m"))
    if damage == "config":
        (folder / "config.json").write_text((folder / "config.json").read_text()[:40])
    elif damage == "tokenizer":
        (folder / "tokenizer.json").write_text((folder / "tokenizer.json").read_text()[:-100])
    elif damage == "model_type":
        edit_json(folder / "config.json", model_type="nosuch")
    elif damage == "shape":
        edit_json(folder / "config.json", intermediate_size=96)
    elif damage == "not_causal":
        edit_json(folder / "config.json", model_type="t5")
    else:
        edit_json(folder / "config.json", auto_map={"AutoModelForCausalLM": "modeling_x.X"})
    for load in (resolve_folder, load_tokenizer, lambda spec, role: load_model(spec, role, torch.float32, 257)):
        with pytest.raises(ModelUnavailable, match=rf"^student.path={folder}.*{match}") as err:
            load(spec_of(folder), "student")
        assert "\n" not in str(err.value)


def test_a_damaged_tokenizer_json_stops_the_job_with_one_line(model_folder, tmp_path):
    folder = Path(shutil.copytree(model_folder, tmp_path / "m"))
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    line = one_error_line(run_kdlab("+experiment=smoke", f"student.path={folder}", f"hydra.run.dir={tmp_path / 'r'}",
                                    check=False))
    assert f"student.path={folder}: tokenizer.json is not valid JSON" in line


# -- values that only the loaded models and data can check ----------------------------------------------------

def test_lora_target_modules_that_match_nothing_name_the_key_and_the_layers():
    from omegaconf import OmegaConf

    from kdlab.config import ConfigError
    from kdlab.modeling import lora_targets, random_model

    model = random_model(OmegaConf.load(ROOT / "conf/teacher/tiny-gpt2.yaml").random, 257)
    assert lora_targets(model, ["c_attn", "c_proj"], "teacher.finetune.target_modules") == (["c_attn", "c_proj"], True)
    with pytest.raises(ConfigError, match=r"^teacher.finetune.target_modules=\['c_attn', 'q_proj'\]: 'q_proj' match "
                                          r"no module of the gpt2 model; set .* \(c_attn, c_fc, c_proj, lm_head\)"):
        lora_targets(model, ["c_attn", "q_proj"], "teacher.finetune.target_modules")


def test_a_finetune_batch_larger_than_the_training_set_names_its_own_key(tmp_path):
    line = one_error_line(run_kdlab("+experiment=smoke", "teacher.finetune={max_steps:1,batch_size:100}",
                                    f"output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'r'}", check=False))
    assert line.startswith("kdlab: error: teacher.finetune.batch_size=100 is larger than the training set (64 ")
    assert "train.batch_size" not in line


def test_a_damaged_fine_tuned_teacher_names_its_folder_not_a_teacher_path(tmp_path):
    out = tmp_path / "out"
    args = ["+experiment=smoke", "teacher.finetune={max_steps:1}", "train.max_steps=1", "eval.models=[teacher]",
            f"output_dir={out}"]
    run_kdlab(*args, f"hydra.run.dir={tmp_path / 'built'}")
    (published,) = (out / "teachers").glob("tiny-synthetic-*[!k]")   # not the .lock
    good = published.with_name("good")
    shutil.copytree(published, good)
    (published / "finetune.json").write_text('{"key": "tiny-')
    line = one_error_line(run_kdlab(*args, f"hydra.run.dir={tmp_path / 'r1'}", check=False))
    assert f"{published}/finetune.json is damaged (JSONDecodeError" in line and f"delete {published}" in line
    shutil.rmtree(published)
    shutil.copytree(good, published)
    weights = published / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    line = one_error_line(run_kdlab(*args, f"hydra.run.dir={tmp_path / 'r2'}", check=False))
    assert "model.safetensors is not a safetensors file or is truncated" in line and f"delete {published}" in line
    assert "teacher.path" not in line


def test_a_chat_template_without_one_in_the_tokenizer_is_one_line(tmp_path):
    line = one_error_line(run_kdlab("+experiment=smoke", "dataset.template=chat", f"hydra.run.dir={tmp_path}",
                                    check=False))
    assert "the model's tokenizer has no chat template; set dataset.template=alpaca" in line


def test_generation_beyond_the_models_positions_is_one_line_before_training(tmp_path):
    line = one_error_line(run_kdlab("+experiment=smoke", "teacher=tiny-gpt2", "student=tiny-gpt2",
                                    "eval.max_new_tokens=600", f"hydra.run.dir={tmp_path}", check=False))
    assert line.startswith("kdlab: error: eval.max_new_tokens=600 does not fit the student: its longest ")
    assert "the model 512 positions; set eval.max_new_tokens to at most " in line
    assert not (tmp_path / "checkpoints").exists()


def test_a_random_student_beside_a_teacher_of_another_vocabulary_is_refused(tmp_path):
    line = one_error_line(run_kdlab("+experiment=smoke", "student=tiny-bytes", "teacher=smollm2-135m",
                                    f"hydra.run.dir={tmp_path}", check=False))
    assert "teacher=smollm2-135m (49152 tokens) and student=tiny-bytes (257 tokens) use different tokenizers" in line
    assert "divergence=uld" in line


# -- teacher caches --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cache_and_items(tmp_path_factory):
    return tiny_teacher_cache(tmp_path_factory.mktemp("cache") / "c", COMPONENTS, shard_rows=200)


COMPONENTS = {"teacher": {"name": "tiny"}, "dataset": {"name": "synthetic"}, "template": "alpaca", "tokenizer": "t"}


@pytest.mark.parametrize("damage, match", [
    ("empty", r"index.json has no entry for 6 of this run's 6 training examples"),
    ("shifted", r"index.json puts an example at row 1 of shard 0, where row 0 is next"),
    ("rows", r"index.json gives \d+ rows to an example with \d+ response tokens"),
    ("gap", r"index.json covers \d+ of the \d+ rows of shard \d"),
    ("malformed", r"index.json has a malformed entry \[0, 0\] \(not \[shard, first row, rows\]\)"),
])
def test_a_teacher_cache_index_that_does_not_fit_the_examples_is_one_line(cache_and_items, tmp_path, damage, match):
    from kdlab.config import ConfigError
    from kdlab.teacher.topk_cache import TeacherCache

    built, items = cache_and_items
    folder = Path(shutil.copytree(built, tmp_path / "c"))
    TeacherCache(folder).check(COMPONENTS, items)   # sound before the damage
    index = json.loads((folder / "index.json").read_text())
    if damage == "empty":
        index = {}
    elif damage == "shifted":   # every example one row later: each would read its neighbour's last row
        index = {key: [shard, first + 1, rows] for key, (shard, first, rows) in index.items()}
    elif damage == "rows":
        key = next(iter(index))
        index[key][2] -= 1
    elif damage == "gap":   # a shard with a row no example owns
        for kind in ("values", "indices"):
            shard = np.load(folder / f"{kind}-00000.npy")
            np.save(folder / f"{kind}-00000.npy", np.concatenate([shard, shard[:1]]))
    else:
        index[next(iter(index))] = [0, 0]
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=rf"^teacher.cache={folder}: {match}; rebuild it with") as err:
        TeacherCache(folder).check(COMPONENTS, items)
    assert "\n" not in str(err.value)
