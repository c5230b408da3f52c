"""SFT: maximum likelihood on the gold responses (:class:`kdlab.methods.base.MLE`); the teacher appears
only in evaluation."""
from __future__ import annotations

from kdlab.methods.base import MLE


class SFT(MLE):
    name = "sft"


METHOD = SFT
