"""Generalized Knowledge Distillation (Agarwal et al. 2024, "On-Policy Distillation of Language Models:
Learning from Self-Generated Mistakes", Algorithm 1):

    per micro-batch, u ~ U(0, 1);  if u < lambda: y ~ q_student(. | x) (on-policy), else y = gold response
    L = mean over response tokens t of  D(p_teacher(. | x, y_<t) || q_student(. | x, y_<t))

``lmbda`` is the student-data fraction (1: fully on-policy, 0: supervised KD on the data). One draw
per micro-batch decides for all its sequences, as TRL's ``GKDTrainer`` does; it comes from the global
torch RNG, which the checkpoint saves, so a resumed run repeats the same draws and samples. The
sampled tokens are ids: no gradient flows through sampling, only through the student's logits on
the sampled sequence. The student samples in eval mode (no dropout), with the sampling temperature
``temperature`` (the divergence has its own temperature, ``divergence.tau``, applied to teacher and
student alike).

D is the ``divergence`` group. GKD's generalized JSD(beta) is ``divergence=jsd`` (``divergence.beta``,
0.5 by default): run ``method=gkd divergence=jsd``; the run's default divergence is fkl, which makes
GKD with lambda = 0 exactly ``method=kd method.alpha=1``.

Defaults are TRL's (lambda 0.5, beta 0.5, sampling temperature 0.9, 128 new tokens, top-k 0, top-p 1);
the paper sweeps lambda and finds fully on-policy (lambda = 1) often best. Departure from the paper:
its option of teacher-generated outputs as the off-policy data is left to ``method=seqkd``.
"""
from __future__ import annotations

import torch

from kdlab.config import Range
from kdlab.generation import SAMPLING_SCHEMA, sample_student
from kdlab.methods.base import LossOutput, Method


class GKD(Method):
    name = "gkd"
    schema = {**Method.schema, "lmbda": Range(0, 1), **SAMPLING_SCHEMA}
    cross_tokenizer = True

    def loss(self, batch, step):
        on_policy = bool(torch.rand(()) < self.cfg.lmbda)
        if on_policy:
            batch = sample_student(self.student, self.ctx.tokenizer, batch, self.cfg)
        student = self.logits(self.student, batch)
        if self.ctx.cross_tokenizer is not None:   # divergence=uld: the samples are re-tokenised for the teacher
            distill = self.ctx.divergence.objective(self.aligned_distill(student, batch), None)
        else:
            teacher = self.teacher_logits(batch)
            distill = self.ctx.divergence(student, teacher)
        return LossOutput(distill, {"distill": distill.item(), "on_policy": float(on_policy),
                                    "response_tokens": float(batch.response_mask.sum())})


METHOD = GKD
