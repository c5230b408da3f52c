"""ULD and the hybrid against slow references written from the definitions (float64)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdlab.divergences import build_divergence, validate_divergence
from kdlab.divergences.reference import naive_per_token
from kdlab.divergences.uld import ULD, ULDHybrid


def naive_w1(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Boizard et al. 2024, Eq. 6: sum_i |q_(i) - p_(i)|, both sorted decreasingly, the shorter zero-padded."""
    qs, ps = q.sort(-1, descending=True).values, p.sort(-1, descending=True).values
    width = max(qs.shape[-1], ps.shape[-1])
    qs, ps = F.pad(qs, (0, width - qs.shape[-1])), F.pad(ps, (0, width - ps.shape[-1]))
    return (qs - ps).abs().sum(-1)


def naive_uld(s, t, s_rows, t_rows, tau=1.0):
    q = torch.softmax(s[s_rows] / tau, -1)
    p = torch.softmax(t[t_rows].detach() / tau, -1)
    return naive_w1(q, p)


def inputs(ns=7, vs=11, nt=5, vt=23, g=6, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    s = (3 * torch.randn(ns, vs, generator=gen, dtype=dtype)).requires_grad_()
    t = 3 * torch.randn(nt, vt, generator=gen, dtype=dtype)
    s_rows = torch.randperm(ns, generator=gen)[:g]
    t_rows = torch.randint(0, nt, (g,), generator=gen)
    return s, t, s_rows, t_rows


@pytest.mark.parametrize("vs,vt", [(11, 23), (23, 11), (13, 13)])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_uld_value_and_gradient_match_reference(vs, vt, tau):
    s, t, s_rows, t_rows = inputs(vs=vs, vt=vt)
    div = ULD(tau=tau, chunk_size=4)   # several chunks
    got = div.per_group(s, t, s_rows, t_rows)
    ref = naive_uld(s, t, s_rows, t_rows, tau)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    w = torch.randn(len(s_rows), dtype=torch.float64)
    (g_got,) = torch.autograd.grad((got * w).sum(), s)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), s)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=1e-12)
    assert g_got[[i for i in range(len(s)) if i not in s_rows.tolist()]].abs().sum() == 0


def test_uld_gradcheck():
    s, t, s_rows, t_rows = inputs(ns=4, vs=6, nt=3, vt=9, g=3, seed=3)
    div = ULD(chunk_size=2)
    assert torch.autograd.gradcheck(lambda x: div.per_group(x, t, s_rows, t_rows), (s,))


def test_uld_mean_is_over_groups_and_bounds():
    s, t, s_rows, t_rows = inputs(dtype=torch.float32)
    div = ULD()
    loss = div(s, t, s_rows, t_rows)
    assert torch.isclose(loss, naive_uld(s, t, s_rows, t_rows).mean(), rtol=1e-5)
    assert 0 <= loss <= 2
    # identical distributions up to a permutation of the vocabulary: W1 is 0
    perm = torch.randperm(s.shape[1])
    same = div(s.detach(), s.detach()[:, perm], torch.arange(len(s)), torch.arange(len(s)))
    assert same.abs() < 1e-6
    assert div(s, t, s_rows[:0], t_rows[:0]) == 0


def test_uld_bf16_inputs_computed_in_fp32():
    s, t, s_rows, t_rows = inputs(dtype=torch.float32)
    got = ULD().per_group(s.detach().bfloat16(), t.bfloat16(), s_rows, t_rows)
    assert got.dtype == torch.float32
    ref = naive_uld(s.detach().bfloat16().double(), t.bfloat16().double(), s_rows, t_rows)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


class Vocab:
    """A stand-in tokenizer: only what the hybrid's vocabulary mapping reads."""

    def __init__(self, tokens):
        self.tokens = tokens

    def get_vocab(self):
        return {t: i for i, t in enumerate(self.tokens)}

    def __len__(self):
        return len(self.tokens)


@pytest.mark.parametrize("matched,beta", [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.5), ("jsd", 0.1)])
def test_hybrid_on_a_fully_shared_vocabulary_is_the_ordinary_divergence(matched, beta):
    tokens = [f"tok{i}" for i in range(13)]
    s, t, s_rows, t_rows = inputs(vs=13, vt=13)
    # the teacher's ids are a permutation of the student's: the mapping is by token string
    perm = torch.randperm(13, generator=torch.Generator().manual_seed(5))
    teacher_tokens = [tokens[i] for i in perm.tolist()]
    div = ULDHybrid(matched=matched, beta=beta, chunk_size=4).bind(Vocab(tokens), Vocab(teacher_tokens))
    got = div.per_group(s, t, s_rows, t_rows)
    # teacher column j holds token perm[j]; in student order it is column argsort(perm)
    t_in_student_order = t[:, perm.argsort()]
    ref = naive_per_token(matched, s[s_rows], t_in_student_order[t_rows], beta=beta)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    g_got, = torch.autograd.grad(got.sum(), s)
    g_ref, = torch.autograd.grad(ref.sum(), s)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-8, atol=1e-12)


def test_hybrid_on_a_partial_overlap_matches_reference():
    student_tokens = [f"s{i}" for i in range(9)] + ["a", "b", "c", "d"]
    teacher_tokens = ["d", "x1", "b", "x2", "x3", "a", "x4", "c"] + [f"t{i}" for i in range(12)]
    s, t, s_rows, t_rows = inputs(vs=len(student_tokens), vt=len(teacher_tokens))
    div = ULDHybrid(matched="fkl", chunk_size=3).bind(Vocab(student_tokens), Vocab(teacher_tokens))
    got = div.per_group(s, t, s_rows, t_rows)
    shared = sorted(set(student_tokens) & set(teacher_tokens), key=teacher_tokens.index)
    s_m = torch.tensor([student_tokens.index(x) for x in shared])
    t_m = torch.tensor([teacher_tokens.index(x) for x in shared])
    s_u = torch.tensor([i for i, x in enumerate(student_tokens) if x not in shared])
    t_u = torch.tensor([i for i, x in enumerate(teacher_tokens) if x not in shared])
    q, p = torch.softmax(s[s_rows], -1), torch.softmax(t[t_rows], -1)
    w_m = len(shared) / len(teacher_tokens)
    ref = (w_m * naive_per_token("fkl", s[s_rows][:, s_m], t[t_rows][:, t_m])
           + (1 - w_m) * naive_w1(q[:, s_u], p[:, t_u]))
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    g_got, = torch.autograd.grad(got.sum(), s)
    g_ref, = torch.autograd.grad(ref.sum(), s)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-8, atol=1e-12)


def test_configs_validate_and_build():
    from omegaconf import OmegaConf

    from conftest import ROOT
    from kdlab.config import ConfigError

    for name in ("uld", "uld_hybrid"):
        cfg = OmegaConf.load(ROOT / "conf" / "divergence" / f"{name}.yaml")
        validate_divergence(cfg)
        assert build_divergence(cfg).cross_tokenizer
    with pytest.raises(ConfigError, match="divergence.distill_weight"):
        validate_divergence({"name": "uld", "tau": 1.0, "chunk_size": 8, "ce_weight": 1.0, "distill_weight": -1})
