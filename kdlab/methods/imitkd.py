"""ImitKD (Lin et al. 2020, "Autoregressive Knowledge Distillation through Imitation Learning", Alg. 1):
the student learns from the teacher on its own prefixes as well as on the data, DAgger-style.

At step i each training sequence independently is the gold response with probability beta_i and the
student's own sample (for the same prompt) otherwise; the teacher is then queried on every prefix:

    L_i = mean over response tokens t of  D(p_teacher(. | x, y_<t) || q_student(. | x, y_<t))

with D the ``divergence`` group: the paper's token-level forward KL is the default ``fkl``. The mean
pools all response tokens of the micro-batch, as the released code does (``F.kl_div(...,
reduction="batchmean")`` and ``entropies.mean()`` over the flattened non-pad target tokens); unlike GKD
(Eq. 2), ImitKD does not normalise per sequence, so it has no ``normalize`` option. beta_i decays over
training (``schedule``):

- ``exponential`` (default, the released code's setting): beta_i = exp_base ** (-i / I), exp_base = 200,
  so beta goes from 1 to 1/200 = 0.005;
- ``linear``: beta_i = 1 - i / I,

with i the optimizer step (0-based) and I = ``decay_steps`` (null: the run's length, ``train.max_steps`` or,
training by epochs, ``train.epochs`` times the steps per epoch, known once the training examples are: kdlab's
choice, so that beta reaches its final value as training ends), beta staying at its final value after I.
The per-sequence coin flips come from the global torch RNG (saved in checkpoints, so a resumed run repeats
them). Sampling uses the student in eval mode (no dropout) with
``temperature`` / ``top_k`` / ``top_p`` (default plain sampling at temperature 1; the released IWSLT
config samples from the top 5) and at most ``max_new_tokens`` tokens; sampled tokens carry no gradient.

Dropout: ``method.disable_dropout`` defaults to false. The released code samples in eval mode
(``self.model.eval()`` before the translator) and trains in train mode (``self.model.train()``), so the
update runs with the student's dropout, as kdlab's; ImitKD compares no probabilities of the sampler
with the trained model's (no importance ratio), so dropout only regularises. ``true`` zeroes it.

Where kdlab still departs from the paper or the released code:

- Decoder-only LMs in place of the paper's encoder-decoder translation/summarisation models: the
  "source" is the prompt.
- kdlab distils the teacher's full distribution (the released code's ``top_k`` path, ``F.kl_div``);
  the released code's default path instead trains sampled rows on the teacher's argmax tokens (hard
  targets) and gold rows on the gold tokens.
- Only the ``exponential`` and ``linear`` schedules (the released code also has ``reverse_sigmoid``
  and warm-up variants); beta moves every optimizer step, where the released code moves it once per
  training step of its trainer (``iter_per_step`` batches) or per batch (``use_iter``).
- Across tokenizers (``divergence=uld``) D is ULD's W1 over the batch's aligned groups, pooled, an
  extension (no ``normalize`` option: ImitKD pools tokens, so groups are pooled too).
"""
from __future__ import annotations

import torch

from kdlab.config import OneOf, Range, Type
from kdlab.generation import SAMPLING_SCHEMA, sample_student, sampling_settings
from kdlab.methods.base import LossOutput, Method
from kdlab.modeling import disable_dropout
from kdlab.trainer import run_steps


class ImitKD(Method):
    name = "imitkd"
    schema = {**Method.schema, "schedule": OneOf("exponential", "linear"), "exp_base": Range(1, low_open=True),
              "decay_steps": Range(1, integer=True, optional=True), "disable_dropout": Type(bool), **SAMPLING_SCHEMA}
    # the teacher's distribution on the student's own samples (live or served); across tokenizers its full
    # distribution over its own tokens (ULD)
    teacher_needs = frozenset({"distribution"})
    teacher_needs_across = frozenset({"full_distribution", "other_tokenizer"})
    uses_divergence = True

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.decay_steps = cfg.decay_steps or ctx.train_cfg.max_steps   # by epochs: set in prepare_data
        if cfg.disable_dropout:
            disable_dropout(self.student)

    def prepare_data(self, train_items: list) -> list:
        if self.decay_steps is None:
            self.decay_steps = run_steps(self.ctx.train_cfg, len(train_items))
        return train_items

    def beta(self, step: int) -> float:
        """Probability that a sequence is the gold one at optimizer step ``step``."""
        frac = min(step / self.decay_steps, 1.0)
        return self.cfg.exp_base ** -frac if self.cfg.schedule == "exponential" else 1.0 - frac

    def loss(self, batch, step):
        beta = self.beta(step)
        from_student = torch.rand(len(batch)) >= beta
        if from_student.any():   # an all-gold batch draws no sampling seed
            batch = sample_student(self.student, self.ctx.tokenizer, batch, rows=from_student,
                                   **sampling_settings(self.cfg))
        student = self.logits(self.student, batch)
        distill = self.response_divergence(student, batch)
        return LossOutput(distill, {"distill": distill.item(), "beta": beta,
                                    "student_fraction": from_student.float().mean().item(),
                                    "response_tokens": float(batch.response_mask.sum())})


METHOD = ImitKD
