"""ImitKD (Lin et al. 2020, "Autoregressive Knowledge Distillation through Imitation Learning", Alg. 1):
the student learns from the teacher on its own prefixes as well as on the data, DAgger-style.

At step i each training sequence independently is the gold response with probability beta_i and the
student's own sample (for the same prompt) otherwise; the teacher is then queried on every prefix:

    L_i = mean over response tokens t of  D(p_teacher(. | x, y_<t) || q_student(. | x, y_<t))

with D the ``divergence`` group: the paper's token-level forward KL is the default ``fkl``. The mean
pools all response tokens of the micro-batch, as the released code does (``F.kl_div(...,
reduction="batchmean")`` and ``entropies.mean()`` over the flattened non-pad target tokens); unlike GKD
(Eq. 2), ImitKD does not normalise per sequence, so it has no ``normalize`` option. beta_i decays over
training (``schedule``):

- ``exponential`` (default, the released code's setting): beta_i = exp_base ** (-i / I), exp_base = 200,
  so beta goes from 1 to 1/200 = 0.005;
- ``linear``: beta_i = 1 - i / I,

with i the optimizer step (0-based) and I = ``decay_steps`` (null: ``train.max_steps``), beta staying
at its final value after I. The per-sequence coin flips come from the global torch RNG (saved in
checkpoints, so a resumed run repeats them). Sampling uses the student in eval mode (no dropout) with
``temperature`` / ``top_k`` / ``top_p`` (default plain sampling at temperature 1; the released IWSLT
config samples from the top 5) and at most ``max_new_tokens`` tokens; sampled tokens carry no gradient.
"""
from __future__ import annotations

import torch

from kdlab.config import ConfigError, OneOf, Range
from kdlab.data import Encoded, collate
from kdlab.generation import SAMPLING_SCHEMA, encoded_rows, generate
from kdlab.methods.base import LossOutput, Method


class ImitKD(Method):
    name = "imitkd"
    schema = {**Method.schema, "schedule": OneOf("exponential", "linear"), "exp_base": Range(1, low_open=True),
              "decay_steps": Range(1, integer=True, optional=True), **SAMPLING_SCHEMA}
    cross_tokenizer = True

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.decay_steps = cfg.decay_steps or ctx.train_cfg.max_steps
        if self.decay_steps is None:
            raise ConfigError("method=imitkd needs the length of its beta schedule: train.max_steps is null "
                              "(training by epochs), so set method.decay_steps=<optimizer steps>")

    def beta(self, step: int) -> float:
        """Probability that a sequence is the gold one at optimizer step ``step``."""
        frac = min(step / self.decay_steps, 1.0)
        return self.cfg.exp_base ** -frac if self.cfg.schedule == "exponential" else 1.0 - frac

    def mixed_batch(self, batch, from_student: torch.Tensor):
        """``batch`` with the rows flagged in ``from_student`` replaced by the student's samples."""
        rows = from_student.nonzero().squeeze(1)
        cfg, tok = self.cfg, self.ctx.tokenizer
        out = generate(self.student, tok, batch.prompt_ids[rows], batch.prompt_mask[rows],
                       max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature,
                       top_p=cfg.top_p, top_k=cfg.top_k)
        sampled = iter(encoded_rows(out, [batch.examples[i] for i in rows.tolist()] if batch.examples else None))
        items = []
        for i, flag in enumerate(from_student.tolist()):
            if flag:
                items.append(next(sampled))
            else:
                items.append(Encoded(batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist(),
                                     batch.labels[i][batch.response_mask[i]].tolist(),
                                     batch.examples[i] if batch.examples else {}))
        return collate(items, tok.pad_token_id).to(batch.input_ids.device)

    def loss(self, batch, step):
        beta = self.beta(step)
        from_student = torch.rand(len(batch)) >= beta
        if from_student.any():
            batch = self.mixed_batch(batch, from_student)
        student = self.logits(self.student, batch)
        if self.ctx.cross_tokenizer is not None:   # divergence=uld: the samples are re-tokenised for the teacher
            distill = self.ctx.divergence.objective(self.aligned_distill(student, batch), None)
        else:
            teacher = self.teacher_logits(batch)
            distill = self.ctx.divergence(student, teacher)
        return LossOutput(distill, {"distill": distill.item(), "beta": beta,
                                    "student_fraction": from_student.float().mean().item(),
                                    "response_tokens": float(batch.response_mask.sum())})


METHOD = ImitKD
