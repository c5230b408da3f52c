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
"""
from __future__ import annotations

from kdlab.config import Range
from kdlab.methods.base import LossOutput, Method


class KD(Method):
    name = "kd"
    schema = {**Method.schema, "alpha": Range(0, 1)}
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
