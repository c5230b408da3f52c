"""The cached teacher (``teacher.cache``): its top-k log-probs at the training data's response positions,
read from a :mod:`kdlab.teacher.topk_cache` folder; nothing else (no other positions, no generations)."""
from __future__ import annotations

from kdlab.divergences import TopKLogProbs
from kdlab.teacher.interface import Teacher


class CachedTeacher(Teacher):
    kind = "cached"
    provides = frozenset({"data_distribution"})

    def __init__(self, cache):
        self.cache = cache   # a kdlab.teacher.topk_cache.TeacherCache, checked against the job

    @property
    def top_k(self) -> int:
        return self.cache.top_k

    def distribution(self, batch) -> TopKLogProbs:
        return self.cache.lookup(batch)
