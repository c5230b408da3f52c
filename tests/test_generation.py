"""The generation engine: mixture sampling, KV-cached decoding with left padding, log-probs, batches, and
the on-policy methods' student sampler."""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdlab.data import Encoded, collate, left_pad
from kdlab.generation import (Generated, filter_top_k_top_p, generate, response_mask, sample_mixture,
                              sample_rows, sample_student, to_batch)
from kdlab.modeling import byte_tokenizer, random_model, response_logits

TEACHER = dict(arch="llama", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_positions=256,
               seed=0)
STUDENT = dict(TEACHER, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=1)


@pytest.fixture(scope="module")
def tiny():
    tok = byte_tokenizer()
    prompts = [tok.encode("hello world"), tok.encode("hi"), tok.encode("a longer prompt, left-padded less")]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    return random_model(STUDENT, 257), random_model(TEACHER, 257), tok, ids, mask


def teacher_forced_logprobs(model, gen: Generated, pad_id: int) -> torch.Tensor:
    """Log-probs of the generated tokens recomputed by one full forward pass (no cache, right padding)."""
    batch = to_batch(gen, pad_id)
    logits = response_logits(model, batch.input_ids, batch.attention_mask, batch.response_mask, 257)
    return F.log_softmax(logits, -1).gather(1, batch.labels[batch.response_mask][:, None]).squeeze(1)


class Bigram(nn.Module):
    """A stub causal LM: the next-token logits depend only on the last input token (``table[last]``)."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True,
                logits_to_keep=1):
        return SimpleNamespace(logits=self.table[input_ids[:, -1:]], past_key_values=None)


class StubTok:
    def __init__(self, vocab, eos):
        self.vocab, self.eos_token_id, self.pad_token_id = vocab, eos, eos

    def __len__(self):
        return self.vocab


def test_mixture_draws_from_alpha_p_plus_one_minus_alpha_q():
    """Chi-square test of 40,000 first tokens against alpha * p + (1 - alpha) * q on a 5-token vocab."""
    p = torch.tensor([0.70, 0.10, 0.10, 0.05, 0.05])
    q = torch.tensor([0.05, 0.05, 0.20, 0.30, 0.40])
    alpha, n = 0.3, 40_000
    teacher = Bigram(p.log().expand(5, 5).clone())
    student = Bigram(q.log().expand(5, 5).clone())
    prompt = torch.zeros(n, 1, dtype=torch.long)
    out = sample_mixture(student, teacher, StubTok(5, 4), prompt, torch.ones_like(prompt), alpha=alpha,
                         max_new_tokens=1, seed=0)
    counts = torch.bincount(out.response_ids[:, 0], minlength=5).double()
    expected = n * (alpha * p + (1 - alpha) * q).double()
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 18.5, (counts, expected)   # 0.999 quantile of chi2 with 4 degrees of freedom
    for wrong in (p, q):                     # and not from either model alone
        assert ((counts - n * wrong) ** 2 / (n * wrong)).sum().item() > 1000
    torch.testing.assert_close(out.logprobs[:, 0], (alpha * p + (1 - alpha) * q)[out.response_ids[:, 0]].log())
    torch.testing.assert_close(out.student_logprobs[:, 0], q.log()[out.response_ids[:, 0]])
    torch.testing.assert_close(out.teacher_logprobs[:, 0], p.log()[out.response_ids[:, 0]])


def test_mixture_stops_at_eos_and_pads_after_it():
    # deterministic chain 0 -> 1 -> 2 -> EOS(3): a prompt ending in 1 gets [2, 3]; one ending in 0 gets [1, 2, 3]
    table = torch.full((4, 4), -1e4)
    for a, b in [(0, 1), (1, 2), (2, 3), (3, 3)]:
        table[a, b] = 0.0
    model = Bigram(table)
    ids, mask = left_pad([[2, 1], [0]], pad_id=3)
    out = sample_mixture(model, model, StubTok(4, 3), ids, mask, alpha=0.5, max_new_tokens=6, seed=1)
    assert out.response_ids.tolist() == [[2, 3, 3], [1, 2, 3]]
    assert out.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert out.student_logprobs[0, 2] == 0 and out.teacher_logprobs[0, 2] == 0
    batch = to_batch(out, pad_id=3)
    assert batch.input_ids.tolist() == [[2, 1, 2, 3], [0, 1, 2, 3]]
    assert batch.labels.tolist() == [[-100, 2, 3, -100], [1, 2, 3, -100]]


def test_mixture_logprobs_match_a_full_forward_pass_despite_left_padding(tiny):
    """The KV-cached decode of left-padded prompts scores exactly what one uncached pass scores."""
    student, teacher, tok, ids, mask = tiny
    out = sample_mixture(student, teacher, tok, ids, mask, alpha=0.2, max_new_tokens=10, seed=0)
    sel = out.response_mask.bool()
    torch.testing.assert_close(out.student_logprobs[sel], teacher_forced_logprobs(student, out, tok.pad_token_id),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.teacher_logprobs[sel], teacher_forced_logprobs(teacher, out, tok.pad_token_id),
                               atol=1e-5, rtol=1e-5)
    mix = (0.2 * out.teacher_logprobs.exp() + 0.8 * out.student_logprobs.exp()).log()
    torch.testing.assert_close(out.logprobs[sel], mix[sel])
    again = sample_mixture(student, teacher, tok, ids, mask, alpha=0.2, max_new_tokens=10, seed=0)
    assert torch.equal(out.response_ids, again.response_ids)
    student.train(), teacher.eval()   # sampling runs in eval mode (no dropout) and restores the modes
    sample_mixture(student, teacher, tok, ids, mask, alpha=0.2, max_new_tokens=2, seed=0)
    assert student.training and not teacher.training


def test_greedy_mixture_of_the_student_alone_equals_transformers_greedy(tiny):
    student, teacher, tok, ids, mask = tiny
    ours = sample_mixture(student, teacher, tok, ids, mask, alpha=0.0, max_new_tokens=12, top_k=1, seed=0)
    hf = generate(student, tok, ids, mask, max_new_tokens=12, return_logprobs=True)
    assert torch.equal(ours.response_ids, hf.response_ids)
    torch.testing.assert_close(ours.student_logprobs, hf.logprobs, atol=1e-5, rtol=1e-5)


def test_generate_logprobs_match_a_full_forward_pass_at_the_temperature(tiny):
    student, _, tok, ids, mask = tiny
    out = generate(student, tok, ids, mask, max_new_tokens=10, do_sample=True, temperature=0.7, seed=3,
                   return_logprobs=True)
    batch = to_batch(out, tok.pad_token_id)
    logits = response_logits(student, batch.input_ids, batch.attention_mask, batch.response_mask, 257)
    ref = F.log_softmax(logits / 0.7, -1).gather(1, batch.labels[batch.response_mask][:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs[out.response_mask.bool()], ref, atol=1e-5, rtol=1e-5)
    assert generate(student, tok, ids, mask, max_new_tokens=4).logprobs is None


def test_sampling_seeds_reproduce_and_unseeded_draws_follow_the_global_rng(tiny):
    student, teacher, tok, ids, mask = tiny
    kw = dict(max_new_tokens=8, do_sample=True)
    assert torch.equal(generate(student, tok, ids, mask, seed=5, **kw).response_ids,
                       generate(student, tok, ids, mask, seed=5, **kw).response_ids)
    torch.manual_seed(0)
    a, b = generate(student, tok, ids, mask, **kw), generate(student, tok, ids, mask, **kw)
    assert not torch.equal(a.response_ids, b.response_ids)   # two calls in a row differ
    torch.manual_seed(0)
    assert torch.equal(generate(student, tok, ids, mask, **kw).response_ids, a.response_ids)
    torch.manual_seed(0)
    m1 = sample_mixture(student, teacher, tok, ids, mask, alpha=0.5, max_new_tokens=8)
    torch.manual_seed(0)
    assert torch.equal(sample_mixture(student, teacher, tok, ids, mask, alpha=0.5, max_new_tokens=8).response_ids,
                       m1.response_ids)
    state = torch.get_rng_state()
    generate(student, tok, ids, mask, max_new_tokens=4)       # greedy leaves the RNG alone
    assert torch.equal(torch.get_rng_state(), state)


def test_to_batch_lays_out_like_a_data_batch():
    prompt_ids, prompt_mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    gen = Generated(prompt_ids, prompt_mask, torch.tensor([[1, 9, 0], [2, 3, 4]]),
                    response_mask(torch.tensor([[1, 9, 0], [2, 3, 4]]), eos_id=9))
    batch = to_batch(gen, pad_id=0, examples=[{"id": "a"}, {"id": "b"}])
    ref = collate([Encoded([5, 6, 7], [1, 9], {"id": "a"}), Encoded([8], [2, 3, 4], {"id": "b"})], pad_id=0)
    for name in ("input_ids", "attention_mask", "labels", "response_mask", "prompt_ids", "prompt_mask"):
        assert torch.equal(getattr(batch, name), getattr(ref, name)), name
    assert batch.labels.tolist() == [[-100, -100, 1, 9, -100], [2, 3, 4, -100, -100]]
    assert [e["id"] for e in batch.examples] == ["a", "b"]


def test_sample_student_replaces_the_flagged_rows_with_one_seeded_generate_call(tiny):
    """GKD/DPKD (every row) and ImitKD (some rows): the student's samples of one ``generate`` call, whose
    seed is the one draw from the global RNG, laid out like a data batch; unflagged rows keep their gold
    response and every row its example."""
    student, _, tok, ids, mask = tiny
    gold = [Encoded(p[m.bool()].tolist(), tok.encode(r) + [tok.eos_token_id], {"id": i})
            for i, (p, m, r) in enumerate(zip(ids, mask, ["ab", "cde", "f"]))]
    batch = collate(gold, tok.pad_token_id)
    sampling = dict(max_new_tokens=5, temperature=0.8, top_k=50, top_p=0.9)

    torch.manual_seed(3)
    every = sample_student(student, tok, batch, **sampling)
    after = torch.get_rng_state()
    torch.manual_seed(3)
    ref = to_batch(generate(student, tok, ids, mask, do_sample=True, **sampling), tok.pad_token_id, batch.examples)
    assert torch.equal(torch.get_rng_state(), after)             # the same (single) draw from the global RNG
    for name in ("input_ids", "attention_mask", "labels", "response_mask", "prompt_ids", "prompt_mask"):
        assert torch.equal(getattr(every, name), getattr(ref, name)), name
    assert every.examples == batch.examples

    flags = torch.tensor([False, True, False])
    torch.manual_seed(3)
    mixed = sample_student(student, tok, batch, rows=flags, **sampling)
    torch.manual_seed(3)
    one = generate(student, tok, ids[1:2], mask[1:2], do_sample=True, **sampling)
    sampled = one.response_ids[0][one.response_mask[0].bool()].tolist()
    expected = collate([gold[0], Encoded(gold[1].prompt_ids, sampled, {"id": 1}), gold[2]], tok.pad_token_id)
    for name in ("input_ids", "attention_mask", "labels", "response_mask", "prompt_ids", "prompt_mask"):
        assert torch.equal(getattr(mixed, name), getattr(expected, name)), name
    assert mixed.examples == batch.examples


def test_top_k_and_top_p_filters_match_hand_computed_values():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    torch.testing.assert_close(filter_top_k_top_p(probs, top_k=2), torch.tensor([[0, 4 / 7, 0, 3 / 7]]))
    # top-p 0.6: 0.4 alone is < 0.6, so 0.3 joins; 0.2 is not needed
    torch.testing.assert_close(filter_top_k_top_p(probs, top_p=0.6), torch.tensor([[0, 4 / 7, 0, 3 / 7]]))
    torch.testing.assert_close(filter_top_k_top_p(probs, top_p=0.3), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    torch.testing.assert_close(filter_top_k_top_p(probs), probs)


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy(tiny):
    """SeqKD's mode approximation: with more beams the chosen continuation's log-likelihood can only rise
    (compared on a single prompt, scored by the same teacher-forced pass)."""
    _, teacher, tok, ids, mask = tiny
    row = slice(2, 3)
    scores = []
    for beams in (1, 4):
        gen = generate(teacher, tok, ids[row], mask[row], max_new_tokens=6, num_beams=beams)
        scores.append(teacher_forced_logprobs(teacher, gen, tok.pad_token_id).sum().item())
    assert scores[1] >= scores[0] - 1e-5
    with pytest.raises(ValueError, match="beam search"):
        generate(teacher, tok, ids, mask, max_new_tokens=2, num_beams=2, return_logprobs=True)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    keep = probs > 0
    expected = counts.sum() * probs[keep]
    return (((counts[keep] - expected) ** 2) / expected).sum().item()


def test_inverse_cdf_sampling_draws_each_row_from_its_distribution():
    """Chi-square of 30,000 draws per row (0.999 quantile with 4 degrees of freedom: 18.5); zero-probability
    entries are never drawn, also at the ends of the row."""
    probs = torch.tensor([[0.0, 0.5, 0.2, 0.0, 0.1, 0.1, 0.1], [0.3, 0.0, 0.0, 0.3, 0.2, 0.1, 0.1]]).double()
    n = 30_000
    draws = sample_rows(probs.repeat_interleave(n, 0), torch.Generator().manual_seed(0)).view(2, n)
    for row, p in zip(draws, probs):
        counts = torch.bincount(row, minlength=7).double()
        assert counts[p == 0].sum() == 0
        assert chi_square(counts, p) < 18.5, counts
    unnormalised = torch.tensor([[0.0, 3.0, 1.0]])       # rows need not sum to 1
    counts = torch.bincount(sample_rows(unnormalised.expand(n, 3), torch.Generator().manual_seed(1)), minlength=3)
    assert counts[0] == 0 and chi_square(counts.double(), torch.tensor([0.0, 0.75, 0.25])) < 10.8


def test_generate_samples_from_the_tempered_filtered_distribution(tiny):
    """First tokens of 6,000 identical prompts against softmax(z / T) after top-k then top-p."""
    student = copy.deepcopy(tiny[0])
    tok = tiny[2]
    with torch.no_grad():   # a peaked distribution, so that a wrong temperature shows
        student.model.norm.weight.mul_(8.0)
    prompt = torch.tensor([tok.encode("hello")] * 6000)
    with torch.no_grad():
        logits = student(prompt[:1]).logits[0, -1, :257]
    for temperature, top_k, top_p in ((1.3, 0, 1.0), (0.8, 20, 1.0), (1.0, 0, 0.3)):
        probs = filter_top_k_top_p(F.softmax(logits / temperature, -1)[None], top_k, top_p)[0].double()
        out = generate(student, tok, prompt, torch.ones_like(prompt), max_new_tokens=1, do_sample=True,
                       temperature=temperature, top_k=top_k, top_p=top_p, seed=0)
        counts = torch.bincount(out.response_ids[:, 0], minlength=257).double()
        assert counts[probs == 0].sum() == 0
        dof = int((probs > 0).sum()) - 1
        assert chi_square(counts, probs) < dof + 4 * (2 * dof) ** 0.5 + 10, (temperature, top_k, top_p)
