"""Analysis metrics on logits: TOP-1 agreement, UNC buckets (OKD) and ExAccErr (exposure bias).

Logit arguments are ``(..., V)`` tensors of any float dtype (computed in fp32) with an optional bool
``mask`` of shape ``(...)``; in kdlab they are the response-position rows ``(N, V)`` that
``kdlab.modeling.response_logits`` returns. ``p`` is the teacher's distribution, ``q`` the student's.

References:
- OKD: Rao et al., "Exploring and Enhancing the Transfer of Distribution in Knowledge Distillation for
  Autoregressive Language Models" (arXiv 2409.12512), Eqs. 3-7 (Eq. 4: UNC), Figures 2 and 5.
- ATKD: Zhong et al. 2024, "Revisiting Knowledge Distillation for Autoregressive Language Models"
  (arXiv 2402.11890), where the uncertainty coefficient (UNC) comes from.
- Arora et al. 2022, "Why Exposure Bias Matters: An Imitation Learning Perspective of Error
  Accumulation in Language Generation"; MiniLLM's implementation of it
  (microsoft/LMOps ``minillm/evaluate_exposure_bias.py``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _rows(logits: Tensor, mask: Tensor | None) -> Tensor:
    """The selected rows of ``logits`` as an fp32 ``(N, V)`` tensor."""
    if mask is None:
        return logits.reshape(-1, logits.size(-1)).float()
    if mask.shape != logits.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match logits {tuple(logits.shape[:-1])}")
    return logits[mask.bool()].float()


def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ; slice both to the tokenizer's vocabulary first"
        )


def forward_kl_per_token(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) per row, in fp32; shape ``logits.shape[:-1]``."""
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    # xlogy-style guard: rows where p_v == 0 contribute 0 even if log q_v is -inf.
    return torch.where(log_p.isneginf(), 0.0, log_p.exp() * (log_p - log_q)).sum(-1)


def top1_agreement(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> float:
    """TOP-1 agreement (OKD Eq. 3): the fraction of positions where argmax q == argmax p.

    ``(1/N) sum_i 1[argmax_v q_i(v) = argmax_v p_i(v)]`` over the masked-in positions; NaN when there
    are none (an empty set has no agreement rate).
    """
    _check_pair(student_logits, teacher_logits)
    s, t = _rows(student_logits, mask), _rows(teacher_logits, mask)
    if s.size(0) == 0:
        return math.nan
    return (s.argmax(-1) == t.argmax(-1)).float().mean().item()


def uncertainty_coefficient(
    teacher_logits: Tensor, targets: Tensor | None = None, kind: str = "nontarget"
) -> Tensor:
    """The teacher's uncertainty coefficient (UNC) per position, in [0, 1]; shape ``logits.shape[:-1]``.

    ``kind="nontarget"`` (default): OKD Eq. 4, ``UNC = sum_{k != g} exp(z_k) / sum_j exp(z_j) = 1 - p(g)``
    with ``z`` the teacher's logits and ``g`` the target token, i.e. the teacher's probability mass outside
    the target. OKD takes it from ATKD (Zhong et al. 2024), which derives it from the exact decomposition
    ``KL(p||q) = KL(b_p||b_q) + (1 - p(g)) KL(p_\\g || q_\\g)`` (b: the binary target/non-target split,
    p_\\g: p renormalised over non-target tokens) and uses it to rank tokens by learning difficulty.
    ``targets`` are the gold next tokens (e.g. ``labels`` at response positions); without them ``g`` is
    the teacher's own argmax, giving ``1 - max_v p(v)``.

    ``kind="entropy"``: the normalised entropy ``H(p) / log V``, an alternative difficulty measure (not
    OKD's).
    """
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    if kind == "nontarget":
        if targets is None:
            return 1.0 - log_p.max(-1).values.exp()
        if targets.shape != log_p.shape[:-1]:
            raise ValueError(f"targets shape {tuple(targets.shape)} does not match logits {tuple(log_p.shape[:-1])}")
        return 1.0 - log_p.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1).exp()
    if kind == "entropy":
        entropy = -torch.where(log_p.isneginf(), 0.0, log_p.exp() * log_p).sum(-1)
        return entropy / math.log(log_p.size(-1))
    raise ValueError(f"kind={kind!r} is not valid; choose 'nontarget' or 'entropy'")


def token_stats(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    targets: Tensor | None = None,
    unc_kind: str = "nontarget",
) -> dict[str, Tensor]:
    """Per-position scalars for :func:`bucket_token_stats`, each a 1-D fp32 tensor over masked rows.

    Keys: ``unc`` (:func:`uncertainty_coefficient`), ``student_std`` (std of the student's logits over
    the vocabulary, population std), ``kl`` (KL(p||q)), ``top1`` (1.0 where the argmaxes agree).
    Computing these per batch and concatenating them lets an evaluation bucket a whole data set
    without keeping ``(N, V)`` logits around.
    """
    _check_pair(student_logits, teacher_logits)
    s, t = _rows(student_logits, mask), _rows(teacher_logits, mask)
    g = None if targets is None else (targets[mask.bool()] if mask is not None else targets.reshape(-1))
    return {
        "unc": uncertainty_coefficient(t, g, unc_kind),
        "student_std": s.std(-1, correction=0),
        "kl": forward_kl_per_token(t, s),
        "top1": (s.argmax(-1) == t.argmax(-1)).float(),
    }


def _quantile_levels(n_buckets: int | None, quantiles: Sequence[float] | None) -> list[float]:
    if quantiles is not None:
        inner = [float(x) for x in quantiles]
        if any(not 0.0 < x < 1.0 for x in inner) or inner != sorted(set(inner)):
            raise ValueError(f"quantiles={list(quantiles)} must be strictly increasing values in (0, 1)")
        return [0.0, *inner, 1.0]
    if n_buckets is None or n_buckets < 1:
        raise ValueError(f"n_buckets={n_buckets} must be a positive integer (or give quantiles)")
    return [i / n_buckets for i in range(n_buckets + 1)]


def bucket_token_stats(
    stats: dict[str, Tensor], n_buckets: int | None = 4, quantiles: Sequence[float] | None = None
) -> list[dict]:
    """Group tokens into difficulty buckets by UNC quantiles (OKD Figures 2 and 5).

    Bucket edges are the UNC quantiles at ``[0, q_1, ..., q_k, 1]`` (``quantiles``; or equal-mass
    buckets for ``n_buckets``). Bucket i holds tokens with ``edge_i <= UNC < edge_{i+1}``, the last
    bucket also its upper edge, so buckets go from easy (certain teacher) to hard. Ties at an edge can
    leave a bucket empty: its count is 0 and its means are NaN.

    Per bucket: ``count``, ``unc_low``/``unc_high`` (edges), ``unc_mean``, ``student_logit_std`` (mean
    over tokens of the std of the student's logits), ``kl`` (mean KL(p||q)), ``top1`` (agreement).
    """
    levels = _quantile_levels(n_buckets, quantiles)
    unc = stats["unc"].double()
    if unc.numel() == 0:
        raise ValueError("no tokens to bucket")
    # torch.quantile (linear interpolation) accepts up to 2**24 tokens, far above any evaluation set.
    edges = torch.quantile(unc, torch.tensor(levels, dtype=torch.float64))
    buckets = []
    for i in range(len(levels) - 1):
        lo, hi = edges[i].item(), edges[i + 1].item()
        last = i == len(levels) - 2
        sel = (unc >= lo) & ((unc <= hi) if last else (unc < hi))
        count = int(sel.sum())
        mean = {key: stats[key][sel].double().mean().item() if count else math.nan for key in stats}
        buckets.append(
            {
                "bucket": i,
                "quantile_low": levels[i],
                "quantile_high": levels[i + 1],
                "count": count,
                "unc_low": lo,
                "unc_high": hi,
                "unc_mean": mean["unc"],
                "student_logit_std": mean["student_std"],
                "kl": mean["kl"],
                "top1": mean["top1"],
            }
        )
    return buckets


def unc_buckets(
    teacher_logits: Tensor,
    student_logits: Tensor,
    mask: Tensor | None = None,
    n_buckets: int | None = 4,
    quantiles: Sequence[float] | None = None,
    targets: Tensor | None = None,
    unc_kind: str = "nontarget",
) -> list[dict]:
    """:func:`token_stats` then :func:`bucket_token_stats` on logits held in memory."""
    stats = token_stats(student_logits, teacher_logits, mask, targets, unc_kind)
    return bucket_token_stats(stats, n_buckets, quantiles)


# ---------------------------------------------------------------------------------------------------
# ExAccErr


def _cumulative_regret(kl: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over prompts of the cumulative per-position KL, averaging samples per prompt first.

    ``kl``: ``(L,)``, ``(prompts, L)`` or ``(prompts, samples, L)``. At each position the KL is
    averaged over the samples of a prompt that are still running there (0 when none is, as after
    every sample's EOS), summed cumulatively over positions, then averaged over prompts (LMOps).
    """
    kl = kl.double()
    while kl.dim() < 3:
        kl = kl.unsqueeze(0)
    valid = torch.ones_like(kl) if mask is None else mask.double().reshape(kl.shape)
    per_pos = (kl * valid).sum(1) / valid.sum(1).clamp(min=1.0)
    return per_pos.cumsum(-1).mean(0)


def exaccerr_from_regrets(
    student_prefix_kl: Tensor,
    teacher_prefix_kl: Tensor,
    lengths: Sequence[int],
    student_mask: Tensor | None = None,
    teacher_mask: Tensor | None = None,
    atol: float = 1e-12,
) -> dict[str, list]:
    """ExAccErr(l) (OKD Eqs. 5-7, Arora et al. 2022) from per-position KL(p||q) values.

    ``student_prefix_kl[..., t]`` is KL(p(.|y_<t) || q(.|y_<t)) with the prefix y_<t sampled from the
    student, ``teacher_prefix_kl`` the same with prefixes sampled from the teacher; shapes ``(L,)``,
    ``(prompts, L)`` or ``(prompts, samples, L)``, masks alike (False after a sample ended).

        R(l)       = sum_{t<=l} E_{y_<t ~ q} KL(p || q)        (regret on the student's own prefixes)
        l * eps(l) = sum_{t<=l} E_{y_<t ~ p} KL(p || q)        (regret on the teacher's prefixes)
        ExAccErr(l) = (R(l) - l eps(l)) / (l eps(l)) x 100

    i.e. the % of the student's accumulated error that comes from exposure bias. When
    ``l eps(l) <= atol``: 0 if also ``R(l) <= atol`` (the student is the teacher), else +inf.

    Returns ``{"lengths", "exaccerr", "regret_student" (R), "regret_teacher" (l eps)}``, lists aligned
    with ``lengths``.
    """
    r_cum = _cumulative_regret(student_prefix_kl, student_mask)
    e_cum = _cumulative_regret(teacher_prefix_kl, teacher_mask)
    out: dict[str, list] = {"lengths": [], "exaccerr": [], "regret_student": [], "regret_teacher": []}
    for l in lengths:
        if not 1 <= l <= min(len(r_cum), len(e_cum)):
            raise ValueError(f"length {l} is outside the {min(len(r_cum), len(e_cum))} positions given")
        r, e = r_cum[l - 1].item(), e_cum[l - 1].item()
        if e <= atol:
            value = 0.0 if r <= atol else math.inf
        else:
            value = (r - e) / e * 100.0
        out["lengths"].append(int(l))
        out["exaccerr"].append(value)
        out["regret_student"].append(r)
        out["regret_teacher"].append(e)
    return out


def _eos_ids(model, eos_token_id) -> list[int]:
    eos = model.generation_config.eos_token_id if eos_token_id is None else eos_token_id
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(x) for x in eos]


@torch.no_grad()
def sampled_prefix_kl(
    sampler,
    student,
    teacher,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    length: int,
    num_samples: int,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    vocab_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sample ``num_samples`` continuations of ``length`` tokens per prompt from ``sampler`` and return
    ``(kl, valid, tokens)``, each ``(prompts, num_samples, length)``: the per-position
    KL(p_teacher || q_student) on the sampled sequences, where it is valid, and the sampled tokens
    (``pad_token_id`` where generation had stopped).

    Prompts are left-padded (``prompt_mask`` 0 on the left). Sampling is pure ancestral sampling
    (T = 1, no top-k/top-p, no repetition penalties), as in LMOps's exposure-bias evaluation. Position
    t scores the distribution of response token t given the prompt and tokens < t (the first position
    is conditioned on the prompt alone); it is valid while no EOS was sampled before t, so the
    position that predicts EOS counts and those after it do not.
    """
    prompts, p_len = prompt_ids.shape
    out = sampler.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        max_new_tokens=length,
        min_new_tokens=0,
        num_return_sequences=num_samples,
        eos_token_id=list(eos_token_ids) or None,
        pad_token_id=pad_token_id,
    )
    gen = out[:, p_len:]
    n_gen = gen.size(1)
    is_eos = torch.isin(gen, torch.tensor(list(eos_token_ids), dtype=gen.dtype, device=gen.device))
    valid = (is_eos.long().cumsum(-1) - is_eos.long()) == 0
    attention = torch.cat([prompt_mask.repeat_interleave(num_samples, 0).bool(), valid], dim=1)
    # Positions from the attention mask, as generate() uses for left-padded prompts.
    position_ids = (attention.long().cumsum(-1) - 1).clamp(min=0)

    def response_logits(model) -> Tensor:
        logits = model(
            input_ids=out, attention_mask=attention.long(), position_ids=position_ids, logits_to_keep=n_gen + 1
        ).logits[:, :-1]
        return logits if vocab_size is None else logits[..., :vocab_size]

    s_logits, t_logits = response_logits(student), response_logits(teacher)
    _check_pair(s_logits, t_logits)
    kl = forward_kl_per_token(t_logits, s_logits)
    # generate() stops early once every sample hit EOS; the missing positions are not valid.
    kl = F.pad(kl * valid, (0, length - n_gen))
    valid = F.pad(valid, (0, length - n_gen), value=False)
    gen = F.pad(gen, (0, length - n_gen), value=pad_token_id)
    shape = (prompts, num_samples, length)
    return kl.view(shape), valid.view(shape), gen.view(shape)


def exaccerr(
    student,
    teacher,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    lengths: Sequence[int] = (16,),
    num_samples: int = 3,
    seed: int | None = 0,
    batch_size: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    vocab_size: int | None = None,
) -> dict[str, list]:
    """Monte-Carlo ExAccErr(l) of a student against its teacher (see :func:`exaccerr_from_regrets`).

    For each prompt, ``num_samples`` continuations of ``max(lengths)`` tokens are sampled from the
    student (for R) and from the teacher (for l eps); both models score every sampled sequence and the
    per-position KL(p||q) is accumulated (:func:`sampled_prefix_kl`). Defaults follow LMOps
    (``--eb-sample-times 3``, reported at l = 16). ``seed`` makes the sampling reproducible without
    touching the global RNG state (None: use the global state). ``batch_size`` prompts are processed
    at a time (None: all). EOS/pad default to the teacher's ``generation_config``. Both models are
    run in eval mode and put back in their previous mode afterwards.

    Departure from LMOps: LMOps slices logits from the first response position on (``logits[:, P:]``),
    so its l-th value scores response tokens 2..l+1; here position 1 is the first response token's
    distribution given the prompt alone, matching the definition of R(l) and eps(l).
    """
    length = max(lengths)
    eos = _eos_ids(teacher, eos_token_id)
    pad = pad_token_id if pad_token_id is not None else teacher.generation_config.pad_token_id
    pad = pad if pad is not None else (eos[0] if eos else 0)
    step = batch_size or prompt_ids.size(0)
    modes = [(m, m.training) for m in (student, teacher)]
    device = prompt_ids.device
    try:
        for m, _ in modes:
            m.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            parts = {"student": [], "teacher": []}
            for name, sampler in (("student", student), ("teacher", teacher)):
                for i in range(0, prompt_ids.size(0), step):
                    parts[name].append(
                        sampled_prefix_kl(
                            sampler, student, teacher, prompt_ids[i : i + step], prompt_mask[i : i + step],
                            length, num_samples, eos, pad, vocab_size,
                        )
                    )
    finally:
        for m, was_training in modes:
            m.train(was_training)
    (s_kl, s_mask), (t_kl, t_mask) = (
        (torch.cat([p[0] for p in parts[n]]), torch.cat([p[1] for p in parts[n]])) for n in ("student", "teacher")
    )
    return exaccerr_from_regrets(s_kl, t_kl, lengths, s_mask, t_mask)
