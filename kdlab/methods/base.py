"""The method interface: what a distillation method optimises, not how the loop runs it.

The trainer calls :meth:`Method.loss` on each micro-batch, backpropagates the returned tensor and
steps one optimizer per entry of :meth:`Method.param_groups` (objectives of different optimizers
must touch disjoint parameters, so one backward serves all of them). Methods that sample (GKD,
ImitKD, MiniLLM, DPKD) do it inside ``loss`` under ``torch.no_grad()``; MiniLLM's SFT warm-up is a
second :class:`Phase`.
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
    """What a method is built from."""
    teacher: nn.Module | None
    student: nn.Module
    tokenizer: object
    divergence: object
    runtime: object
    train_cfg: object
    vocab_size: int
    teacher_cache: object = None        # a kdlab.teacher.topk_cache.TeacherCache when teacher.cache is set
    cross_tokenizer: object = None      # a kdlab.alignment.CrossTokenizer when the divergence is (divergence=uld)


class Method:
    name: ClassVar[str]
    schema: ClassVar[dict] = {"lr": Range(0, low_open=True)}
    needs_teacher: ClassVar[bool] = True
    # True: the loss reads the teacher only through teacher_targets, so a cached teacher can stand in
    uses_teacher_cache: ClassVar[bool] = False
    # True: the loss reads the teacher only through aligned_distill when the divergence is cross-tokenizer
    cross_tokenizer: ClassVar[bool] = False

    def __init__(self, cfg, ctx: Context):
        self.cfg, self.ctx = cfg, ctx
        self.teacher, self.student = ctx.teacher, ctx.student

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
                               self.ctx.vocab_size)

    @torch.no_grad()
    def teacher_logits(self, batch) -> torch.Tensor:
        return self.logits(self.teacher, batch)

    def teacher_targets(self, batch):
        """The teacher at the response positions: live logits ``(N, V)``, or with ``teacher.cache`` the
        cached sparse top-k (:class:`kdlab.divergences.TopKLogProbs`, ``(N, k)``) that divergences accept."""
        if self.ctx.teacher_cache is not None:
            return self.ctx.teacher_cache.lookup(batch)
        return self.teacher_logits(batch)

    def aligned_distill(self, student_logits: torch.Tensor, batch) -> torch.Tensor:
        """Across tokenizers: the divergence over the aligned groups of ``batch`` re-tokenised for the
        teacher (:mod:`kdlab.alignment`), from the student's response logits."""
        return self.ctx.cross_tokenizer.distill(self.ctx.divergence, student_logits, self.teacher, batch)

    @staticmethod
    def nll(logits: torch.Tensor, batch) -> torch.Tensor:
        """Mean negative log-likelihood of the gold response tokens (MLE)."""
        return F.cross_entropy(logits.float(), batch.labels[batch.response_mask])
