"""MiniLLM: importance weights, clipping, advantages, the loss on fixed rollouts, state, training, and
the pre-training (PTX) corpus."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kdlab.methods import minillm
from conftest import ROOT, conf_option, response_log_softmax, tiny_method
from conftest import first_batch as shared_first_batch
from kdlab.config import ConfigError
from kdlab.data import batches, encode, load_splits
from kdlab.data.corpus import pack_corpus
from kdlab.generation import generate
from kdlab.methods.minillm import advantages, clipped_surrogate, mixture_weights, whiten
from kdlab.student import build_student
from kdlab.teacher import load_teacher



@pytest.fixture(scope="module")
def setup():
    teacher, tok = load_teacher(conf_option("teacher", "tiny"), torch.float32)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(6.0)  # a peaked teacher, far from the random student
    student, tok = build_student(conf_option("student", "tiny"), teacher, tok, "tiny", torch.float32)
    data = OmegaConf.load(ROOT / "conf/dataset/synthetic.yaml")
    data.sizes = {"train": 48, "valid": 8, "test": 8}
    splits = load_splits(data, 1)
    enc = {k: encode(v, tok, "alpaca", 320, 400) for k, v in splits.items()}
    return teacher, student, tok, enc


def make_method(setup, **overrides):
    return tiny_method("minillm", setup, **overrides)


def first_batch(setup, size=4, split="train"):
    return shared_first_batch(setup, size, split)


def test_importance_weight_is_q_over_the_mixture():
    q = torch.tensor([0.5, 0.1, 0.9, 1e-4])
    p = torch.tensor([0.5, 0.6, 0.05, 0.3])
    for alpha in (0.0, 0.2, 1.0):
        w = mixture_weights(q.log(), p.log(), alpha)
        torch.testing.assert_close(w, q / ((1 - alpha) * q + alpha * p))
    assert mixture_weights(q.log(), p.log(), 0.2)[0] == 1.0  # p == q: plain on-policy sample


def test_ratio_clipping_on_constructed_ratios():
    # at theta = theta_old the clipped ratio rho = q_theta / p~ is the importance weight itself
    weights = torch.tensor([0.5, 1.0, 1.5, 0.5, 1.0, 1.5])
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    new = torch.zeros(6, requires_grad=True)
    loss, clipped = clipped_surrogate(new, torch.zeros(6), adv, weights, eps=0.2)
    # A > 0: min(rho, clip(rho)) caps the gain at 1.2; A < 0: the penalty is floored at 0.8
    torch.testing.assert_close(loss, -torch.tensor([0.5, 1.0, 1.2, -0.8, -1.0, -1.5]))
    assert clipped.tolist() == [False, False, True, True, False, False]
    loss.sum().backward()
    # clipped entries pass no gradient; the others d/dlog q (-rho A) = -rho A
    torch.testing.assert_close(new.grad, torch.tensor([-0.5, -1.0, 0.0, 0.0, 1.0, 1.5]))


def test_the_importance_weight_is_inside_the_clip():
    """MiniLLM Alg. 1 clips rho_t = q_theta / p~ = exp(log q_theta - log q_old) * w_t: a token with w_t = 0.5
    and A_t < 0 is clipped already at rho_old = 1 (0.5 < 1 - eps) and gets no gradient."""
    logprobs = torch.full((2,), -2.0, requires_grad=True)
    loss, clipped = clipped_surrogate(logprobs, logprobs.detach(), torch.tensor([-1.0, 1.0]),
                                      torch.tensor([0.5, 0.5]), eps=0.2)
    loss.sum().backward()
    assert logprobs.grad[0].item() == 0.0 and clipped.tolist() == [True, False]
    assert logprobs.grad[1].item() == pytest.approx(-0.5)      # A > 0, rho = 0.5: unclipped, -rho A


def test_rewards_are_divided_by_reward_scale(setup, monkeypatch):
    """LMOps divides the reward by reward_scaling (0.5 doubles it), then clips it."""
    seen = []
    real = minillm.sample_mixture

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(minillm, "sample_mixture", spy)
    method = make_method(setup, rollouts=4, max_new_tokens=5, sft_steps=0, reward_scale=0.5, reward_clip=1.5)
    batch = first_batch(setup, size=4)
    method.remember(batch)
    method.refill(4, batch.input_ids.device)
    (g,) = seen
    for i, r in enumerate(method.buffer):
        n = len(r["reward"])
        expected = ((g.teacher_logprobs[i, :n] - g.student_logprobs[i, :n]) * 2.0).clamp(-1.5, 1.5)
        torch.testing.assert_close(r["reward"], expected)
    assert any((r["reward"].abs() == 1.5).any() for r in method.buffer)   # the clip acts after the scaling


def slow_advantages(rewards, lengths, gamma, length_norm, from_next):
    out = torch.zeros_like(rewards)
    for b, n in enumerate(lengths):
        for t in range(n):
            start = t + 1 if from_next else t
            terms = [gamma ** (k - start) * rewards[b, k].item() for k in range(start, n)]
            total = sum(terms)
            if length_norm:
                total = total / len(terms) if terms else 0.0
            out[b, t] = total
    return out


@pytest.mark.parametrize("length_norm", [True, False])
@pytest.mark.parametrize("from_next", [True, False])
def test_advantages_match_a_slow_loop(length_norm, from_next):
    torch.manual_seed(0)
    lengths = [5, 1, 3]
    rewards = torch.randn(3, 5)
    mask = (torch.arange(5)[None] < torch.tensor(lengths)[:, None]).float()
    got = advantages(rewards, mask, 0.95, length_norm, from_next)
    torch.testing.assert_close(got, slow_advantages(rewards, lengths, 0.95, length_norm, from_next))


def test_whitening():
    x = torch.tensor([1.0, 2.0, 3.0, 10.0])
    w = whiten(x)
    assert abs(w.mean().item()) < 1e-6 and abs(w.std().item() - 1) < 1e-5
    torch.testing.assert_close(w, (x - x.mean()) / x.std(), atol=1e-6, rtol=1e-5)


def test_rollouts_use_teacher_mixed_sampling_with_the_configured_alpha(setup, monkeypatch):
    seen = []
    real = minillm.sample_mixture

    def spy(*args, **kwargs):
        seen.append((kwargs["alpha"], kwargs["temperature"], kwargs["top_k"], kwargs["top_p"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(minillm, "sample_mixture", spy)
    method = make_method(setup, alpha=0.37, max_new_tokens=4, sft_steps=0)
    method.loss(first_batch(setup), 0)
    assert seen and all(s == (0.37, 1.0, 0, 1.0) for s in seen)


def test_phases_sft_then_policy_optimisation(setup):
    assert [p.name for p in make_method(setup).phases()] == ["sft", "minillm"]
    assert make_method(setup).phases()[0].max_steps is None          # null: the run's length
    assert make_method(setup, sft_steps=7).phases()[0].max_steps == 7
    assert [p.name for p in make_method(setup, sft_steps=0).phases()] == ["minillm"]
    assert make_method(setup, sft_lr=0.123).phases()[0].method.param_groups()["student"].lr == 0.123


def test_buffer_refill_schedule_and_ramp_up(setup):
    method = make_method(setup, rollouts=6, ppo_epochs=3, max_new_tokens=3, sft_steps=0, ptx_weight=0.0)
    data = batches(setup[3]["train"], 2, setup[2].pad_token_id, seed=0)
    method.loss(next(data)[2], 0)
    assert len(method.buffer) == 2 and len(method.schedule) == 3 - 1      # 3 epochs x 1 minibatch, one used
    method.loss(next(data)[2], 1)
    method.loss(next(data)[2], 2)
    assert len(method.buffer) == 2                                      # not refilled while the schedule lasts
    method.loss(next(data)[2], 3)                                       # pool now holds 8 prompts, capped at 6
    assert len(method.buffer) == 6 and len(method.schedule) == 3 * 3 - 1
    assert all(len(r["response"]) <= 3 for r in method.buffer)


def test_loss_on_fixed_rollouts_matches_a_hand_computation(setup):
    teacher, student, tok, _ = setup
    method = make_method(setup, sft_steps=0, ptx_weight=0.5, ptx_source="gold", ptx_kd_ratio=0.0, alpha=0.2,
                         clip_ratio=0.2)
    prompts = [[65, 66, 67], [68, 69]]
    responses = [[70, 71, 72], [73]]
    rollouts = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(r)
        rollouts.append({"prompt": torch.tensor(p), "response": torch.tensor(r),
                         "old_logprobs": torch.linspace(-5.0, -5.5 - i, n), "weight": torch.linspace(0.8, 1.2, n),
                         "advantage": torch.linspace(-1.0, 1.0 + i, n), "reward": torch.zeros(n)})
    method.buffer, method.schedule = rollouts, [[1, 0]]
    batch = first_batch(setup, size=2)
    out = method.loss(batch, 0)

    expected_terms = []
    for r in (rollouts[1], rollouts[0]):
        ids = torch.cat([r["prompt"], r["response"]])[None]
        n, P = len(r["response"]), len(r["prompt"])
        with torch.no_grad():
            logq = F.log_softmax(student(ids).logits[0, P - 1: P - 1 + n, :len(tok)], -1)
            logp = F.log_softmax(teacher(ids).logits[0, P - 1: P - 1 + n, :len(tok)], -1)
        for t in range(n):
            lq = logq[t, r["response"][t]].item()
            a, w = r["advantage"][t].item(), r["weight"][t].item()
            rho = math.exp(lq - r["old_logprobs"][t].item()) * w        # q_theta / p~
            pg = -min(rho * a, min(max(rho, 0.8), 1.2) * a)
            kl = (logq[t].exp() * (logq[t] - logp[t])).sum().item()
            expected_terms.append(pg + w * kl)
    with torch.no_grad():
        logits = student(batch.input_ids, attention_mask=batch.attention_mask).logits[..., :len(tok)]
        ptx = F.cross_entropy(logits[batch.response_mask], batch.labels[batch.response_mask]).item()
    expected = sum(expected_terms) / len(expected_terms) + 0.5 * ptx
    assert out.loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert out.logs["ptx"] == pytest.approx(ptx, rel=1e-4)


def alg1_reference(student_old, student, teacher, buffer, vocab, alpha, eps, gamma, scale, clip):
    """MiniLLM Alg. 1 on a rollout buffer from its sequences alone, in float64 on full log-softmaxes:
    p~ = alpha p + (1 - alpha) q_old (Eq. 4), w_t = q_old / p~, r_t = clip((log p - log q_old) / scale),
    A_t = R^Norm_{t+1} (Eq. 6) whitened over the buffer, rho_t = q_theta / p~; the mean over tokens of
    -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + w_t sum_v q(v) log(q(v) / p(v))."""
    rows = []
    for r in buffer:
        ids = torch.cat([r["prompt"], r["response"]])[None]
        P, y = len(r["prompt"]), r["response"]
        n = len(y)
        with torch.no_grad():
            logq_old, logp = (F.log_softmax(m(ids).logits[0, P - 1: P - 1 + n, :vocab], -1) for m in (student_old, teacher))
        logq = F.log_softmax(student(ids).logits[0, P - 1: P - 1 + n, :vocab], -1)
        q_old_y, p_y = logq_old[range(n), y].exp(), logp[range(n), y].exp()
        p_mix = alpha * p_y + (1 - alpha) * q_old_y
        rew = ((p_y.log() - q_old_y.log()) / scale).clamp(-clip, clip)
        ret = torch.zeros(n, dtype=torch.float64)
        for t in range(n - 1):
            ret[t] = sum(gamma ** (k - t - 1) * rew[k] for k in range(t + 1, n)) / (n - t - 1)
        rows.append((logq, logp, y, p_mix, q_old_y / p_mix, ret))
    adv = torch.cat([row[-1] for row in rows])
    adv = ((adv - adv.mean()) / (adv.std() + 1e-8)).split([len(row[-1]) for row in rows])
    terms = []
    for (logq, logp, y, p_mix, w, _), a in zip(rows, adv):
        for t in range(len(y)):
            rho = logq[t, y[t]].exp() / p_mix[t]
            long_term = -torch.min(rho * a[t], rho.clamp(1 - eps, 1 + eps) * a[t])
            single = w[t] * (logq[t].exp() * (logq[t] - logp[t])).sum()
            terms.append(long_term + single)
    return torch.stack(terms).mean(), torch.cat([row[4] for row in rows])


def test_loss_and_gradient_equal_a_float64_reference_written_from_alg1(setup):
    teacher, shared_student, tok, enc = setup
    student = copy.deepcopy(shared_student)
    cfg = dict(alpha=0.2, clip_ratio=0.2, gamma=0.95, reward_scale=0.5, reward_clip=100.0)
    method = make_method((teacher, student, tok, enc), rollouts=4, ppo_epochs=1, max_new_tokens=6, sft_steps=0,
                         ptx_weight=0.0, **cfg)
    batch = first_batch(setup, size=4)
    method.remember(batch)
    torch.manual_seed(0)
    method.refill(4, batch.input_ids.device)
    student_old = copy.deepcopy(student).double()
    with torch.no_grad():   # an inner-epoch update: theta != theta_old, so rho_t moves off w_t
        for p in student.parameters():
            p.add_(0.03 * torch.randn_like(p))
    student64 = copy.deepcopy(student).double()
    out = method.loss(batch, 0)
    out.loss.backward()

    ref, w = alg1_reference(student_old, student64, copy.deepcopy(teacher).double(), method.buffer, len(tok),
                            cfg["alpha"], cfg["clip_ratio"], cfg["gamma"], cfg["reward_scale"], cfg["reward_clip"])
    assert ((w < 0.8) | (w > 1.2)).any() and ((w > 0.8) & (w < 1.2)).any()   # both sides of the clip occur
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    for (name, p), p64 in zip(student.named_parameters(), student64.parameters()):
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-3, atol=1e-6, msg=name)


def test_state_survives_a_resume(setup, tmp_path):
    kwargs = {"rollouts": 4, "ppo_epochs": 3, "max_new_tokens": 3, "sft_steps": 0, "ptx_weight": 0.0}
    a = make_method(setup, **kwargs)
    data = [b for _, (_, _, b) in zip(range(5), batches(setup[3]["train"], 2, setup[2].pad_token_id, seed=0))]
    a.loss(data[0], 0)
    a.loss(data[1], 1)
    torch.save(a.state_dict(), tmp_path / "state.pt")
    b = make_method(setup, **kwargs)
    b.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert b.schedule == a.schedule and b.pool == a.pool
    for step in (2, 3, 4):  # the saved buffer's last minibatch, then a refill from the saved pool
        torch.manual_seed(step)
        expected = a.loss(data[step], step).loss.item()
        torch.manual_seed(step)
        assert b.loss(data[step], step).loss.item() == pytest.approx(expected, rel=1e-6)


def heldout_reverse_kl(student, teacher, tok, batch) -> float:
    """Exact per-token KL(q || p) on the student's (seeded) samples for held-out prompts."""
    g = generate(student, tok, batch.prompt_ids, batch.prompt_mask, max_new_tokens=12, do_sample=True, seed=3)
    total, count = 0.0, 0
    for (logq, logp), r in response_log_softmax([student, teacher], g, len(tok)):
        total += (logq.exp() * (logq - logp)).sum().item()
        count += len(r)
    return total / count


def test_training_lowers_reverse_kl_on_held_out_prompts(setup):
    teacher, _, tok, enc = setup
    student = build_student(conf_option("student", "tiny"), teacher, tok, "tiny", torch.float32)[0]
    method = make_method((teacher, student, tok, enc), rollouts=16, ppo_epochs=2, max_new_tokens=12,
                         sft_steps=0, ptx_weight=0.0)
    held_out = first_batch(setup, size=8, split="valid")
    before = heldout_reverse_kl(student, teacher, tok, held_out)
    opt = torch.optim.AdamW(method.param_groups()["student"].params, lr=1e-2)
    torch.manual_seed(0)
    data = batches(enc["train"], 8, tok.pad_token_id, seed=0)
    for step in range(24):
        method.loss(next(data)[2], step).loss.backward()
        opt.step()
        opt.zero_grad()
    after = heldout_reverse_kl(student, teacher, tok, held_out)
    assert after < 0.5 * before, (before, after)


# -- the pre-training (PTX) corpus -------------------------------------------------------------------
def test_a_corpus_is_packed_into_rows_with_eos_between_documents(setup, tmp_path):
    tok = setup[2]
    docs = ["the first document", "second one, a little longer than the first", "third"]
    stream = [t for d in docs for t in tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]]
    (tmp_path / "c.txt").write_text("\n".join([docs[0], "", docs[1], docs[2]]) + "\n")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    for name in ("c.txt", "c.jsonl"):
        rows = pack_corpus(str(tmp_path / name), tok, 7, 10**6)
        assert rows.shape == (len(stream) // 7, 7) and rows.flatten().tolist() == stream[: rows.numel()]
    capped = pack_corpus(str(tmp_path / "c.txt"), tok, 7, 20)
    assert capped.flatten().tolist() == stream[:14]


def test_corpus_errors_name_the_key_and_the_fix(setup, tmp_path):
    tok = setup[2]
    with pytest.raises(ConfigError, match=r"method.ptx_corpus=.*missing.txt: no such file.*ptx_corpus=null"):
        make_method(setup, ptx_corpus=str(tmp_path / "missing.txt"))
    (tmp_path / "short.txt").write_text("hi\n")
    with pytest.raises(ConfigError, match="fewer than one row of 512"):
        pack_corpus(str(tmp_path / "short.txt"), tok, 512, 10**6)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ConfigError, match="line 1 has no string field 'text'"):
        pack_corpus(str(tmp_path / "bad.jsonl"), tok, 4, 10**6)


def test_ptx_loss_on_a_corpus_matches_a_slow_reference(setup, tmp_path):
    tok = setup[2]
    (tmp_path / "c.txt").write_text("".join(f"document number {i} says something about {i * 7}\n" for i in range(40)))
    method = make_method(setup, ptx_corpus=str(tmp_path / "c.txt"), ptx_length=16, ptx_kd_ratio=0.0)
    batch = first_batch(setup, size=3)
    torch.manual_seed(5)
    got, _ = method.ptx_loss(batch)
    torch.manual_seed(5)
    picked = method.ptx_rows[torch.randint(len(method.ptx_rows), (3,))]
    total, count = 0.0, 0
    for row in picked:
        logits = method.student(input_ids=row[None]).logits[0, :, : len(tok)]
        for t in range(15):
            total -= F.log_softmax(logits[t].double(), -1)[row[t + 1]].item()
            count += 1
    assert got.item() == pytest.approx(total / count, rel=1e-5)
    got.backward()
    assert all(p.grad is not None for p in method.student.parameters() if p.requires_grad)
    # method.ptx_source=gold: the gold responses of the batch are the PT batch
    gold = make_method(setup, ptx_source="gold", ptx_kd_ratio=0.0)
    assert gold.ptx_rows is None and gold.ptx_weight == 0.5
    expected = gold.nll(gold.logits(gold.student, batch), batch)
    assert gold.ptx_loss(batch)[0].item() == pytest.approx(expected.item())


def test_ptx_on_a_pt_batch_is_lmops_mixture_of_forward_kl_and_lm(setup, tmp_path):
    """LMOps' pre-training loss: kd_ratio * KL(p || q) + (1 - kd_ratio) * LM on the PT rows (--kd-ratio 0.5),
    computed by hand in float64 from full softmaxes at every position that has a next token."""
    teacher, student, tok, _ = setup
    (tmp_path / "c.txt").write_text("".join(f"a document, number {i}, about {i * 3}\n" for i in range(40)))
    method = make_method(setup, ptx_corpus=str(tmp_path / "c.txt"), ptx_length=12)
    assert method.cfg.ptx_kd_ratio == 0.5 and method.ptx_weight == 0.5
    batch = first_batch(setup, size=3)
    torch.manual_seed(9)
    got, logs = method.ptx_loss(batch)
    torch.manual_seed(9)
    rows = method.ptx_rows[torch.randint(len(method.ptx_rows), (3,))]
    kl, lm, count = 0.0, 0.0, 0
    with torch.no_grad():
        for row in rows:
            logq = F.log_softmax(student(input_ids=row[None]).logits[0, :-1, : len(tok)].double(), -1)
            logp = F.log_softmax(teacher(input_ids=row[None]).logits[0, :-1, : len(tok)].double(), -1)
            for t in range(len(row) - 1):
                kl += (logp[t].exp() * (logp[t] - logq[t])).sum().item()
                lm -= logq[t, row[t + 1]].item()
                count += 1
    kl, lm = kl / count, lm / count
    assert kl > 0.1 and lm > 0.1
    assert got.item() == pytest.approx(0.5 * kl + 0.5 * lm, rel=1e-5)
    assert (logs["ptx_fkl"], logs["ptx_nll"]) == (pytest.approx(kl, rel=1e-5), pytest.approx(lm, rel=1e-5))


def test_without_a_corpus_there_is_no_ptx_term_and_one_line_says_so(setup, capsys):
    batch = first_batch(setup, size=2)
    kwargs = {"rollouts": 2, "ppo_epochs": 1, "max_new_tokens": 3, "sft_steps": 0}
    method = make_method(setup, **kwargs)        # ptx_weight 0.5, ptx_source corpus, ptx_corpus null
    said = [line for line in capsys.readouterr().out.splitlines() if "PTX" in line]
    assert len(said) == 1 and "method.ptx_corpus=null" in said[0] and "method.ptx_source=gold" in said[0]
    assert method.ptx_weight == 0.0
    torch.manual_seed(0)
    out = method.loss(batch, 0)
    assert not any(k.startswith("ptx") for k in out.logs)
    off = make_method(setup, ptx_weight=0.0, **kwargs)
    torch.manual_seed(0)
    assert off.loss(batch, 0).loss.item() == out.loss.item()
    with pytest.raises(ConfigError, match=r"method.ptx_source=gold .* method.ptx_corpus=c.txt .*ptx_source=corpus"):
        make_method(setup, ptx_source="gold", ptx_corpus="c.txt")


# -- dropout in the policy update ------------------------------------------------------------------
def test_phase_two_ratio_is_exactly_one_on_the_first_pass_with_a_dropout_student(monkeypatch):
    """LMOps runs phase 2 with dropout off (``base_model.eval()  # no dropout for RL``): a GPT-2 student
    (dropout 0.1) in training mode gives, before any update, q_theta(y_t) = q_old(y_t) on every token of a
    fresh buffer, so rho_t / w_t = 1 (float rounding only: the sampler's KV-cached forward against one full
    forward); the SFT phase keeps its dropout."""
    teacher, tok = load_teacher(conf_option("teacher", "tiny-gpt2"), torch.float32)
    student = build_student(conf_option("student", "tiny-gpt2"), teacher, tok, "tiny-gpt2", torch.float32)[0]
    assert student.config.resid_pdrop == 0.1 and student.training
    data = OmegaConf.load(ROOT / "conf/dataset/synthetic.yaml")
    data.sizes = {"train": 8, "valid": 2, "test": 2}
    enc = {k: encode(v, tok, "alpaca", 320, 400) for k, v in load_splits(data, 1).items()}
    gpt2 = (teacher, student, tok, enc)
    ratios, real = [], minillm.clipped_surrogate

    def spy(logprobs, old_logprobs, adv, weights, eps):
        ratios.append((logprobs - old_logprobs).exp().detach())
        return real(logprobs, old_logprobs, adv, weights, eps)

    monkeypatch.setattr(minillm, "clipped_surrogate", spy)
    method = make_method(gpt2, rollouts=8, ppo_epochs=1, max_new_tokens=8, sft_steps=None, ptx_weight=0.0)
    sft, policy = method.phases()
    sft.method.loss(first_batch(gpt2, size=4), 0)
    assert any(m.p == 0.1 for m in student.modules() if isinstance(m, torch.nn.Dropout))   # phase 1: dropout on
    data_iter = batches(enc["train"], 4, tok.pad_token_id, seed=0)
    torch.manual_seed(0)
    for step in range(2):   # one buffer of 8 rollouts, two minibatches, no update in between
        policy.method.loss(next(data_iter)[2], step)
    ratio = torch.cat(ratios)
    assert student.training and ratio.numel() > 8
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)


# -- the paper's setting ---------------------------------------------------------------------------
def test_the_table_experiment_is_the_papers_app_b_setting(setup):
    from hydra import compose, initialize_config_dir

    from kdlab.methods.base import Context
    from kdlab.cli import CONF_DIR, validate_config

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=minillm-table", "hardware=cpu"])
    validate_config(cfg)
    m, t = cfg.method, cfg.train
    assert m.name == "minillm" and (cfg.teacher.name, cfg.student.name) == ("gpt2-xl", "gpt2-base")
    # phase 1: 3 epochs of SFT, the lowest validation loss kept
    assert m.sft_epochs == 3 and m.sft_steps is None
    # rollouts of at most 256 new tokens (prompts <= 256, sequences <= 512); PTX on OpenWebText as LMOps
    assert (m.max_new_tokens, m.ptx_weight, m.ptx_kd_ratio, m.ptx_source, m.disable_dropout) == \
        (256, 0.5, 0.5, "corpus", True)
    with pytest.raises(ConfigError, match=r"^method.ptx_corpus=data/openwebtext.jsonl: no such file; .*"
                                          r"load_dataset\('Skylion007/openwebtext'.* > data/openwebtext.jsonl`"):
        minillm.MiniLLM(m, Context(*setup[:3], None, None, None))
    m.ptx_corpus = None   # the phases below do not depend on it
    phases = minillm.MiniLLM(m, Context(*setup[:3], None, None, None)).phases()
    assert [p.name for p in phases] == ["sft", "minillm"]
    assert phases[0].epochs == 3 and phases[0].max_steps is None and phases[0].keep_best_valid_loss
    # phase 2: 5,000 steps, mini-batch 64, 256 rollouts, 4 inner epochs, lr 5e-6 constant, temperature 1
    assert phases[1].max_steps is None and (t.max_steps, t.epochs) == (5000, None)
    assert t.batch_size // t.grad_accum == 64 and t.grad_accum == 1
    assert (m.rollouts, m.ppo_epochs, m.lr, m.schedule, phases[1].schedule) == (256, 4, 5e-6, "constant", "constant")
    assert (m.temperature, m.top_k, m.top_p, m.clip_ratio, m.alpha) == (1.0, 0, 1.0, 0.2, 0.2)


def test_phase_lengths_in_epochs_or_steps(setup):
    from kdlab.trainer import Trainer

    trainer = Trainer.__new__(Trainer)   # steps_for reads only the train config and the training set
    trainer.train_cfg = OmegaConf.create({"max_steps": 5000, "epochs": None, "batch_size": 4})
    trainer.train_items = list(range(18))
    sft, policy = make_method(setup, sft_epochs=3).phases()
    assert trainer.steps_for(sft) == 3 * (18 // 4) and trainer.steps_for(policy) == 5000
    assert trainer.steps_for(make_method(setup, sft_steps=7).phases()[0]) == 7
    with pytest.raises(ConfigError, match=r"method.sft_steps=7 and method.sft_epochs=3 .*set one of them to null"):
        make_method(setup, sft_steps=7, sft_epochs=3)
