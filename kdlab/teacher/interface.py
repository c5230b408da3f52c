"""What a teacher provides, whatever runs it: the interface methods ask through, and the live teacher.

A teacher is one of three kinds (:func:`kdlab.teacher.teacher_kind` decides which, from the config):

- ``live``: the model in this process (:class:`LiveTeacher`);
- ``cached``: its top-k log-probs on the training data, on disk (``teacher.cache``,
  :class:`kdlab.teacher.cached.CachedTeacher`);
- ``served``: an OpenAI-compatible server (``teacher.serve.url``, :class:`kdlab.teacher.served.ServedTeacher`).

Each kind states what it can give (:attr:`Teacher.provides`, names from :data:`CAPABILITIES`); each
method states what it needs (``Method.teacher_needs``, and ``Method.teacher_needs_across`` across
tokenizers). :func:`kdlab.teacher.check_teacher` compares the two before anything loads. Positions
follow :func:`kdlab.modeling.response_logits`: the rows of a batch's ``response_mask``, row-major; row
``t`` of a sequence is the distribution of its token ``t + 1`` given the tokens up to ``t``.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from kdlab.divergences import TopKLogProbs, topk_logprobs

# What a teacher can give, the most demanding last; a method's teacher_needs names these (the text is the
# refusal's wording).
CAPABILITIES = {
    "data_distribution": "the teacher's next-token distribution at the training data's response positions",
    "distribution": "the teacher's next-token distribution at the positions of any sequence (the student's own "
                    "samples)",
    "own_token_logprobs": "the teacher's log-probabilities of a sequence's own tokens",
    "generation": "the teacher's generations",
    "full_distribution": "the teacher's full distribution over the vocabulary (all its logits), not its top-k",
    "weights": "the teacher's weights in this process",
    "other_tokenizer": "a teacher on its own tokenizer (its full distribution over its own tokens)",
}


class Teacher:
    """What a teacher provides (see the module docstring). Subclasses implement what they ``provide``."""

    kind: ClassVar[str]
    provides: ClassVar[frozenset[str]]
    model = None             # the nn.Module, live teachers only (OKD's module, MiniLLM's mixture sampling)

    def distribution(self, batch):
        """The teacher at ``batch``'s response positions, as a divergence takes it: logits ``(N, V)`` (live) or
        its top-k :class:`TopKLogProbs` ``(N, k)`` with the tail's mass (cached, served)."""
        raise NotImplementedError

    def logits(self, batch) -> torch.Tensor:
        """Full logits ``(N, V)`` at the response positions (live only)."""
        raise NotImplementedError(f"a {self.kind} teacher has no full logits")

    def token_logprobs(self, batch) -> torch.Tensor:
        """``log p(y_{t+1} | y_<=t)`` ``(N,)``: the teacher's log-probability of each response token."""
        raise NotImplementedError(f"a {self.kind} teacher gives no log-probabilities of given tokens")

    def generate(self, tokenizer, prompt_ids, prompt_mask, **settings):
        """Continuations of left-padded prompts (:class:`kdlab.generation.Generated`); ``settings`` as
        :func:`kdlab.generation.generate` takes them."""
        raise NotImplementedError(f"a {self.kind} teacher does not generate")

    def prefetch(self, batch) -> None:
        """Start computing :meth:`distribution` for a batch that comes next (served teachers; others: nothing)."""


class LiveTeacher(Teacher):
    """The teacher model in this process: everything, exactly."""

    kind = "live"
    provides = frozenset(CAPABILITIES)

    def __init__(self, model, vocab_size: int):
        self.model, self.vocab_size = model, vocab_size

    @torch.no_grad()
    def logits(self, batch) -> torch.Tensor:
        from kdlab.modeling import response_logits

        return response_logits(self.model, batch.input_ids, batch.attention_mask, batch.response_mask,
                               self.vocab_size)

    def distribution(self, batch) -> torch.Tensor:
        return self.logits(batch)

    def token_logprobs(self, batch) -> torch.Tensor:
        logits = self.logits(batch)
        return F.log_softmax(logits.float(), dim=-1).gather(-1, batch.labels[batch.response_mask][:, None]).squeeze(-1)

    def topk(self, batch, k: int) -> TopKLogProbs:
        return topk_logprobs(self.logits(batch), k)

    def generate(self, tokenizer, prompt_ids, prompt_mask, **settings):
        from kdlab.generation import generate

        return generate(self.model, tokenizer, prompt_ids, prompt_mask, **settings)


def as_teacher(teacher, vocab_size: int) -> Teacher | None:
    """A :class:`Teacher` for what a method was given: a Teacher as it is, a bare model as the live teacher."""
    if teacher is None or isinstance(teacher, Teacher):
        return teacher
    return LiveTeacher(teacher, vocab_size)
