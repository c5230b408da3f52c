"""teacher.finetune: the teacher fine-tuned once per key, shared by methods, seeds and concurrent jobs,
resumed after a kill, and the teacher that the job evaluates and distils from."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from conftest import ROOT, kdlab_env, run_kdlab
from kdlab.config import ConfigError
from kdlab.data import Encoded
from kdlab.cli import CONF_DIR
from kdlab.teacher import validate_teacher
from kdlab.teacher.finetune import DEFAULTS, teacher_key

FT = "teacher.finetune={max_steps:8,lr:3e-3,batch_size:4,save_every:4}"
TRAINED = "kdlab: fine-tuning teacher"


def config(*overrides):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("config", overrides=["+experiment=smoke", FT, *overrides])


def items(last_token: int = 7):
    return [Encoded([1, 2, 3], [4, 5, 6], {}), Encoded([8, 9], [10, last_token], {})]


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def published(output_dir: Path) -> Path:
    found = [p for p in (output_dir / "teachers").iterdir() if (p / "finetune.json").exists()]
    assert len(found) == 1, found
    return found[0]


def test_key_covers_teacher_data_template_and_finetune_config_but_not_method_or_seed():
    base = teacher_key(config(), items())
    changed = {"teacher.finetune.lr=1e-3", "teacher.finetune.max_steps=9", "teacher.finetune.batch_size=2",
               "+teacher.finetune.mode=lora", "+teacher.finetune.seed=1", "+teacher.finetune.warmup_ratio=0.5",
               "+teacher.finetune.schedule=constant", "+teacher.finetune.weight_decay=0",
               "+teacher.finetune.grad_clip=null", "+teacher.finetune.grad_accum=2", "+teacher.finetune.epochs=1",
               "teacher.random.seed=1", "teacher.random.hidden_size=32", "teacher=tiny-gpt2", "teacher.template=chat",
               "dataset.template=chat", "hardware.dtype=bfloat16"}
    # every fine-tuning setting but save_every is among the changes above
    assert {k for k in DEFAULTS if k not in ("save_every",) and not k.startswith(("lora", "target"))} == \
        {o.split("=")[0].split(".")[-1] for o in changed if "finetune" in o}
    keys = {o: teacher_key(config(o), items()) for o in changed}
    assert base not in keys.values() and len(set(keys.values())) == len(changed)
    assert teacher_key(config(), items(last_token=11)) != base        # one token of the training data
    assert teacher_key(config(), items()[:1]) != base
    for same in ("seed=7", "method=okd", "method=sft", "train.max_steps=3", "method.lr=1e-2",
                 "teacher.finetune.save_every=1", "divergence=rkl"):
        assert teacher_key(config(same), items()) == base, same
    lora = config("+teacher.finetune.mode=lora")
    assert teacher_key(config("+teacher.finetune.mode=lora", "+teacher.finetune.lora_rank=4"), items()) != \
        teacher_key(lora, items())


@pytest.mark.parametrize("override, fix", [
    ("+teacher.finetune.mode=half", "choose one of: full, lora"),
    ("+teacher.finetune.steps=3", "valid keys of teacher.finetune"),
    ("teacher.finetune.max_steps=null", "set one of them"),
    ("teacher.finetune.lr=0", "teacher.finetune.lr=0 is out of range"),
    ("teacher.finetune.batch_size=3", "multiple of grad_accum"),
    ("teacher.finetune=5", "neither null nor a mapping"),
])
def test_bad_finetune_values_are_named(override, fix):
    cfg = config(override, "+teacher.finetune.grad_accum=2") if "batch_size" in override else config(override)
    with pytest.raises(ConfigError, match=fix.replace("(", r"\(")):
        validate_teacher(cfg.teacher)


def test_one_finetuning_serves_every_method_and_seed_of_a_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_kdlab("+experiment=smoke", FT, "method=kd", "-m", "seed=1,2", f"output_dir={tmp_path}",
                     f"hydra.sweep.dir={sweep}")
    assert proc.stdout.count(TRAINED) == 1, proc.stdout[-3000:]
    later = run_kdlab("+experiment=smoke", FT, "method=sft", "seed=3", f"output_dir={tmp_path}",
                      f"hydra.run.dir={tmp_path / 'sft'}")
    assert TRAINED not in later.stdout and "teacher tiny fine-tuned:" in later.stdout
    rows = [results(p.parent)["eval"]["teacher"] for p in sorted(sweep.rglob("results.json"))]
    assert len(rows) == 2 and rows[0] == rows[1] == results(tmp_path / "sft")["eval"]["teacher"]


def test_concurrent_jobs_finetune_once(tmp_path):
    ft = FT.replace("max_steps:8", "max_steps:60")    # long enough for the second job to find it training
    procs = [subprocess.Popen([sys.executable, "-m", "kdlab.run", "+experiment=smoke", ft, f"method={m}",
                               f"output_dir={tmp_path}", f"hydra.run.dir={tmp_path / m}"],
                              cwd=ROOT, env=kdlab_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for m in ("kd", "sft")]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(o.count(TRAINED) for o in outs) == 1, outs
    assert results(tmp_path / "kd")["eval"]["teacher"] == results(tmp_path / "sft")["eval"]["teacher"]
    assert not list((tmp_path / "teachers").glob("*.work"))


def test_killed_finetuning_resumes_to_the_same_teacher(tmp_path):
    ft = FT.replace("max_steps:8", "max_steps:40")
    args = ["+experiment=smoke", ft, "method=sft", "train.max_steps=1", "eval.models=[teacher]"]
    run_kdlab(*args, f"output_dir={tmp_path / 'a'}", f"hydra.run.dir={tmp_path / 'a' / 'job'}")

    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "kdlab.run", *args, f"output_dir={out}",
                             f"hydra.run.dir={out / 'job'}"], cwd=ROOT, env=kdlab_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        pointers = list(out.glob("teachers/*.work/checkpoints/LAST"))
        if pointers and int(pointers[0].read_text().split("-")[1]) >= 12:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the fine-tuning finished before it could be killed"
    assert not list(out.glob("teachers/*/finetune.json"))       # nothing half-written is published

    resumed = run_kdlab(*args, f"output_dir={out}", f"hydra.run.dir={out / 'job'}")
    assert TRAINED in resumed.stdout
    a, b = published(tmp_path / "a"), published(out)
    assert a.name == b.name
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    steps = [json.loads(line)["step"] for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 40


def test_teacher_row_evaluates_the_published_teacher(tmp_path):
    args = ["+experiment=smoke", "method=sft", "train.max_steps=1", "eval.models=[teacher]"]
    run_kdlab(*args, FT.replace("max_steps:8", "max_steps:30"), f"output_dir={tmp_path}",
              f"hydra.run.dir={tmp_path / 'ft'}")
    folder = published(tmp_path)
    run_kdlab(*args, f"teacher.path={folder}", f"hydra.run.dir={tmp_path / 'loaded'}")
    run_kdlab(*args, f"hydra.run.dir={tmp_path / 'base'}")
    ft, loaded, base = (results(tmp_path / n)["eval"]["teacher"]["synthetic"] for n in ("ft", "loaded", "base"))
    assert ft == loaded
    assert ft["loss"] < base["loss"] - 0.3      # 30 steps of MLE at lr 3e-3 move the tiny teacher a lot


def test_lora_mode_publishes_the_merged_teacher(tmp_path):
    from kdlab.hardware import setup_runtime
    from kdlab.modeling import load_model
    from kdlab.data import prompt_template
    from kdlab.data import encode, load_splits
    from kdlab.teacher import load_teacher
    from kdlab.teacher.finetune import finetuned_teacher

    cfg = config("+teacher.finetune.mode=lora", f"output_dir={tmp_path}", "teacher.finetune.lr=1e-2")
    runtime = setup_runtime(cfg.hardware)
    teacher, tok = load_teacher(cfg.teacher, runtime.dtype)
    train = encode(load_splits(cfg.dataset, cfg.seed)["train"], tok, prompt_template(cfg), 320, 400)
    tuned = finetuned_teacher(cfg, runtime, teacher, tok, train)
    base = load_model(cfg.teacher, "teacher", torch.float32, len(tok)).state_dict()
    saved = load_file(published(tmp_path) / "model.safetensors")
    assert not any("lora" in k for k in saved) and set(saved) <= set(base)
    assert all(torch.equal(saved[k], tuned.state_dict()[k]) for k in saved)
    moved = {k for k in saved if not torch.equal(saved[k], base[k])}
    # the adapter sits on the attention's q and v projections; merging changes exactly those weights
    assert moved == {k for k in saved if k.endswith(("q_proj.weight", "v_proj.weight"))}
    assert not any(p.requires_grad for p in tuned.parameters()) and not tuned.training


def test_lora_mode_on_gpt2_adapts_only_the_q_and_v_columns_of_c_attn(tmp_path):
    """GPT-2 fuses q, k and v into c_attn (Conv1D weight [in, 3d]); the teacher's LoRA is OKD's q/v-only
    layer (kdlab.modeling.lora_config), so merging moves the q and v columns of every c_attn and nothing
    else: not k's columns, not the bias, not any other weight."""
    from kdlab.data import encode, load_splits, prompt_template
    from kdlab.hardware import setup_runtime
    from kdlab.modeling import load_model
    from kdlab.teacher import load_teacher
    from kdlab.teacher.finetune import finetuned_teacher

    cfg = config("teacher=tiny-gpt2", "student=tiny-gpt2", "+teacher.finetune.mode=lora", f"output_dir={tmp_path}",
                 "teacher.finetune.lr=1e-2")
    runtime = setup_runtime(cfg.hardware)
    teacher, tok = load_teacher(cfg.teacher, runtime.dtype)
    train = encode(load_splits(cfg.dataset, cfg.seed)["train"], tok, prompt_template(cfg), 320, 400)
    tuned = finetuned_teacher(cfg, runtime, teacher, tok, train).state_dict()
    base = load_model(cfg.teacher, "teacher", torch.float32, len(tok)).state_dict()
    moved = {k for k in base if not torch.equal(tuned[k], base[k])}
    c_attn = {k for k in base if k.endswith("attn.c_attn.weight")}
    assert moved == c_attn and len(c_attn) == 2
    d = cfg.teacher.random.hidden_size
    for k in c_attn:
        delta = (tuned[k] - base[k]).abs()
        assert delta[:, d:2 * d].max() == 0                                    # k: untouched
        assert delta[:, :d].amax(dim=0).min() > 0 and delta[:, 2 * d:].amax(dim=0).min() > 0   # q, v: every column
