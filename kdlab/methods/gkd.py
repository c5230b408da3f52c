"""Generalized Knowledge Distillation (Agarwal et al. 2024, "On-Policy Distillation of Language Models:
Learning from Self-Generated Mistakes", Algorithm 1, Eqs. 2-3):

    per micro-batch, u ~ U(0, 1);  if u < lambda: y ~ q_student(. | x) (on-policy), else y = gold response
    D(y | x) = (1 / L_y) sum_n D(p_teacher(. | x, y_<n) || q_student(. | x, y_<n))        (Eq. 2)
    L = mean over the micro-batch's sequences of D(y | x)                                   (Eq. 3)

``normalize``: ``sequence`` (default, the paper's Eq. 2) averages the token divergences within each
sequence and then over sequences; ``token`` pools all response tokens of the micro-batch into one mean,
as TRL's ``GKDTrainer`` does (its ``generalized_jsd_loss`` with ``reduction="batchmean"``). Both keep
the divergence's chunked memory layout: per-sequence normalisation weights the per-token values by
``1 / (L_y B)``. Across tokenizers (``divergence=uld``/``uld_hybrid``) the aligned groups of
:mod:`kdlab.alignment` stand in for tokens: ``sequence`` is the mean over each sequence's groups and
then over the sequences that have any (Eq. 2 read on groups), ``token`` the mean over the batch's groups.

``lmbda`` is the student-data fraction (1: fully on-policy, 0: supervised KD on the data). One draw
per micro-batch decides for all its sequences, as TRL's ``GKDTrainer`` does; it comes from the global
torch RNG, which the checkpoint saves, so a resumed run repeats the same draws and samples. The
sampled tokens are ids: no gradient flows through sampling, only through the student's logits on
the sampled sequence. The student samples in eval mode (no dropout) at ``temperature`` (default 1.0,
the paper's gamma = 1 during training, Sec. 3.1); the divergence has its own temperature,
``divergence.tau``, applied to teacher and student alike.

Dropout: ``method.disable_dropout`` (default true) sets the student's dropout to 0 for the whole run, as
TRL's ``GKDTrainer`` and ``DistillationTrainer`` do by default (``disable_dropout=True``) and as the
paper's XSum and WMT runs (dropout 0.0, App. A Tables A.1, A.3; GSM8K: 0.05). The loss is the divergence
on the student's own samples, drawn without dropout: with dropout on, the distribution trained would
not be the one that produced them.

D is the ``divergence`` group; ``method=gkd`` selects GKD's generalized JSD(beta) (Eq. 1,
``divergence=jsd``, ``divergence.beta`` 0.5), and ``divergence=<name>`` picks another. With
``divergence=fkl normalize=token``, GKD with lambda = 0 is exactly ``method=kd method.alpha=1``.

Defaults: lambda 0.5, beta 0.5, 128 new tokens, top-k 0, top-p 1 (TRL's; the paper sweeps lambda and
finds fully on-policy, lambda = 1, often best), temperature 1.0 and per-sequence normalisation (the
paper's). TRL's ``GKDTrainer`` samples at 0.9 and pools tokens: ``method.temperature=0.9
method.normalize=token``.

Where kdlab still departs from the paper or TRL:

- The paper's option of teacher-generated outputs as the off-policy data is left to ``method=seqkd``.
- The on-policy draw is per micro-batch (TRL's): with ``train.grad_accum > 1`` one optimizer step mixes
  several draws, where Alg. 1 draws once per step.
- Dropout is off for every task (TRL's default); the paper used 0.05 on GSM8K
  (``method.disable_dropout=false`` with the student's own rate is the nearest kdlab setting).
- Across tokenizers (``divergence=uld``) the per-token divergence is ULD's W1 over aligned groups, an
  extension: the paper and TRL's ``GKDTrainer`` need one tokenizer.
"""
from __future__ import annotations

import torch

from kdlab.config import OneOf, Range, Type
from kdlab.generation import SAMPLING_SCHEMA, sample_student, sampling_settings
from kdlab.methods.base import LossOutput, Method
from kdlab.modeling import disable_dropout


class GKD(Method):
    name = "gkd"
    schema = {**Method.schema, "lmbda": Range(0, 1), "normalize": OneOf("sequence", "token"),
              "disable_dropout": Type(bool), **SAMPLING_SCHEMA}
    # the teacher's distribution on the student's own samples (live or served); across tokenizers its full
    # distribution over its own tokens (ULD)
    teacher_needs = frozenset({"distribution"})
    teacher_needs_across = frozenset({"full_distribution", "other_tokenizer"})
    uses_divergence = True

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        if cfg.disable_dropout:
            disable_dropout(self.student)

    def loss(self, batch, step):
        on_policy = bool(torch.rand(()) < self.cfg.lmbda)
        if on_policy:
            batch = sample_student(self.student, self.ctx.tokenizer, batch, **sampling_settings(self.cfg))
        student = self.logits(self.student, batch)
        distill = self.response_divergence(student, batch, per_sequence=self.cfg.normalize == "sequence")
        return LossOutput(distill, {"distill": distill.item(), "on_policy": float(on_policy),
                                    "response_tokens": float(batch.response_mask.sum())})


METHOD = GKD
