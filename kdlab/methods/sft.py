"""SFT: maximum likelihood on the gold responses (:class:`kdlab.methods.base.MLE`); the teacher appears
only in evaluation.

The mean token NLL over the micro-batch's response tokens, with the student's dropout on, as LMOps'
SFT baseline (``CrossEntropyLoss`` over the batch's non-pad targets, ``model.train()``): no known
departure from the reference code. It uses no divergence, whatever the ``divergence`` group says.
"""
from __future__ import annotations

from kdlab.methods.base import MLE


class SFT(MLE):
    name = "sft"


METHOD = SFT
