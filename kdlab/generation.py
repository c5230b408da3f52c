"""Batched generation shared by evaluation, SeqKD and the on-policy methods (GKD, ImitKD, MiniLLM, DPKD).

Two samplers, both batched over left-padded prompts with KV caches and an EOS stop, both under
``torch.no_grad()`` with the models in eval mode (no dropout while sampling):

- :func:`generate`: one model through transformers' ``generate`` (greedy or temperature / top-k /
  top-p sampling); optionally the log-probability of each generated token.
- both draw tokens with :func:`sample_rows` (inverse CDF: one uniform per row) rather than
  ``torch.multinomial`` (one exponential per vocabulary entry, a third of a CPU decoding step).
- :func:`sample_mixture`: each token drawn from the token-level mixture
  ``alpha * p_teacher + (1 - alpha) * q_student`` (MiniLLM, Gu et al. 2024, Sec. 2.3 "teacher-mixed
  sampling", alpha = 0.2), a decode loop of our own that keeps one KV cache per model, since
  ``generate`` samples from a single model.

Both return :class:`Generated` (token ids, masks, per-token log-probs); :func:`to_batch` turns it into
a training :class:`kdlab.data.Batch`, and :func:`sample_student` is the on-policy methods' one way to
replace a batch's responses (all or some rows) by the student's samples. A faster backend (e.g. vLLM on
GPU) only has to provide the same ``(prompt_ids, prompt_mask) -> Generated`` mapping.

Randomness: with ``seed`` the draw comes from a generator seeded by it; without, the seed is drawn
from the global torch RNG (one draw), so training runs stay reproducible from their checkpointed RNG
state and two calls in a row give different samples. Greedy decoding touches no RNG.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.integrations import is_deepspeed_zero3_enabled

from kdlab.config import Range

# The sampling keys of on-policy methods' configs (method.temperature, ...), checked with the method.
SAMPLING_SCHEMA = {
    "temperature": Range(0, low_open=True),
    "top_p": Range(0, 1, low_open=True),
    "top_k": Range(0, integer=True),
    "max_new_tokens": Range(1, integer=True),
}


@dataclass
class Generated:
    prompt_ids: torch.Tensor       # (B, P), left-padded
    prompt_mask: torch.Tensor      # (B, P)
    response_ids: torch.Tensor     # (B, L), right-padded with pad_id after EOS
    response_mask: torch.Tensor    # (B, L) 1 up to and including the first EOS
    # (B, L) fp32 log-probabilities of response_ids, 0 where response_mask is 0; None if not computed.
    # logprobs: under the distribution the token was drawn from (temperature applied, before top-k/top-p);
    # student_logprobs / teacher_logprobs: under each model at the sampling temperature (sample_mixture).
    logprobs: torch.Tensor | None = None
    student_logprobs: torch.Tensor | None = None
    teacher_logprobs: torch.Tensor | None = None

    def texts(self, tokenizer) -> list[str]:
        return [tokenizer.decode(ids[m.bool()], skip_special_tokens=True).strip()
                for ids, m in zip(self.response_ids, self.response_mask)]


def response_mask(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for tokens up to and including the first EOS of each row, 0 after it."""
    is_eos = (tokens == eos_id).long()
    after_eos = (is_eos.cumsum(dim=1) - is_eos) > 0
    return (~after_eos).long()


def _seed(seed: int | None) -> int:
    return int(torch.randint(0, 2**62, ())) if seed is None else seed


def _masked_logprobs(steps: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    return torch.stack(steps, dim=1).float().masked_fill(mask == 0, 0.0)   # -inf after EOS would give NaN


@torch.no_grad()
def generate(model, tokenizer, prompt_ids, prompt_mask, *, max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, no_repeat_ngram_size: int = 0,
             seed: int | None = None, return_logprobs: bool = False, num_beams: int = 1) -> Generated:
    """Greedy or sampled continuations of a left-padded batch of prompts with transformers' ``generate``.

    ``return_logprobs`` adds ``Generated.logprobs``: ``log softmax(z / T)`` at each generated token, from
    the raw logits ``z`` (``output_logits``), with ``T`` the sampling temperature (1 when greedy).
    ``num_beams > 1`` is beam search (SeqKD's mode approximation); its log-probs are not returned.
    Sampling runs as greedy search whose last logits processor draws the token
    (:class:`InverseCDFSampling`): the same distribution as transformers' sampler, another stream.
    """
    if num_beams > 1 and (return_logprobs or do_sample):
        raise ValueError("beam search (num_beams > 1) is greedy and returns no log-probs: pass do_sample=False, "
                         "return_logprobs=False, or num_beams=1")
    was_training = model.training
    model.eval()
    # sampling runs as greedy search whose last logits processor draws the token (InverseCDFSampling);
    # temperature/top-k/top-p are None so that the model's generation_config adds no warper of its own
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, no_repeat_ngram_size=no_repeat_ngram_size or None,
                  return_dict_in_generate=True, output_logits=return_logprobs, num_beams=num_beams,
                  temperature=None, top_p=None, top_k=None)
    if do_sample:
        kwargs["logits_processor"] = LogitsProcessorList([InverseCDFSampling(temperature, top_k, top_p)])
    devices = [prompt_ids.device] if prompt_ids.device.type == "cuda" else []
    seed = _seed(seed) if do_sample else 0
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
    finally:
        model.train(was_training)
    new = out.sequences[:, prompt_ids.shape[1]:]
    mask = response_mask(new, tokenizer.eos_token_id)
    logprobs = None
    if return_logprobs:
        scale = temperature if do_sample else 1.0
        logprobs = _masked_logprobs([F.log_softmax(z.float() / scale, dim=-1).gather(1, tok[:, None]).squeeze(1)
                                     for z, tok in zip(out.logits, new.unbind(1))], mask)
    return Generated(prompt_ids, prompt_mask, new.masked_fill(mask == 0, tokenizer.pad_token_id), mask, logprobs)


def filter_top_k_top_p(probs: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Zero all but the ``top_k`` most likely tokens (0: all), then all but the smallest set whose mass
    reaches ``top_p`` (the most likely token always stays); renormalise. ``probs (B, V)``."""
    if top_k and top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if top_p < 1.0:
        probs = probs / probs.sum(dim=-1, keepdim=True)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs   # mass of the more likely tokens
        probs = probs.masked_fill(torch.zeros_like(probs, dtype=torch.bool).scatter(1, order, mass_before >= top_p), 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def ranks_finished(finished: torch.Tensor) -> bool:
    """Whether decoding may stop: this rank's rows are all done and, under ZeRO-3 with several ranks
    (every forward gathers parameter shards collectively), every other rank's are too, as transformers'
    ``generate(synced_gpus=True)`` does; a rank that is done keeps stepping, its rows padded."""
    done = bool(finished.all())
    if is_deepspeed_zero3_enabled() and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([0.0 if done else 1.0], device=finished.device)
        dist.all_reduce(flag)   # the number of ranks still decoding
        return flag.item() == 0
    return done


def sample_rows(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``probs (B, V)`` (non-negative rows), drawn by inverse-CDF sampling: one
    uniform per row, searched in the row's cumulative sum (float64). Exact, like ``torch.multinomial``,
    which instead draws one exponential per vocabulary entry: a third of a batch-16 decoding step of
    the 6-layer student on a CPU at V = 49,152 (profiled)."""
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator)
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
    return index.clamp_(max=probs.shape[-1] - 1)


class InverseCDFSampling(LogitsProcessor):
    """Sampling for transformers' ``generate`` run in greedy mode: temperature, top-k, top-p, then
    :func:`sample_rows` draws the token and every other score becomes -inf, so the greedy argmax
    returns the draw. (The processors ``generate`` adds itself, e.g. no-repeat-n-gram bans, run first.)"""

    def __init__(self, temperature: float, top_k: int, top_p: float):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = filter_top_k_top_p(F.softmax(scores.float() / self.temperature, dim=-1), self.top_k, self.top_p)
        token = sample_rows(probs)
        return torch.full_like(scores, float("-inf")).scatter_(1, token[:, None], 0.0)


def _step(model, ids, mask, positions, cache, vocab: int, temperature: float):
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    return F.log_softmax(out.logits[:, -1, :vocab].float() / temperature, dim=-1), out.past_key_values


@torch.no_grad()
def sample_mixture(student, teacher, tokenizer, prompt_ids, prompt_mask, *, alpha: float, max_new_tokens: int,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> Generated:
    """Sample responses token by token from ``alpha * p_teacher + (1 - alpha) * q_student``.

    MiniLLM (Gu et al. 2024, Sec. 2.3): mixing the teacher into the student's sampling distribution
    keeps early, poor students from producing degenerate rollouts. Both distributions are taken at
    ``temperature`` over the tokenizer's vocabulary (LM-head padding rows dropped); top-k / top-p
    then truncate the mixture. Returns, besides the tokens, ``logprobs`` (of the mixture),
    ``student_logprobs`` and ``teacher_logprobs`` of each sampled token (0 after EOS), e.g. for
    MiniLLM's importance weight ``q / ((1 - alpha) q + alpha p)``.

    Left padding: positions count real tokens only (``cumsum(mask) - 1``), and the attention mask
    grows by one column per generated token, as transformers' ``generate`` does.
    """
    models = (student, teacher)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    vocab, pad, eos = len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id
    rng = torch.Generator(device=prompt_ids.device).manual_seed(_seed(seed))
    mask = prompt_mask.long()
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    ids, caches = prompt_ids, [None, None]
    finished = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    tokens, lp_mix, lp_student, lp_teacher = [], [], [], []
    try:
        for _ in range(max_new_tokens):
            (logq, caches[0]), (logp, caches[1]) = (_step(m, ids, mask, positions, c, vocab, temperature)
                                                   for m, c in zip(models, caches))
            mixture = alpha * logp.exp() + (1 - alpha) * logq.exp()
            token = sample_rows(filter_top_k_top_p(mixture, top_k, top_p), rng)
            token = token.masked_fill(finished, pad)
            pick = token[:, None]
            tokens.append(token)
            lp_mix.append(mixture.gather(1, pick).squeeze(1).log())
            lp_student.append(logq.gather(1, pick).squeeze(1))
            lp_teacher.append(logp.gather(1, pick).squeeze(1))
            finished |= token == eos
            if ranks_finished(finished):
                break
            ids = pick
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            positions = positions[:, -1:] + 1
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    new = torch.stack(tokens, dim=1)
    rmask = response_mask(new, eos)
    return Generated(prompt_ids, prompt_mask, new.masked_fill(rmask == 0, pad), rmask,
                     _masked_logprobs(lp_mix, rmask), _masked_logprobs(lp_student, rmask),
                     _masked_logprobs(lp_teacher, rmask))


def encoded_rows(generated: Generated, examples=None) -> list:
    """One :class:`kdlab.data.Encoded` per row: the prompt without padding, the response up to and
    including EOS (or up to the length limit)."""
    from kdlab.data import Encoded

    examples = examples or [{}] * len(generated.prompt_ids)
    rows = zip(generated.prompt_ids, generated.prompt_mask.bool(), generated.response_ids,
               generated.response_mask.bool(), examples)
    return [Encoded(p[pm].tolist(), r[rm].tolist(), ex) for p, pm, r, rm, ex in rows]


def to_batch(generated: Generated, pad_id: int, examples=None):
    """A training :class:`kdlab.data.Batch` of prompt + sampled response, laid out exactly as data batches
    (right-padded; ``labels`` / ``response_mask`` over the sampled tokens including EOS, none after it),
    on the prompts' device. Token ids only: no gradient can flow through the sample."""
    from kdlab.data import collate

    return collate(encoded_rows(generated, examples), pad_id).to(generated.prompt_ids.device)


def sampling_settings(cfg) -> dict:
    """The :data:`SAMPLING_SCHEMA` keys of a method's config, as keyword arguments of :func:`sample_student`."""
    return {key: cfg[key] for key in SAMPLING_SCHEMA}


def sample_student(student, tokenizer, batch, *, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, rows: torch.Tensor | None = None):
    """``batch`` with the gold responses of the rows flagged in ``rows`` (bool ``(B,)``; None: every row)
    replaced by the student's own samples for the same prompts: the on-policy data of GKD, ImitKD and
    DPKD, as a training :class:`kdlab.data.Batch` laid out like a data batch (the other rows unchanged).

    One :func:`generate` call on the flagged prompts draws its seed from the global torch RNG, which
    checkpoints save, so a resumed run repeats the samples. The samples are token ids: no gradient flows
    through sampling, only through the logits the caller then computes on them."""
    from kdlab.data import Encoded, collate

    if rows is None:
        prompt_ids, prompt_mask = batch.prompt_ids, batch.prompt_mask
    else:
        picked = rows.nonzero().squeeze(1)
        prompt_ids, prompt_mask = batch.prompt_ids[picked], batch.prompt_mask[picked]
    out = generate(student, tokenizer, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, do_sample=True,
                   temperature=temperature, top_p=top_p, top_k=top_k)
    flags = [True] * len(batch) if rows is None else rows.tolist()
    examples = batch.examples or [{}] * len(batch)
    sampled = iter(encoded_rows(out, [ex for ex, flag in zip(examples, flags) if flag]))
    items = [next(sampled) if flag else
             Encoded(batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist(),
                     batch.labels[i][batch.response_mask[i]].tolist(), examples[i])
             for i, flag in enumerate(flags)]
    return collate(items, tokenizer.pad_token_id).to(batch.input_ids.device)
