"""DPKD: preference forms, length normalisation, both levels against hand computations, the teacher
cache, and training on the synthetic set."""
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kdlab import generation
from kdlab.methods import dpkd
from conftest import ROOT, conf_option, response_log_softmax, tiny_method
from conftest import first_batch as shared_first_batch
from kdlab.data import batches, encode, load_splits
from kdlab.generation import Generated, generate, response_mask
from kdlab.methods.base import per_sequence_mean
from kdlab.methods.dpkd import PREFERENCES, PreferenceScores, preference_loss
from kdlab.student import build_student
from kdlab.teacher import load_teacher



@pytest.fixture(scope="module")
def setup():
    teacher, tok = load_teacher(conf_option("teacher", "tiny"), torch.float32)
    student, tok = build_student(conf_option("student", "tiny"), teacher, tok, "tiny", torch.float32)
    data = OmegaConf.load(ROOT / "conf/dataset/synthetic.yaml")
    data.sizes = {"train": 32, "valid": 8, "test": 8}
    enc = {k: encode(v, tok, "alpaca", 320, 400) for k, v in load_splits(data, 1).items()}
    # a peaked teacher with its own argmaxes: random models with tied embeddings all predict "repeat the
    # input token", so teacher and student argmaxes would agree everywhere (no token-level signal)
    with torch.no_grad():
        teacher.model.norm.weight.copy_(6 * torch.randn(teacher.model.norm.weight.shape,
                                                        generator=torch.Generator().manual_seed(0)))
    return teacher, student, tok, enc


def make_method(setup, **overrides):
    return tiny_method("dpkd", setup, **overrides)


def first_batch(setup, size=2, split="train"):
    return shared_first_batch(setup, size, split)


def softplus(x):
    return math.log1p(math.exp(x))


def test_each_preference_form_against_its_formula():
    cq, rq, cp, rp = (torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.0))
    h = (-1.0 + 1.5) - (-2.0 + 1.0)  # 1.5
    beta = 0.1
    expected = {"dpkd": softplus(-beta * h), "ipo": (h - 1 / (2 * beta)) ** 2,
                "cpo": softplus(-beta * (-1.0 + 2.0)) + 1.0, "simpo": softplus(-(beta * 1.0 - 0.5))}
    for form in PREFERENCES:
        got = preference_loss(form, PreferenceScores(cq, rq, cp, rp), beta, gamma=0.5).item()
        assert got == pytest.approx(expected[form], rel=1e-6), form


@pytest.mark.parametrize("form", PREFERENCES)
def test_loss_falls_as_teacher_outputs_gain_likelihood_over_own_samples(form):
    gain = torch.linspace(-1.0, 1.0, 9)  # student log-likelihood of y_t rises, of y_s falls by as much
    loss = preference_loss(form, PreferenceScores(-2.0 + gain, -2.0 - gain, torch.tensor(-2.0), torch.tensor(-2.0)), 0.1, 0.5)
    assert (loss[1:] < loss[:-1]).all(), loss


def test_length_normalisation_is_a_per_sequence_mean():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    values = torch.tensor([-1.0, -2.0, -3.0, -4.0, -1.0, -1.0, -1.0, -1.0])
    torch.testing.assert_close(per_sequence_mean(values, mask), torch.tensor([-2.0, -4.0, -1.0]))
    # a response twice as long with the same per-token log-probs scores the same
    long, short = torch.ones(1, 6, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool)
    assert per_sequence_mean(torch.full((6,), -0.7), long) == per_sequence_mean(torch.full((3,), -0.7), short)


def fixed_generation(responses, pad):
    """A stand-in for ``generate``: returns fixed responses (by role) for the prompts it is given."""
    def fake(model, tok, prompt_ids, prompt_mask, *, max_new_tokens, do_sample=False, **kw):
        rows = responses["student" if do_sample else "teacher"][: len(prompt_ids)]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        return Generated(prompt_ids, prompt_mask, ids, response_mask(ids, tok.eos_token_id))
    return fake


def seq_logprob(model, prompt, response, vocab):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1: -1, :vocab]
    lp = F.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None]).squeeze(1)
    return lp.mean().item(), logits


@pytest.mark.parametrize("form", PREFERENCES)
def test_sequence_level_loss_matches_a_hand_computation(setup, monkeypatch, form):
    teacher, student, tok, _ = setup
    eos = tok.eos_token_id
    responses = {"teacher": [[72, 105, eos], [79, eos]], "student": [[120, 121, 122, 123], [65, eos]]}
    fake = fixed_generation(responses, tok.pad_token_id)
    monkeypatch.setattr(generation, "generate", fake)   # the teacher's responses and the student's samples
    method = make_method(setup, preference=form, beta=0.3, kd_ratio=0.7, lm_coef=0.4)
    batch = first_batch(setup)
    out = method.loss(batch, 0)

    prefs, rkls = [], []
    for i in range(len(batch)):
        prompt = batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist()
        cq, _ = seq_logprob(student, prompt, responses["teacher"][i], len(tok))
        cp, _ = seq_logprob(teacher, prompt, responses["teacher"][i], len(tok))
        rq, s_logits = seq_logprob(student, prompt, responses["student"][i], len(tok))
        rp, t_logits = seq_logprob(teacher, prompt, responses["student"][i], len(tok))
        h = (cq - cp) - (rq - rp)
        prefs.append({"dpkd": softplus(-0.3 * h), "ipo": (h - 1 / 0.6) ** 2,
                      "cpo": softplus(-0.3 * (cq - rq)) - cq, "simpo": softplus(-(0.3 * (cq - rq) - 0.5))}[form])
        logq, logp = F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1)
        rkls += (logq.exp() * (logq - logp)).sum(-1).tolist()
    with torch.no_grad():
        logits = student(batch.input_ids, attention_mask=batch.attention_mask).logits[..., :len(tok)]
        nll = F.cross_entropy(logits[batch.response_mask], batch.labels[batch.response_mask]).item()
    pref = sum(prefs) / len(prefs)
    assert out.logs["preference"] == pytest.approx(pref, rel=1e-4)
    assert out.loss.item() == pytest.approx(0.7 * pref + 0.4 * nll, rel=1e-4)
    assert out.logs["rkl"] == pytest.approx(sum(rkls) / len(rkls), rel=1e-4)


def test_token_level_loss_uses_argmax_tokens(setup):
    teacher, student, tok, _ = setup
    batch = first_batch(setup)
    out = make_method(setup, level="token", beta=0.5).loss(batch, 0)
    with torch.no_grad():
        s = F.log_softmax(student(batch.input_ids, attention_mask=batch.attention_mask).logits[..., :len(tok)], -1)
        t = F.log_softmax(teacher(batch.input_ids, attention_mask=batch.attention_mask).logits[..., :len(tok)], -1)
    s, t = s[batch.response_mask], t[batch.response_mask]
    terms = []
    for sq, tp in zip(s, t):
        a, b = tp.argmax().item(), sq.argmax().item()
        terms.append(softplus(-0.5 * ((sq[a] - tp[a]) - (sq[b] - tp[b])).item()))
    nll = -s.gather(1, batch.labels[batch.response_mask][:, None]).mean().item()
    assert out.logs["preference"] == pytest.approx(sum(terms) / len(terms), rel=1e-4)
    assert out.loss.item() == pytest.approx(0.5 * sum(terms) / len(terms) + 0.5 * nll, rel=1e-4)


def test_teacher_responses_are_generated_once_per_prompt_and_saved(setup, monkeypatch):
    calls = []
    real = generation.generate

    def spy(model, *args, **kwargs):
        calls.append((model is setup[0], len(args[1])))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(generation, "generate", spy)   # the teacher's responses and the student's samples
    method = make_method(setup, max_new_tokens=4)
    batch = first_batch(setup)
    method.loss(batch, 0)
    method.loss(batch, 1)
    assert [c for c in calls if c[0]] == [(True, 2)]            # the teacher ran once, on both prompts
    assert sum(not c[0] for c in calls) == 2                    # the student samples every step
    again = make_method(setup, max_new_tokens=4)
    again.load_state_dict(method.state_dict())
    calls.clear()
    again.loss(batch, 2)
    assert not any(c[0] for c in calls)
    assert make_method(setup, chosen="gold").state_dict() == {"teacher_responses": {}}


def heldout_teacher_nll(student, teacher, tok, batch) -> float:
    """The student's per-token NLL of the teacher's greedy responses to held-out prompts: a sequence-level
    cross-entropy to the teacher, the quantity DPKD's chosen side raises."""
    g = generate(teacher, tok, batch.prompt_ids, batch.prompt_mask, max_new_tokens=12)
    total, count = 0.0, 0
    for (logq,), r in response_log_softmax([student], g, len(tok)):
        total -= logq.gather(1, r[:, None]).sum().item()
        count += len(r)
    return total / count


def train(setup, steps, **overrides):
    teacher, _, tok, enc = setup
    student = build_student(conf_option("student", "tiny"), teacher, tok, "tiny", torch.float32)[0]
    method = make_method((teacher, student, tok, enc), max_new_tokens=12, lm_coef=0.0, kd_ratio=1.0, **overrides)
    opt = torch.optim.AdamW(method.param_groups()["student"].params, lr=1e-2)
    torch.manual_seed(0)
    data = batches(enc["train"], 8, tok.pad_token_id, seed=0)
    for step in range(steps):
        method.loss(next(data)[2], step).loss.backward()
        opt.step()
        opt.zero_grad()
    return student


def test_sequence_level_training_raises_the_likelihood_of_teacher_outputs_on_held_out_prompts(setup):
    teacher, student, tok, _ = setup
    held_out = first_batch(setup, size=8, split="valid")
    before = heldout_teacher_nll(student, teacher, tok, held_out)
    after = heldout_teacher_nll(train(setup, 16, level="sequence"), teacher, tok, held_out)
    assert after < 0.5 * before, (before, after)


def top1_agreement(student, teacher, batch) -> float:
    with torch.no_grad():
        s = student(batch.input_ids, attention_mask=batch.attention_mask).logits[batch.response_mask]
        t = teacher(batch.input_ids, attention_mask=batch.attention_mask).logits[batch.response_mask]
    return (s.argmax(-1) == t.argmax(-1)).float().mean().item()


def test_token_level_training_raises_argmax_agreement_on_held_out_prompts(setup):
    teacher, student, _, _ = setup
    held_out = first_batch(setup, size=8, split="valid")
    before = top1_agreement(student, teacher, held_out)
    after = top1_agreement(train(setup, 16, level="token"), teacher, held_out)
    assert after > before + 0.2, (before, after)
