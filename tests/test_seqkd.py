"""SeqKD (kdlab/methods/seqkd.py): the teacher's greedy responses replace the gold ones, generated once
and cached on disk by teacher, data and generation config; and both kd and seqkd bring a tiny student
closer to the teacher on held-out data."""
import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import run_kdlab
from kdlab.data import collate
from kdlab.divergences import build_divergence
from kdlab.methods.seqkd import SeqKD
from kdlab.cli import CONF_DIR
from test_teacher_cache import V, context, kd_method, synthetic_items, tiny_student, tiny_teacher  # noqa: F401


def seqkd_cfg(tmp_path, *overrides):
    """conf/method/seqkd.yaml as a smoke run composes it (the teacher and dataset filled in)."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=smoke", "method=seqkd", f"output_dir={tmp_path}",
                                           "method.generation.max_new_tokens=6", "method.generation.batch_size=4",
                                           "method.lr=1e-2", *overrides])
    SeqKD.validate(cfg.method)
    return cfg.method


@pytest.fixture(scope="module")
def setup():
    from kdlab.modeling import byte_tokenizer

    tok = byte_tokenizer()
    return tok, tiny_teacher(), synthetic_items(tok)


@pytest.fixture
def calls(monkeypatch):
    """Counts kdlab.generation.generate calls made by SeqKD (through its live teacher)."""
    import kdlab.generation as generation

    count = []
    real = generation.generate
    monkeypatch.setattr(generation, "generate", lambda *a, **k: count.append(1) or real(*a, **k))
    return count


@torch.no_grad()
def reference_response(teacher, tok, prompt, max_new_tokens, max_length):
    """Greedy decoding the slow way: full forward of the whole sequence per token, no cache, no batch."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        ids.append(int(teacher(torch.tensor([ids])).logits[0, -1, :V].argmax()))
        if ids[-1] == tok.eos_token_id:
            break
    return ids[len(prompt):][: max_length - len(prompt)]


def test_gold_responses_are_replaced_by_the_teachers_greedy_ones(setup, tmp_path):
    tok, teacher, items = setup
    items = items[:6]
    # a length limit that cuts the longest prompts' responses short (to 2 tokens)
    limit = max(len(it.prompt_ids) for it in items) + 2
    cfg = seqkd_cfg(tmp_path, f"dataset.max_length={limit}")
    prepared = SeqKD(cfg, context(teacher, tiny_student(), tok)).prepare_data(items)
    assert [p.prompt_ids for p in prepared] == [it.prompt_ids for it in items]
    assert [p.example for p in prepared] == [it.example for it in items]
    for it, p in zip(items, prepared):
        assert p.response_ids == reference_response(teacher, tok, it.prompt_ids, 6, limit)
    assert any(len(p.response_ids) == 2 for p in prepared) and any(len(p.response_ids) == 6 for p in prepared)
    assert any(p.response_ids != it.response_ids for it, p in zip(items, prepared))


def test_responses_are_cached_by_teacher_data_and_generation_config(setup, tmp_path, calls):
    tok, teacher, items = setup
    items = items[:4]

    def prepare(*overrides, data=items):
        return SeqKD(seqkd_cfg(tmp_path, *overrides), context(teacher, tiny_student(), tok)).prepare_data(data)

    first = prepare()
    assert len(calls) == 1
    [folder] = (tmp_path / "cache" / "seqkd").iterdir()
    lines = [json.loads(l) for l in (folder / "responses.jsonl").read_text().splitlines()]
    assert sorted(l["prompt_ids"] for l in lines) == sorted(it.prompt_ids for it in items)

    again = prepare("seed=3")                    # another training seed (and job): the cache is reused
    assert len(calls) == 1 and [a.response_ids for a in again] == [f.response_ids for f in first]
    prepare("method.generation.batch_size=2")    # the batch size is not part of the key
    assert len(calls) == 1

    prepare("method.generation.max_new_tokens=3")
    prepare("method.generation.do_sample=true")
    prepare("teacher.random.seed=5")
    prepare(data=items[1:])
    assert len(calls) == 5 and len(list((tmp_path / "cache" / "seqkd").iterdir())) == 5


def test_a_crashed_generation_leaves_no_cache_behind(setup, tmp_path, monkeypatch):
    import kdlab.generation as generation

    tok, teacher, items = setup
    monkeypatch.setattr(generation, "generate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):
        SeqKD(seqkd_cfg(tmp_path), context(teacher, tiny_student(), tok)).prepare_data(items[:4])
    assert not (tmp_path / "cache" / "seqkd").exists() or not list((tmp_path / "cache" / "seqkd").iterdir())


@torch.no_grad()
def divergence_to_teacher(teacher, student, tok, items) -> float:
    """Forward KL(p_teacher || q_student) per response token, teacher forcing on ``items``."""
    fkl, batch = build_divergence({"name": "fkl"}), collate(items, tok.pad_token_id)
    logits = [m(batch.input_ids, attention_mask=batch.attention_mask).logits[batch.response_mask][:, :V]
              for m in (teacher, student)]
    return float(fkl(logits[1], logits[0]))


@pytest.mark.parametrize("name", ["kd", "seqkd"])
def test_training_brings_the_student_closer_to_the_teacher_on_held_out_data(setup, tmp_path, name):
    tok, teacher, train = setup
    held_out = synthetic_items(tok, "valid")
    student = tiny_student()
    if name == "kd":
        method, lr = kd_method(context(teacher, student, tok), alpha=1.0), 1e-2
    else:
        # hard argmax targets overshoot a soft teacher quickly: a lower learning rate
        method, lr = SeqKD(seqkd_cfg(tmp_path), context(teacher, student, tok)), 3e-3
        train = method.prepare_data(train)
        held_out = method.prepare_data(held_out)    # held-out prompts, the teacher's responses
    before = divergence_to_teacher(teacher, student, tok, held_out)
    opt = torch.optim.AdamW(student.parameters(), lr=lr)
    for step in range(24):
        start = 4 * step % len(train)
        method.loss(collate(train[start: start + 4], tok.pad_token_id), step).loss.backward()
        opt.step()
        opt.zero_grad()
    after = divergence_to_teacher(teacher, student, tok, held_out)
    assert after < 0.7 * before, (before, after)


def test_seqkd_jobs_share_the_teachers_responses(tmp_path):
    proc = run_kdlab("-m", "seed=1,2", "+experiment=smoke", "method=seqkd", "dataset.sizes.train=8",
                     "method.generation.max_new_tokens=4", "train.max_steps=2", "train.eval_every=null",
                     "train.save_every=null", "eval.models=[student]", "eval.test_examples=2",
                     "hardware.num_threads=1", f"output_dir={tmp_path}")
    [responses] = (tmp_path / "cache" / "seqkd").glob("*/responses.jsonl")
    assert len(responses.read_text().splitlines()) == 8
    assert proc.stdout.count("wrote the teacher's responses") == 1
    assert proc.stdout.count("reusing the teacher's responses") == 1
    assert len(list(tmp_path.rglob("results.json"))) == 2


def test_beam_sampling_is_refused_with_the_fix():
    from kdlab.config import ConfigError

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["method=seqkd", "method.generation.do_sample=true"])
        SeqKD.validate(cfg.method)
        cfg = compose("config", overrides=["method=seqkd", "method.generation.do_sample=true",
                                           "method.generation.num_beams=5"])
    with pytest.raises(ConfigError, match="do_sample=true with num_beams=5: beam sampling is not supported; set "
                                          "num_beams=1 to sample or do_sample=false"):
        SeqKD.validate(cfg.method)
