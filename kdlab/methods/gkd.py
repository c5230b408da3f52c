"""Generalized Knowledge Distillation (Agarwal et al. 2024, "On-Policy Distillation of Language Models:
Learning from Self-Generated Mistakes", Algorithm 1, Eqs. 2-3):

    per micro-batch, u ~ U(0, 1);  if u < lambda: y ~ q_student(. | x) (on-policy), else y = gold response
    D(y | x) = (1 / L_y) sum_n D(p_teacher(. | x, y_<n) || q_student(. | x, y_<n))        (Eq. 2)
    L = mean over the micro-batch's sequences of D(y | x)                                   (Eq. 3)

``normalize``: ``sequence`` (default, the paper's Eq. 2) averages the token divergences within each
sequence and then over sequences; ``token`` pools all response tokens of the micro-batch into one mean,
as TRL's ``GKDTrainer`` does (its ``generalized_jsd_loss`` with ``reduction="batchmean"``). Both keep
the divergence's chunked memory layout: per-sequence normalisation weights the per-token values by
``1 / (L_y B)``.

``lmbda`` is the student-data fraction (1: fully on-policy, 0: supervised KD on the data). One draw
per micro-batch decides for all its sequences, as TRL's ``GKDTrainer`` does; it comes from the global
torch RNG, which the checkpoint saves, so a resumed run repeats the same draws and samples. The
sampled tokens are ids: no gradient flows through sampling, only through the student's logits on
the sampled sequence. The student samples in eval mode (no dropout) at ``temperature`` (default 1.0,
the paper's gamma = 1 during training, Sec. 3.1); the divergence has its own temperature,
``divergence.tau``, applied to teacher and student alike.

D is the ``divergence`` group; ``method=gkd`` selects GKD's generalized JSD(beta) (Eq. 1,
``divergence=jsd``, ``divergence.beta`` 0.5), and ``divergence=<name>`` picks another. With
``divergence=fkl normalize=token``, GKD with lambda = 0 is exactly ``method=kd method.alpha=1``.

Defaults: lambda 0.5, beta 0.5, 128 new tokens, top-k 0, top-p 1 (TRL's; the paper sweeps lambda and
finds fully on-policy, lambda = 1, often best), temperature 1.0 and per-sequence normalisation (the
paper's). TRL's ``GKDTrainer`` samples at 0.9 and pools tokens: ``method.temperature=0.9
method.normalize=token``. Departure from the paper: its option of teacher-generated outputs as the
off-policy data is left to ``method=seqkd``.
"""
from __future__ import annotations

import torch

from kdlab.config import OneOf, Range
from kdlab.generation import SAMPLING_SCHEMA, sample_student, sampling_settings
from kdlab.methods.base import LossOutput, Method


class GKD(Method):
    name = "gkd"
    schema = {**Method.schema, "lmbda": Range(0, 1), "normalize": OneOf("sequence", "token"), **SAMPLING_SCHEMA}
    # the teacher's distribution on the student's own samples (live or served); across tokenizers its full
    # distribution over its own tokens (ULD)
    teacher_needs = frozenset({"distribution"})
    teacher_needs_across = frozenset({"full_distribution", "other_tokenizer"})

    def loss(self, batch, step):
        on_policy = bool(torch.rand(()) < self.cfg.lmbda)
        if on_policy:
            batch = sample_student(self.student, self.ctx.tokenizer, batch, **sampling_settings(self.cfg))
        student = self.logits(self.student, batch)
        distill = self.response_divergence(student, batch, per_sequence=self.cfg.normalize == "sequence")
        return LossOutput(distill, {"distill": distill.item(), "on_policy": float(on_policy),
                                    "response_tokens": float(batch.response_mask.sum())})


METHOD = GKD
