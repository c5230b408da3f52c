"""Word-level KD (Hinton et al. 2015; Kim & Rush 2016's word-level form):

    L = alpha * D(p_teacher || q_student) + (1 - alpha) * MLE(gold response)

averaged over response tokens, where D is the ``divergence`` group (fkl, rkl, jsd, tvd, sfkl, srkl,
akl), so ``method=kd divergence=rkl`` is the seed papers' "Reverse KD". The teacher runs once per
micro-batch without gradients, and both models' LM heads run only at response positions. With a cached
(``teacher.cache``) or served (``teacher.serve.url``) teacher no teacher runs here: D takes its top-k
log-probs renormalised over the k tokens (an approximation, README "Teachers"), and a served teacher is
asked for the next micro-batch's while the student trains on this one (:meth:`look_ahead`).

Across tokenizers (``divergence=uld`` / ``uld_hybrid``): D is taken over the aligned groups of the
response re-tokenised for the teacher (:mod:`kdlab.alignment`) and the loss is ULD's own weighting
(Boizard et al. 2024, Eq. 3), ``distill_weight * ULD + ce_weight * MLE``, in place of alpha.

Dropout stays on in the student (as in LMOps' and DistiLLM's KD baselines): KD samples nothing.

Where kdlab still departs from the reference code:

- LMOps' KD loss is the cross-entropy ``-sum p log q`` (the forward KL plus the teacher's entropy): the
  same gradient, a different logged value. DistiLLM's default is ``alpha = 1`` (distillation only),
  LMOps' 0.5 (kdlab's default).
- ``divergence.tau`` scales both models' logits; Hinton et al.'s ``tau^2`` factor is off unless the
  divergence config asks for it, and the MLE term never sees tau.
- Across tokenizers the loss follows ULD's paper weighting, pooled over all aligned groups of the batch
  (the ULD authors' code averages per sequence; :mod:`kdlab.divergences.uld`).
"""
from __future__ import annotations

from kdlab.config import Range
from kdlab.methods.base import LossOutput, Method


class KD(Method):
    name = "kd"
    schema = {**Method.schema, "alpha": Range(0, 1)}
    uses_divergence = True
    # the teacher's distribution at the data's responses (top-k from a cache or a server); across tokenizers
    # the full distribution over the teacher's own tokens (ULD), on the response re-tokenised for it
    teacher_needs = frozenset({"data_distribution"})
    teacher_needs_across = frozenset({"full_distribution", "other_tokenizer"})

    def look_ahead(self, batch):
        if self.ctx.cross_tokenizer is None:
            self.teacher_io.prefetch(batch)

    def loss(self, batch, step):
        student = self.logits(self.student, batch)
        if self.ctx.cross_tokenizer is not None:
            distill, nll = self.aligned_distill(student, batch), self.nll(student, batch)
            loss = self.ctx.divergence.objective(distill, nll)
            return LossOutput(loss, {"distill": distill.item(), "nll": nll.item()})
        teacher = self.teacher_targets(batch)
        distill = self.ctx.divergence(student, teacher)
        nll = self.nll(student, batch)
        alpha = self.cfg.alpha
        return LossOutput(alpha * distill + (1 - alpha) * nll, {"distill": distill.item(), "nll": nll.item()})


METHOD = KD
