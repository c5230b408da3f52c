"""The method interface: what a distillation method optimises, not how the loop runs it.

The trainer calls :meth:`Method.loss` on each micro-batch, backpropagates the returned tensor and
steps one optimizer per entry of :meth:`Method.param_groups` (objectives of different optimizers
must touch disjoint parameters, so one backward serves all of them). Methods that sample (GKD,
ImitKD, MiniLLM, DPKD) do it inside ``loss`` under ``torch.no_grad()``; MiniLLM's SFT warm-up is a
second :class:`Phase` whose method is :class:`MLE`.

Every method module imports only this one (and library modules), never another method: the pieces
several methods share (maximum likelihood, per-token log-likelihoods, the exact reverse KL, per-sequence
means) live here.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.config import Range, check_section
from kdlab.modeling import response_logits
from kdlab.teacher.interface import CAPABILITIES, as_teacher


@dataclass
class ParamGroup:
    params: list[nn.Parameter]
    lr: float
    weight_decay: float | None = None   # None: train.weight_decay


@dataclass
class LossOutput:
    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


@dataclass
class Phase:
    """A stretch of training with its own method and length (``max_steps`` optimizer steps).

    ``keep_best_valid_loss``, for a phase before the last: every ``train.eval_every`` steps (and at its
    end) the trainer logs the student's validation loss as ``valid/<name>_loss`` and keeps the lowest-loss
    student in ``phase<i>_best/``; the next phase starts from that student, not the last one (with
    ``train.eval_every=null``, from the last). The last phase always keeps its best by ROUGE-L instead.
    """
    name: str
    method: "Method"
    max_steps: int | None = None        # None: the run's train.max_steps / epochs
    schedule: str | None = None         # None: train.schedule (MiniLLM's phase 2 is constant)
    keep_best_valid_loss: bool = False  # MiniLLM's SFT phase (Alg. 1)
    epochs: int | None = None           # the length in epochs instead of max_steps (MiniLLM's 3-epoch SFT)


@dataclass
class Context:
    """What a method is built from. ``teacher``: a :class:`kdlab.teacher.interface.Teacher` (live, cached or
    served; a bare model is taken as the live one), None for methods that need none."""
    teacher: object
    student: nn.Module
    tokenizer: object
    divergence: object
    runtime: object
    train_cfg: object
    cross_tokenizer: object = None      # a kdlab.alignment.CrossTokenizer when the divergence is (divergence=uld)


class Method:
    name: ClassVar[str]
    schema: ClassVar[dict] = {"lr": Range(0, low_open=True)}
    # True: the loss reads the ``divergence`` group; runs of other methods do not depend on it (kdlab.report
    # leaves it out of their label)
    uses_divergence: ClassVar[bool] = False
    # The method x teacher table (README), one row per method: what it needs of its teacher during training,
    # names from kdlab.teacher.interface.CAPABILITIES, checked against the teacher's kind before anything
    # loads (kdlab.teacher.check_teacher). Across tokenizers (a cross-tokenizer divergence): the needs
    # there, or a sentence saying why the method cannot distil across tokenizers.
    # The default, for a method that declares nothing: all a live teacher gives, on one tokenizer.
    teacher_needs: ClassVar[frozenset[str]] = frozenset(CAPABILITIES) - {"other_tokenizer"}
    teacher_needs_across: ClassVar[frozenset[str] | str] = "does not support a teacher with another tokenizer yet"

    def __init__(self, cfg, ctx: Context):
        self.cfg, self.ctx = cfg, ctx
        # the LM heads' rows beyond the tokenizer's vocabulary are padding and never scored
        self.vocab_size = len(ctx.tokenizer)
        self.teacher_io = as_teacher(ctx.teacher, self.vocab_size)   # what the teacher provides
        # the model itself, only for a live teacher: methods that need its weights (OKD, MiniLLM) use it
        self.teacher = None if self.teacher_io is None else self.teacher_io.model
        self.student = ctx.student
        if self.teacher_needs and self.teacher_io is None:
            raise ValueError(f"method={self.name} needs a teacher; its Context has none")

    @classmethod
    def validate(cls, cfg) -> None:
        check_section("method", cfg, cls.schema)

    def param_groups(self) -> dict[str, ParamGroup]:
        return {"student": ParamGroup([p for p in self.student.parameters() if p.requires_grad], self.cfg.lr)}

    def phases(self) -> list[Phase]:
        return [Phase(self.name, self)]

    def prepare_data(self, train_items: list) -> list:
        """The training examples this method trains on (called once before training); e.g. SeqKD
        replaces the gold responses with the teacher's."""
        return train_items

    def loss(self, batch, step: int) -> LossOutput:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def original_teacher(self):
        """A context in which ``self.teacher`` is the teacher as loaded: evaluation compares every
        method's student with the same teacher (OKD switches its online module off here)."""
        return contextlib.nullcontext()

    def save(self, out_dir) -> None:
        """Artefacts beyond the student (e.g. OKD's trained teacher module)."""

    # -- shared pieces ---------------------------------------------------------------------------
    def logits(self, model: nn.Module, batch) -> torch.Tensor:
        return response_logits(model, batch.input_ids, batch.attention_mask, batch.response_mask,
                               self.vocab_size)

    def teacher_logits(self, batch) -> torch.Tensor:
        """The teacher's full logits at the response positions (a live teacher: ``full_distribution``)."""
        return self.teacher_io.logits(batch)

    def teacher_targets(self, batch):
        """The teacher at the response positions as divergences take it: live logits ``(N, V)``, or a cached or
        served teacher's top-k (:class:`kdlab.divergences.TopKLogProbs`, ``(N, k)``)."""
        return self.teacher_io.distribution(batch)

    def look_ahead(self, batch) -> None:
        """The trainer shows the next micro-batch before this one's loss: a served teacher starts on it
        (off-policy methods, whose batches are the data's; on-policy ones sample and override nothing)."""

    def aligned_distill(self, student_logits: torch.Tensor, batch, per_sequence: bool = False) -> torch.Tensor:
        """Across tokenizers: the divergence over the aligned groups of ``batch`` re-tokenised for the
        teacher (:mod:`kdlab.alignment`), from the student's response logits; pooled over the batch's
        groups, or (``per_sequence``) the mean within each sequence's groups, then over the sequences."""
        return self.ctx.cross_tokenizer.distill(self.ctx.divergence, student_logits, self.teacher, batch, per_sequence)

    def response_divergence(self, student_logits: torch.Tensor, batch, per_sequence: bool = False) -> torch.Tensor:
        """The divergence ``D(p_teacher || q_student)`` over ``batch``'s responses from the live teacher, for
        methods that train on their own samples (GKD, ImitKD): the mean over all response tokens, or
        (``per_sequence``) the mean within each sequence and then over the sequences (GKD's Eq. 2).
        Across tokenizers the samples are re-tokenised for the teacher and D is the divergence over the
        aligned groups (:meth:`aligned_distill`), the groups standing in for tokens in either mean."""
        if self.ctx.cross_tokenizer is not None:
            return self.ctx.divergence.objective(self.aligned_distill(student_logits, batch, per_sequence), None)
        teacher = self.teacher_targets(batch)
        if per_sequence:
            per_token = self.ctx.divergence.per_token(student_logits, teacher)
            return per_sequence_mean(per_token, batch.response_mask).mean()
        return self.ctx.divergence(student_logits, teacher)

    @staticmethod
    def nll(logits: torch.Tensor, batch) -> torch.Tensor:
        """Mean negative log-likelihood of the gold response tokens (MLE)."""
        return F.cross_entropy(logits.float(), batch.labels[batch.response_mask])


class MLE(Method):
    """Maximum likelihood on the gold responses of the batch (SFT):

        L = -(1/N) sum_{t in responses} log q_theta(y_t | x, y_<t)

    over the batch's ``N`` response tokens. ``method=sft`` trains on the dataset's responses, SeqKD (Kim
    & Rush 2016) on the teacher's (its ``prepare_data`` swaps them in), and MiniLLM's first phase is one
    (Gu et al. 2024, Alg. 1: the student warmed up on the data)."""
    name = "mle"
    teacher_needs = frozenset()

    def loss(self, batch, step):
        nll = self.nll(self.logits(self.student, batch), batch)
        return LossOutput(nll, {"nll": nll.item()})


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log q(y_t)``: the log-probability of each target token ``targets (N,)`` under its row of ``logits (N, V)``."""
    return F.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def per_sequence_mean(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean of per-token ``values (N,)`` (row-major over ``response_mask (B, T)``) within each row."""
    rows = response_mask.nonzero()[:, 0]
    sums = torch.zeros(response_mask.shape[0], dtype=values.dtype, device=values.device).index_add(0, rows, values)
    return sums / response_mask.sum(dim=1).clamp(min=1)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Exact per-position ``KL(q || p) = sum_v q_v (log q_v - log p_v)``."""
    logq = F.log_softmax(student_logits.float(), dim=-1)
    logp = F.log_softmax(teacher_logits.float(), dim=-1)
    return (logq.exp() * (logq - logp)).sum(-1)
