"""DPKD: Direct Preference Knowledge Distillation (Li et al. 2024, arXiv:2406.19774).

The teacher ``p`` is the reference model of a DPO-style preference in favour of the teacher's output
``y_t`` over the student's own sample ``y_s``, both length-normalised (the paper's Eq. for L_DPKD)::

    h = (1/|y_t|) log q_theta(y_t|x)/p(y_t|x) - (1/|y_s|) log q_theta(y_s|x)/p(y_s|x)
    L = kd_ratio * L_pref + lm_coef * MLE(gold response)

``method.preference`` picks ``L_pref`` (``l_c, l_r`` = length-normalised student log-likelihoods of the
chosen/rejected response, ``h`` as above, ``beta = method.beta``):

- ``dpkd``: ``-log sigmoid(beta * h)`` (the paper; DPO's loss with the teacher as reference)
- ``ipo``: ``(h - 1 / (2 beta))**2`` (Azar et al. 2024)
- ``cpo``: ``-log sigmoid(beta * (l_c - l_r)) - l_c`` (Xu et al. 2024: reference-free + NLL of the chosen)
- ``simpo``: ``-log sigmoid(beta * (l_c - l_r) - gamma)`` (Meng et al. 2024, ``gamma = method.simpo_gamma``)

``method.level``:

- ``sequence`` (default; the method as the paper states it): ``y_t`` is the teacher's **greedy**
  response to the prompt (at most ``method.max_new_tokens`` tokens; null: the longest gold response of
  the batch), generated once per prompt and cached in method state (it only depends on the
  frozen teacher, so re-generating it every epoch would be wasted work; greedy makes it the teacher's
  mode and the cache exact). ``method.chosen=gold`` uses the dataset's gold response instead (no
  teacher generation at all). ``y_s`` is a fresh temperature-``method.temperature`` sample of the
  current student every step (on-policy, as the rejected side must track the student).
- ``token`` (the authors' released code): on the gold response under teacher forcing, every position
  is one preference pair with ``|y| = 1``: the teacher's argmax token is chosen, the student's argmax
  token rejected. Positions where both agree give ``h = 0`` (no gradient for ``dpkd``) and are kept
  in the mean. No generation: one student and one teacher forward per step.

Logs: ``preference``, ``nll``, the implicit rewards ``reward_chosen = beta * (l_c - lp_c)``,
``reward_rejected``, their margin and accuracy (margin > 0), and ``rkl``, the exact per-token reverse
KL ``KL(q||p)`` of the next-token distributions along the student's samples (sequence level) or the
gold responses (token level).
Defaults follow the authors' released code where the paper is silent: beta 0.1, kd_ratio 0.5, lm_coef 0.5,
lr 5e-4.
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from kdlab.config import OneOf, Range, Type
from kdlab.data import Encoded, collate
from kdlab.generation import encoded_rows, generate, to_batch
from kdlab.methods.base import LossOutput, Method

PREFERENCES = ("dpkd", "ipo", "cpo", "simpo")


def preference_loss(form: str, chosen_q, rejected_q, chosen_p, rejected_p, beta: float, gamma: float = 0.0):
    """Per-pair preference loss from length-normalised log-likelihoods (student ``q``, teacher ``p``)."""
    h = (chosen_q - chosen_p) - (rejected_q - rejected_p)
    if form == "dpkd":
        return -F.logsigmoid(beta * h)
    if form == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if form == "cpo":
        return -F.logsigmoid(beta * (chosen_q - rejected_q)) - chosen_q
    if form == "simpo":
        return -F.logsigmoid(beta * (chosen_q - rejected_q) - gamma)
    raise ValueError(f"unknown preference {form!r}; choose one of {PREFERENCES}")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def per_sequence_mean(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean of per-token ``values (N,)`` (row-major over ``response_mask (B, T)``) within each row."""
    rows = response_mask.nonzero()[:, 0]
    sums = torch.zeros(response_mask.shape[0], dtype=values.dtype, device=values.device).index_add(0, rows, values)
    return sums / response_mask.sum(dim=1).clamp(min=1)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Exact per-position ``KL(q || p) = sum_v q_v (log q_v - log p_v)``."""
    logq = F.log_softmax(student_logits.float(), dim=-1)
    logp = F.log_softmax(teacher_logits.float(), dim=-1)
    return (logq.exp() * (logq - logp)).sum(-1)


def prompt_key(prompt_ids: list[int]) -> str:
    return hashlib.sha1(str(prompt_ids).encode()).hexdigest()


class DPKD(Method):
    name = "dpkd"
    schema = {**Method.schema, "beta": Range(0, low_open=True), "kd_ratio": Range(0), "lm_coef": Range(0),
              "preference": OneOf(*PREFERENCES), "level": OneOf("sequence", "token"),
              "chosen": OneOf("teacher", "gold"), "simpo_gamma": Range(0),
              "max_new_tokens": Range(1, integer=True, optional=True), "temperature": Range(0, low_open=True),
              "cache_teacher": Type(bool)}

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.teacher_responses: dict[str, list[int]] = {}

    def state_dict(self) -> dict:
        return {"teacher_responses": self.teacher_responses}

    def load_state_dict(self, state: dict) -> None:
        self.teacher_responses = dict(state.get("teacher_responses", {}))

    def loss(self, batch, step):
        if self.cfg.level == "token":
            return self.token_loss(batch)
        return self.sequence_loss(batch)

    # -- sequence level (the paper) ---------------------------------------------------------------
    def new_tokens(self, batch) -> int:
        """``method.max_new_tokens``, or (null) the longest gold response of the batch: the dataset sets
        the length scale of the task (and keeps smoke runs on tiny models fast)."""
        return self.cfg.max_new_tokens or int(batch.response_mask.sum(dim=1).max())

    def chosen_batch(self, batch):
        if self.cfg.chosen == "gold":
            return batch
        prompts = [ids[m.bool()].tolist() for ids, m in zip(batch.prompt_ids, batch.prompt_mask)]
        keys = [prompt_key(p) for p in prompts]
        fresh = {}
        missing = [i for i, k in enumerate(keys) if k not in self.teacher_responses]
        if missing:
            generated = generate(self.teacher, self.ctx.tokenizer, batch.prompt_ids[missing],
                                 batch.prompt_mask[missing], max_new_tokens=self.new_tokens(batch))
            fresh = {keys[i]: row.response_ids for i, row in zip(missing, encoded_rows(generated))}
            if self.cfg.cache_teacher:
                self.teacher_responses.update(fresh)
        items = [Encoded(p, fresh.get(k) or self.teacher_responses[k], ex)
                 for p, k, ex in zip(prompts, keys, batch.examples)]
        return collate(items, self.ctx.tokenizer.pad_token_id).to(batch.input_ids.device)

    def sequence_scores(self, seqs):
        """Length-normalised log-likelihoods under student (with grad) and teacher, plus the logits."""
        student = self.logits(self.student, seqs)
        teacher = self.teacher_logits(seqs)
        targets = seqs.labels[seqs.response_mask]
        q = per_sequence_mean(token_logprobs(student, targets), seqs.response_mask)
        p = per_sequence_mean(token_logprobs(teacher, targets), seqs.response_mask)
        return q, p, student, teacher

    def sequence_loss(self, batch):
        cfg, tok = self.cfg, self.ctx.tokenizer
        chosen = self.chosen_batch(batch)
        sample = generate(self.student, tok, batch.prompt_ids, batch.prompt_mask, max_new_tokens=self.new_tokens(batch),
                          do_sample=True, temperature=cfg.temperature)
        rejected = to_batch(sample, tok.pad_token_id, batch.examples)
        cq, cp, c_student, _ = self.sequence_scores(chosen)
        rq, rp, r_student, r_teacher = self.sequence_scores(rejected)
        pref = preference_loss(cfg.preference, cq, rq, cp, rp, cfg.beta, cfg.simpo_gamma).mean()
        gold = c_student if chosen is batch else self.logits(self.student, batch)
        nll = self.nll(gold, batch)
        with torch.no_grad():
            rkl = reverse_kl(r_student, r_teacher).mean()
        return self.combine(pref, nll, cq, rq, cp, rp, rkl)

    # -- token level (the released code) ------------------------------------------------------------
    def token_loss(self, batch):
        cfg = self.cfg
        student = self.logits(self.student, batch)
        teacher = self.teacher_logits(batch)
        chosen_tok, rejected_tok = teacher.argmax(-1), student.detach().argmax(-1)
        cq, rq = token_logprobs(student, chosen_tok), token_logprobs(student, rejected_tok)
        cp, rp = token_logprobs(teacher, chosen_tok), token_logprobs(teacher, rejected_tok)
        pref = preference_loss(cfg.preference, cq, rq, cp, rp, cfg.beta, cfg.simpo_gamma).mean()
        nll = self.nll(student, batch)
        with torch.no_grad():
            rkl = reverse_kl(student, teacher).mean()
        return self.combine(pref, nll, cq, rq, cp, rp, rkl)

    def combine(self, pref, nll, cq, rq, cp, rp, rkl) -> LossOutput:
        beta = self.cfg.beta
        with torch.no_grad():
            r_c, r_r = beta * (cq - cp), beta * (rq - rp)
        logs = {"preference": pref.item(), "nll": nll.item(), "reward_chosen": r_c.mean().item(),
                "reward_rejected": r_r.mean().item(), "reward_margin": (r_c - r_r).mean().item(),
                "reward_accuracy": (r_c > r_r).float().mean().item(), "rkl": rkl.item()}
        return LossOutput(self.cfg.kd_ratio * pref + self.cfg.lm_coef * nll, logs)


METHOD = DPKD
