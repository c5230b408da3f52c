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

Dropout: ``method.disable_dropout`` defaults to false: the released code (LMOps ``dpkd/main.py``) trains
in ``model.train()`` mode, dropout on, and its token-level loss samples nothing. At sequence level the
rejected sample is drawn in eval mode and scored with dropout; DPKD's preference compares the student
with the frozen teacher reference, not with the sampling policy, so no ratio is biased. ``true`` zeroes it.

Where kdlab still departs from the paper or the released code:

- ``y_t`` is the teacher's greedy response (the paper says "the teacher's output" without a decoding
  rule), generated at most once per prompt.
- The released code's token level runs its log-softmaxes in bfloat16 and offers label smoothing and
  DPOP; kdlab computes in float32 and has neither. Its ``simpo`` divides the DPO loss by the student's
  argmax-run length / 256; kdlab's ``simpo`` is Meng et al.'s reference-free margin form.
- The sequence-level student sample is drawn every step at ``temperature`` with no top-k/top-p (the paper
  gives no sampling settings).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdlab.config import OneOf, Range, Type
from kdlab.data import Encoded, collate
from kdlab.generation import encoded_rows, sample_student
from kdlab.methods.base import LossOutput, Method, per_sequence_mean, reverse_kl, token_logprobs
from kdlab.modeling import disable_dropout

PREFERENCES = ("dpkd", "ipo", "cpo", "simpo")


@dataclass
class PreferenceScores:
    """The four length-normalised log-likelihoods of a batch of preference pairs ``(B,)`` (one per pair):
    ``l_c``, ``l_r`` (student ``q_theta``, with gradient) and ``lp_c``, ``lp_r`` (teacher ``p``, the
    reference) of the chosen and the rejected response."""
    chosen_student: torch.Tensor
    rejected_student: torch.Tensor
    chosen_teacher: torch.Tensor
    rejected_teacher: torch.Tensor

    def margin(self) -> torch.Tensor:
        """``h = (l_c - lp_c) - (l_r - lp_r)``: how much more the student prefers the chosen response
        than the teacher does (the paper's implicit-reward margin, up to beta)."""
        return (self.chosen_student - self.chosen_teacher) - (self.rejected_student - self.rejected_teacher)


def preference_loss(form: str, scores: PreferenceScores, beta: float, gamma: float = 0.0) -> torch.Tensor:
    """Per-pair preference loss ``L_pref`` of ``method.preference`` (the forms in the module docstring)."""
    chosen, rejected = scores.chosen_student, scores.rejected_student
    if form == "dpkd":
        return -F.logsigmoid(beta * scores.margin())
    if form == "ipo":
        return (scores.margin() - 1 / (2 * beta)) ** 2
    if form == "cpo":
        return -F.logsigmoid(beta * (chosen - rejected)) - chosen
    if form == "simpo":
        return -F.logsigmoid(beta * (chosen - rejected) - gamma)
    raise ValueError(f"unknown preference {form!r}; choose one of {PREFERENCES}")


def sequence_logprob(logits: torch.Tensor, seqs) -> torch.Tensor:
    """``(1/|y|) log q(y|x)`` of each response of ``seqs`` from its response ``logits (N, V)``."""
    return per_sequence_mean(token_logprobs(logits, seqs.labels[seqs.response_mask]), seqs.response_mask)


def prompt_key(prompt_ids: list[int]) -> str:
    return hashlib.sha1(str(prompt_ids).encode()).hexdigest()


class DPKD(Method):
    name = "dpkd"
    # greedy teacher responses, the teacher's log-probs of both responses, and (its reverse-KL term, the
    # token level's argmax) the teacher's full distribution: live only
    teacher_needs = frozenset({"generation", "own_token_logprobs", "full_distribution"})
    teacher_needs_across = ("needs the teacher's log-probabilities of the student's own token sequences (its "
                            "preference reward), which a teacher with another tokenizer does not assign")
    schema = {**Method.schema, "beta": Range(0, low_open=True), "kd_ratio": Range(0), "lm_coef": Range(0),
              "preference": OneOf(*PREFERENCES), "level": OneOf("sequence", "token"),
              "chosen": OneOf("teacher", "gold"), "simpo_gamma": Range(0),
              "max_new_tokens": Range(1, integer=True, optional=True), "temperature": Range(0, low_open=True),
              "cache_teacher": Type(bool), "disable_dropout": Type(bool)}

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.teacher_responses: dict[str, list[int]] = {}
        if cfg.disable_dropout:
            disable_dropout(self.student)

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
            generated = self.teacher_io.generate(self.ctx.tokenizer, batch.prompt_ids[missing],
                                                 batch.prompt_mask[missing], max_new_tokens=self.new_tokens(batch))
            fresh = {keys[i]: row.response_ids for i, row in zip(missing, encoded_rows(generated))}
            if self.cfg.cache_teacher:
                self.teacher_responses.update(fresh)
        items = [Encoded(p, fresh.get(k) or self.teacher_responses[k], ex)
                 for p, k, ex in zip(prompts, keys, batch.examples)]
        return collate(items, self.ctx.tokenizer.pad_token_id).to(batch.input_ids.device)

    def sequence_scores(self, chosen, rejected):
        """The pairs' :class:`PreferenceScores`, and the logits they come from: the student's on the
        chosen responses (with gradient; the gold ones when ``method.chosen=gold``) and both models' on
        the rejected ones (for the reverse-KL log)."""
        chosen_student, chosen_teacher = self.logits(self.student, chosen), self.teacher_logits(chosen)
        rejected_student, rejected_teacher = self.logits(self.student, rejected), self.teacher_logits(rejected)
        scores = PreferenceScores(sequence_logprob(chosen_student, chosen), sequence_logprob(rejected_student, rejected),
                                  sequence_logprob(chosen_teacher, chosen), sequence_logprob(rejected_teacher, rejected))
        return scores, chosen_student, rejected_student, rejected_teacher

    def sequence_loss(self, batch):
        chosen = self.chosen_batch(batch)
        rejected = sample_student(self.student, self.ctx.tokenizer, batch, max_new_tokens=self.new_tokens(batch),
                                  temperature=self.cfg.temperature)
        scores, chosen_student, rejected_student, rejected_teacher = self.sequence_scores(chosen, rejected)
        gold = chosen_student if chosen is batch else self.logits(self.student, batch)
        return self.combine(scores, self.nll(gold, batch), rejected_student, rejected_teacher)

    # -- token level (the released code) ------------------------------------------------------------
    def token_loss(self, batch):
        student = self.logits(self.student, batch)
        teacher = self.teacher_logits(batch)
        chosen, rejected = teacher.argmax(-1), student.detach().argmax(-1)
        scores = PreferenceScores(token_logprobs(student, chosen), token_logprobs(student, rejected),
                                  token_logprobs(teacher, chosen), token_logprobs(teacher, rejected))
        return self.combine(scores, self.nll(student, batch), student, teacher)

    def combine(self, scores: PreferenceScores, nll: torch.Tensor, student_logits, teacher_logits) -> LossOutput:
        """``kd_ratio * L_pref + lm_coef * nll``, logged with the implicit rewards and the reverse KL of the
        student's next-token distributions ``student_logits`` to the teacher's."""
        cfg = self.cfg
        preference = preference_loss(cfg.preference, scores, cfg.beta, cfg.simpo_gamma).mean()
        with torch.no_grad():
            rkl = reverse_kl(student_logits, teacher_logits).mean()
            reward_chosen = cfg.beta * (scores.chosen_student - scores.chosen_teacher)
            reward_rejected = cfg.beta * (scores.rejected_student - scores.rejected_teacher)
        logs = {"preference": preference.item(), "nll": nll.item(), "reward_chosen": reward_chosen.mean().item(),
                "reward_rejected": reward_rejected.mean().item(),
                "reward_margin": (reward_chosen - reward_rejected).mean().item(),
                "reward_accuracy": (reward_chosen > reward_rejected).float().mean().item(), "rkl": rkl.item()}
        return LossOutput(cfg.kd_ratio * preference + cfg.lm_coef * nll, logs)


METHOD = DPKD
