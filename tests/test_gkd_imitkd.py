"""GKD and ImitKD on tiny models: losses against naive references on the same samples, lambda = 0 = KD,
no gradient through sampling, ImitKD's beta schedule and mixed batches, and short training runs."""
import math
import os

import pytest
import torch
from omegaconf import OmegaConf

from kdlab.data import collate, encode
from kdlab.data.synthetic import make_synthetic
from kdlab.divergences import build_divergence
from kdlab.divergences.reference import naive_loss
from kdlab.generation import generate, sample_student, to_batch
from kdlab.methods.base import Context
from kdlab.methods.gkd import GKD
from kdlab.methods.imitkd import ImitKD
from kdlab.methods.kd import KD
from kdlab.modeling import byte_tokenizer, random_model

TEACHER = dict(arch="llama", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_positions=256,
               seed=0)
STUDENT = dict(TEACHER, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=1)
TOK = byte_tokenizer()
SAMPLING = dict(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=6)


def items(split: str, n: int):
    # A short prompt template keeps the byte-level sequences short (alpaca's preamble is 100+ bytes).
    rows = make_synthetic(0, {"train": 16, "valid": 8, "test": 8})[split][:n]
    return [type(it)(TOK.encode(f"{ex['instruction']} {ex['input']}\n"), it.response_ids, ex)
            for it, ex in zip(encode(rows, TOK, "alpaca", 1000, 2000), rows)]


def make(cls, divergence="jsd", teacher=None, student=None, **cfg):
    teacher = teacher or random_model(TEACHER, 257).eval()
    student = student or random_model(STUDENT, 257)
    for p in teacher.parameters():
        p.requires_grad_(False)
    ctx = Context(teacher=teacher, student=student, tokenizer=TOK, divergence=build_divergence({"name": divergence}),
                  runtime=None, train_cfg=OmegaConf.create({"max_steps": 100}))
    dropout = {"disable_dropout": False} if "disable_dropout" in cls.schema else {}   # the random llama has none
    cfg = OmegaConf.create({"lr": 1e-3, **dropout, **cfg})
    cls.validate(cfg)
    return cls(cfg, ctx)


def reference_loss(method, batch, name):
    """The divergence straight from the definition on full (B, T, V) logits at the response positions."""
    s = method.student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    with torch.no_grad():
        t = method.teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return naive_loss(name, s[batch.response_mask], t[batch.response_mask])


def grads(model):
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def test_gkd_with_lambda_zero_is_kd_with_alpha_one():
    batch = collate(items("train", 4), TOK.pad_token_id)
    gkd = make(GKD, lmbda=0.0, normalize="token", **SAMPLING)
    kd = make(KD, teacher=gkd.teacher, student=gkd.student, alpha=1.0)
    a = gkd.loss(batch, 0)
    a.loss.backward()
    ga = grads(gkd.student)
    b = kd.loss(batch, 0)
    b.loss.backward()
    assert a.loss.item() == b.loss.item() and a.logs["on_policy"] == 0.0
    assert all(torch.equal(x, y) for x, y in zip(ga, grads(kd.student)))


def test_gkd_on_policy_loss_and_gradient_equal_the_reference_on_the_fixed_samples():
    """lambda = 1: the loss is the JSD on the student's own samples, and its gradient is that of the JSD
    on those samples held fixed, so nothing flows through the sampling."""
    batch = collate(items("train", 4), TOK.pad_token_id)
    gkd = make(GKD, lmbda=1.0, normalize="token", **SAMPLING)
    gkd.student.train()
    state = torch.get_rng_state()
    out = gkd.loss(batch, 0)
    out.loss.backward()
    g_method = grads(gkd.student)
    assert out.logs["on_policy"] == 1.0

    torch.set_rng_state(state)
    assert torch.rand(()) < 1.0   # the method's on-policy draw
    sampled = to_batch(generate(gkd.student, TOK, batch.prompt_ids, batch.prompt_mask, do_sample=True,
                                max_new_tokens=6), TOK.pad_token_id)
    assert not torch.equal(sampled.input_ids, batch.input_ids[:, :sampled.input_ids.shape[1]])
    ref = reference_loss(gkd, sampled, "jsd")
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    for x, y in zip(g_method, grads(gkd.student)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)
    assert out.logs["response_tokens"] == sampled.response_mask.sum().item()


def per_sequence_reference(method, batch, name):
    """GKD Eqs. 2-3 as loops in float64: (1/L_y) sum_n D per sequence, then the mean over sequences."""
    s = method.student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    with torch.no_grad():
        t = method.teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    per_seq = []
    for i in range(len(batch.input_ids)):
        rows = batch.response_mask[i].nonzero().squeeze(1)
        d = [naive_loss(name, s[i, n][None], t[i, n][None]) for n in rows.tolist()]
        per_seq.append(sum(d) / len(d))
    return sum(per_seq) / len(per_seq)


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_gkd_averages_each_sequence_then_the_sequences_by_default(lmbda):
    batch = collate(items("train", 4), TOK.pad_token_id)
    lengths = batch.response_mask.sum(1)
    assert len(set(lengths.tolist())) > 1          # unequal lengths: sequence and token means differ
    gkd = make(GKD, lmbda=lmbda, normalize="sequence", **SAMPLING)
    state = torch.get_rng_state()
    out = gkd.loss(batch, 0)
    out.loss.backward()
    got = grads(gkd.student)
    torch.set_rng_state(state)
    assert bool(torch.rand(()) < lmbda) == bool(out.logs["on_policy"])
    seen = batch if not lmbda else to_batch(generate(gkd.student, TOK, batch.prompt_ids, batch.prompt_mask,
                                                     do_sample=True, max_new_tokens=6), TOK.pad_token_id)
    ref = per_sequence_reference(gkd, seen, "jsd")
    ref.backward()
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-7)
    for x, y in zip(got, grads(gkd.student)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)
    if not lmbda:
        assert out.loss.item() != pytest.approx(reference_loss(gkd, batch, "jsd").item(), rel=1e-3)  # not the token mean


def test_gkd_with_trls_choices_is_trls_loss():
    """normalize=token is TRL's GKDTrainer loss: generalized_jsd_loss over the response labels ('batchmean')."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    pytest.importorskip("trl", reason="trl not installed")
    trl_gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer", reason="TRL without the experimental GKD trainer")
    batch = collate(items("train", 4), TOK.pad_token_id)
    gkd = make(GKD, lmbda=0.0, normalize="token", **dict(SAMPLING, temperature=0.9))
    out = gkd.loss(batch, 0)
    s = gkd.student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    with torch.no_grad():
        t = gkd.teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    # kdlab's labels are already the next tokens (TRL shifts its logits and labels by one to the same effect)
    trl = trl_gkd.GKDTrainer.generalized_jsd_loss(s, t, labels=batch.labels, beta=0.5)
    torch.testing.assert_close(out.loss, trl, rtol=1e-5, atol=1e-6)


def test_gkd_draws_on_policy_with_probability_lambda(monkeypatch):
    import kdlab.methods.gkd as gkd_module

    gkd = make(GKD, lmbda=0.3, normalize="token", **SAMPLING)
    monkeypatch.setattr(gkd_module, "sample_student", lambda student, tok, batch, **sampling: batch)
    monkeypatch.setattr(gkd, "logits", lambda model, batch: torch.zeros(1, 257))   # no model calls
    monkeypatch.setattr(gkd, "teacher_targets", lambda batch: torch.zeros(1, 257))
    batch = collate(items("train", 1), TOK.pad_token_id)
    torch.manual_seed(0)
    draws = [gkd.loss(batch, i).logs["on_policy"] for i in range(1000)]
    assert abs(sum(draws) / 1000 - 0.3) < 0.05   # 3.4 standard deviations


def test_imitkd_beta_schedules():
    exp = make(ImitKD, divergence="fkl", schedule="exponential", exp_base=200.0, decay_steps=None, **SAMPLING)
    assert exp.beta(0) == 1.0                      # decay_steps null -> train.max_steps = 100
    assert math.isclose(exp.beta(50), 200 ** -0.5) and math.isclose(exp.beta(100), 1 / 200)
    assert exp.beta(500) == exp.beta(100)
    lin = make(ImitKD, divergence="fkl", schedule="linear", exp_base=200.0, decay_steps=40, **SAMPLING)
    assert [lin.beta(s) for s in (0, 10, 40, 80)] == [1.0, 0.75, 0.0, 0.0]


def test_imitkd_mixes_gold_and_student_rows_and_queries_the_teacher_on_them():
    batch = collate(items("train", 4), TOK.pad_token_id)
    imit = make(ImitKD, divergence="fkl", schedule="exponential", exp_base=200.0, decay_steps=10, **SAMPLING)
    flags = torch.tensor([True, False, True, False])
    torch.manual_seed(1)
    mixed = sample_student(imit.student, TOK, batch, rows=flags, **SAMPLING)
    torch.manual_seed(1)
    sampled = generate(imit.student, TOK, batch.prompt_ids[flags], batch.prompt_mask[flags], do_sample=True,
                       max_new_tokens=6)
    for row, (from_student, k) in enumerate(zip(flags.tolist(), [0, None, 1, None])):
        n = int(mixed.attention_mask[row].sum())
        prompt = batch.prompt_ids[row][batch.prompt_mask[row].bool()].tolist()
        if from_student:
            response = sampled.response_ids[k][sampled.response_mask[k].bool()].tolist()
        else:
            response = batch.labels[row][batch.response_mask[row]].tolist()
        assert mixed.input_ids[row, :n].tolist() == prompt + response
        assert mixed.labels[row][mixed.response_mask[row]].tolist() == response
    assert mixed.examples == batch.examples

    # beta = 1 at step 0: all gold, the loss is forward KL on the data (= KD with alpha 1)
    out = imit.loss(batch, 0)
    assert out.logs["student_fraction"] == 0.0 and out.logs["beta"] == 1.0
    torch.testing.assert_close(out.loss, reference_loss(imit, batch, "fkl"), rtol=1e-5, atol=1e-6)
    # and the loss on a mixed batch is forward KL on the mixed sequences (teacher on student prefixes)
    state = torch.get_rng_state()
    out = imit.loss(batch, 10)                      # beta = 1/200
    torch.set_rng_state(state)
    flags = torch.rand(4) >= 1 / 200
    ref = reference_loss(imit, sample_student(imit.student, TOK, batch, rows=flags, **SAMPLING), "fkl")
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)


def test_imitkd_decays_over_the_whole_run_when_training_by_epochs():
    """decay_steps null and train.max_steps null: I is train.epochs x the steps per epoch (the trainer's count,
    run_steps), known from the training examples; beta(I) is the schedule's end."""
    from kdlab.trainer import run_steps

    method = make(ImitKD, divergence="fkl", schedule="linear", exp_base=200.0, decay_steps=5, **SAMPLING)
    train_cfg = OmegaConf.create({"max_steps": None, "epochs": 3, "batch_size": 4})
    imit = ImitKD(OmegaConf.create({**method.cfg, "decay_steps": None}),
                  Context(**{**vars(method.ctx), "train_cfg": train_cfg}))
    train = items("train", 10)
    assert imit.prepare_data(train) is train
    assert imit.decay_steps == 3 * (10 // 4) == run_steps(train_cfg, 10)
    assert imit.beta(0) == 1.0 and imit.beta(3) == pytest.approx(0.5) and imit.beta(6) == 0.0


@pytest.mark.parametrize("cls,extra", [(GKD, {"lmbda": 1.0, "normalize": "sequence"}),
                                       (ImitKD, {"schedule": "linear", "exp_base": 200.0, "decay_steps": 12})])
def test_training_lowers_the_divergence_to_the_teacher_on_held_out_prompts(cls, extra):
    torch.manual_seed(0)
    method = make(cls, divergence="fkl", **extra, **dict(SAMPLING, max_new_tokens=8))
    held_out = collate(items("test", 8), TOK.pad_token_id)

    def divergence():
        with torch.no_grad():
            return reference_loss(method, held_out, "fkl").item()

    before = divergence()
    opt = torch.optim.AdamW(method.student.parameters(), lr=1e-2)
    train = items("train", 16)
    for step in range(12):
        out = method.loss(collate(train[(4 * step) % 16:(4 * step) % 16 + 4], TOK.pad_token_id), step)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert divergence() < 0.7 * before, (before, divergence())


@pytest.mark.parametrize("name, default", [("gkd", True), ("imitkd", False), ("dpkd", False)])
@pytest.mark.parametrize("override", [None, True, False])
def test_dropout_is_off_where_the_reference_implementation_turns_it_off(name, default, override):
    """GKD: TRL's GKDTrainer and DistillationTrainer default to disable_dropout=True; ImitKD's released code
    samples in eval mode but updates in train mode (dropout on), as does DPKD's (LMOps dpkd, model.train()).
    On a GPT-2 student (dropout 0.1) in training mode, dropout off makes the training forward the
    deterministic eval-mode one."""
    from conftest import conf_option
    from kdlab.methods import method_class
    from kdlab.student import build_student
    from kdlab.teacher import load_teacher

    teacher, tok = load_teacher(conf_option("teacher", "tiny-gpt2"), torch.float32)
    student = build_student(conf_option("student", "tiny-gpt2"), teacher, tok, "tiny-gpt2", torch.float32)[0]
    cfg = conf_option("method", name)   # as a job composes it
    assert cfg.disable_dropout == default
    if override is not None:
        cfg.disable_dropout = override
    method_class(name).validate(cfg)
    method_class(name)(cfg, Context(teacher, student, tok, build_divergence({"name": "fkl"}), None,
                                    OmegaConf.create({"max_steps": 100})))
    off = default if override is None else override
    rates = {m.p for m in student.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == ({0.0} if off else {0.1})
    ids = torch.randint(0, len(tok), (2, 12))
    assert student.training
    with torch.no_grad():
        same = torch.equal(student(ids).logits, student(ids).logits)
    assert same == off
