"""MiniLLM (Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024, Alg. 1).

Minimises the sequence-level reverse KL ``KL(q_theta || p)`` (Eq. 1) by policy gradient, in two phases:

1. ``sft``: maximum likelihood on the gold responses at ``method.sft_lr``, for ``method.sft_steps``
   optimizer steps or ``method.sft_epochs`` epochs (App. B: 3 epochs; at most one of the two; both null:
   as long as the run's ``train.max_steps``/``epochs``; ``sft_steps=0``: skip it, e.g. when the student
   is already an SFT checkpoint). As Alg. 1 and App. B prescribe, phase 2 starts from the phase-1
   student with the lowest validation loss, the trainer's :attr:`Phase.keep_best_valid_loss`: logged
   as ``valid/sft_loss`` every ``train.eval_every`` steps, the best kept in ``phase0_best/`` (with
   ``train.eval_every=null``, the last SFT step).
2. ``minillm``: PPO-style updates (Alg. 1) on rollouts drawn from the teacher-mixed distribution
   ``p~ = alpha p + (1 - alpha) q_old`` (Eq. 4; alpha = 0.2, temperature 1, no top-k/top-p), with

   - per-token reward ``r_t = clip((log p(y_t|y<t) - log q_old(y_t|y<t)) / reward_scale, +-reward_clip)``
     (Eq. 2's r_t); like LMOps (``rewards / reward_scaling``), kdlab *divides* by ``reward_scale``, so
     the default 0.5 doubles the reward (before the clip at 100);
   - single-step decomposition (Eq. 3): the step-t reward is taken exactly, as the per-position reverse KL
     ``KL_t = sum_v q(v) (log q(v) - log p(v)) = CE(q, p) - H(q)`` (differentiated through q), so the
     policy-gradient advantage is the return from ``t + 1``:
     ``A_t = sum_{t'>t} gamma^(t'-t-1) r_t'``, divided by the ``|y| - t - 1`` terms it sums (length
     normalisation, Eq. 6), then whitened over all tokens of the rollout buffer (gamma = 0.95);
   - per-token importance weight of the mixture sampling (Eq. 5, its per-token approximation)
     ``w_t = q_old(y_t) / p~(y_t)``, fixed at sampling time;
   - long-term term (Alg. 1, ``(grad L)_Long^Norm``): the clipped ratio is the whole ratio against the
     sampler, ``rho_t(theta) = q_theta(y_t) / p~(y_t) = exp(log q_theta - log q_old) * w_t``, so the
     importance weight sits *inside* the clip (as in LMOps' ``_pg_loss``). Alg. 1 writes
     ``-A_t grad min[rho_t, clip(rho_t, 1 - eps, 1 + eps)]``; kdlab uses the PPO form that Alg. 1 cites
     (Schulman et al. 2017) and LMOps implements, pessimistic for either sign of A:
     ``-min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)``, eps = 0.2. (The two agree for A_t > 0; for
     A_t < 0 the literal min would pass gradient where rho_t < 1 - eps and block it where rho_t > 1 + eps.)
   - single-step term ``w_t KL_t``, weighted by w_t as in Eq. 5 and Alg. 1 (LMOps leaves it unweighted);
   - loss ``L = mean_t[-min(rho_t A_t, clip(rho_t, 1-eps, 1+eps) A_t) + w_t KL_t] + ptx_weight * L_ptx``,
     means over the sampled tokens of the minibatch as in LMOps (Alg. 1 writes ``1/M`` times the sum over
     each sequence's tokens; the paper's lr 5e-6 goes with LMOps' token means);
   - ``L_ptx``, weight ``ptx_weight`` 0.5: LMOps' pre-training loss on a pre-training (PT) batch,
     ``ptx_kd_ratio * KL(p || q_theta) + (1 - ptx_kd_ratio) * LM`` (LMOps' ``--kd-ratio 0.5``), both means over
     the batch's target tokens. The PT batch is ``method.ptx_corpus=<local .txt or .jsonl>`` (LMOps:
     OpenWebText for GPT-2) packed into rows of ``ptx_length`` tokens (:mod:`kdlab.data.corpus`), one row
     per sequence of the micro-batch drawn at random from the trainer's RNG stream. kdlab ships no such
     corpus: with ``ptx_corpus=null`` the term is off (weight 0, said once on the console), since the task's
     gold responses in its place would make it supervised fine-tuning on the task and MiniLLM's row partly
     an SFT row; ``method.ptx_source=gold`` asks for exactly that (the trainer's batch is the PT batch).

Dropout (``method.disable_dropout``, default true): phase 2 runs the student with every dropout
probability at 0 (:func:`kdlab.modeling.disable_dropout`), as LMOps does (``base_model.eval()  # no
dropout for RL``): ``q_old`` is taken at sampling time in eval mode, so with dropout on (GPT-2: 0.1) the
ratio rho_t would start away from w_t and the clip would fire on dropout noise. Phase 1 (SFT) keeps the
student's dropout, as LMOps' SFT does.

Mapping onto kdlab's trainer: **one trainer micro-batch = one PPO minibatch update** (the minibatch
has the micro-batch's size, so App. B's mini-batch 64 is ``train.batch_size=64`` with
``train.grad_accum=1``). ``loss`` refills the rollout buffer when its schedule is exhausted: it
samples one rollout per prompt of a prompt pool and schedules ``ppo_epochs`` shuffled passes over
them. The pool is the most recent ``method.rollouts`` distinct prompts the trainer has delivered
(current batch included), so the first buffers are smaller (only the prompts seen so far) and reach
``rollouts`` sequences once that many prompts have streamed by. Rollout lengths: at most
``method.max_new_tokens`` (null: the longest gold response among the rollout prompts). The pool, the
buffer and its schedule are method state (checkpointed), and all sampling draws from the trainer's
RNG stream, so a resumed run continues exactly. Learning-rate schedules: phase 1 follows the run's
``train.schedule``; phase 2 uses ``method.schedule`` (default constant, App. B's constant 5e-6).

Where kdlab still departs from the paper or LMOps:

- The rollout prompts are the last ``rollouts`` distinct prompts of the trainer's own batches (the first
  buffers smaller), not 256 prompts drawn afresh from the data per iteration as in LMOps.
- ``max_new_tokens=null`` caps rollouts at the longest gold response of their prompts; the paper (and
  ``+experiment=minillm-table``) uses 256 new tokens (prompts <= 256, sequences <= 512).
- ``q_old`` is the sampler's (KV-cached) log-probability, so rho_t / w_t is 1 up to float rounding on a
  fresh buffer, not bitwise.
- The single-step term is weighted by w_t (the paper) where LMOps leaves it unweighted, and the clip is
  LMOps' PPO form rather than Alg. 1's literal ``min`` (above).
- PTX follows LMOps, not the paper: Alg. 1 adds ``grad L_PT`` with ``L_PT = -E log q_theta(d)``, the LM loss
  alone at weight 1; ``method.ptx_kd_ratio=0 method.ptx_weight=1`` is that (with LMOps' token mean).
- The PTX forward KL is the KL itself; LMOps computes the cross-entropy ``-sum p log q`` (the KL plus the
  teacher's entropy: the same gradient, a different logged value). PTX rows are drawn with replacement,
  one per sequence of the micro-batch, where LMOps iterates a shuffled PT loader.
"""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from kdlab.config import ConfigError, OneOf, Range, Type
from kdlab.data import Batch, Encoded, collate, left_pad
from kdlab.data.corpus import pack_corpus
from kdlab.divergences.losses import ForwardKL
from kdlab.generation import SAMPLING_SCHEMA, sample_mixture
from kdlab.methods.base import MLE, LossOutput, Method, Phase, reverse_kl, token_logprobs
from kdlab.modeling import disable_dropout


def mixture_weights(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, alpha: float) -> torch.Tensor:
    """``w = q / ((1 - alpha) q + alpha p)``, in log space for stability: ``1 / (1 - alpha + alpha p/q)``."""
    return 1.0 / ((1 - alpha) + alpha * (teacher_logprobs - student_logprobs).exp())


def advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float, length_norm: bool,
               from_next: bool) -> torch.Tensor:
    """Discounted returns ``(B, L)`` of per-token ``rewards`` (0 where ``mask`` is 0).

    ``from_next``: the return of position t sums rewards from ``t + 1`` on (single-step decomposition),
    else from t. ``length_norm`` divides by the number of summed terms (0 when there are none).
    """
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        if from_next:
            returns[:, t] = running
            running = rewards[:, t] + gamma * running
        else:
            running = rewards[:, t] + gamma * running
            returns[:, t] = running
    if length_norm:
        lengths = mask.sum(dim=1, keepdim=True)
        terms = lengths - torch.arange(rewards.shape[1], device=rewards.device)[None] - int(from_next)
        returns = torch.where(terms > 0, returns / terms.clamp(min=1), torch.zeros_like(returns))
    return returns * mask


def whiten(values: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` over a flat tensor of per-token values."""
    std = values.std() if values.numel() > 1 else values.new_tensor(1.0)
    return (values - values.mean()) / (std + 1e-8)


def token_rewards(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, scale: float,
                  clip: float) -> torch.Tensor:
    """``r_t = clip((log p - log q_old) / scale, +-clip)``: divided by ``scale`` as LMOps' ``reward_scaling``."""
    return ((teacher_logprobs - student_logprobs) / scale).clamp(-clip, clip)


def clipped_surrogate(logprobs, old_logprobs, adv, weights, eps: float):
    """Per-token ``-min(rho A, clip(rho, 1 - eps, 1 + eps) A)`` with the ratio against the sampler
    ``rho = exp(logprobs - old) * w`` (MiniLLM Alg. 1: ``rho_t = q_theta / p~``); also whether the clip
    was active."""
    ratio = (logprobs - old_logprobs).exp() * weights
    unclipped, clipped = ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv
    return -torch.min(unclipped, clipped), (clipped < unclipped)


class MiniLLM(Method):
    name = "minillm"
    # its rollouts mix the teacher's distribution into every sampled token (Eq. 4), stepping the teacher's
    # model itself, and its single-step term is the exact reverse KL over the whole vocabulary: live only
    teacher_needs = frozenset({"weights", "full_distribution", "own_token_logprobs"})
    teacher_needs_across = ("needs the teacher's log-probability of the student's own tokens (its reward), which a "
                            "teacher with another tokenizer does not assign")
    schema = {**Method.schema, "sft_lr": Range(0, low_open=True), "sft_steps": Range(0, integer=True, optional=True),
              "sft_epochs": Range(1, integer=True, optional=True),
              "alpha": Range(0, 1), "rollouts": Range(1, integer=True), "ppo_epochs": Range(1, integer=True),
              "clip_ratio": Range(0, low_open=True), "gamma": Range(0, 1), "reward_scale": Range(0, low_open=True),
              "reward_clip": Range(0, low_open=True), "length_norm": Type(bool), "single_step": Type(bool),
              "ptx_weight": Range(0), "ptx_kd_ratio": Range(0, 1), "ptx_source": OneOf("corpus", "gold"),
              "ptx_corpus": Type(str, optional=True), "ptx_length": Range(2, integer=True),
              "ptx_max_tokens": Range(1, integer=True), **SAMPLING_SCHEMA, "max_new_tokens": Range(1, integer=True, optional=True),
              "schedule": OneOf("constant", "linear"), "disable_dropout": Type(bool)}

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        if cfg.sft_steps is not None and cfg.sft_epochs is not None:
            raise ConfigError(f"method.sft_steps={cfg.sft_steps} and method.sft_epochs={cfg.sft_epochs} both set the "
                              "SFT phase's length; set one of them to null")
        if cfg.ptx_source == "gold" and cfg.ptx_corpus:
            raise ConfigError(f"method.ptx_source=gold trains the PTX term on the task's gold responses, yet "
                              f"method.ptx_corpus={cfg.ptx_corpus} names a corpus; set method.ptx_source=corpus to use "
                              f"the corpus, or method.ptx_corpus=null")

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.pool: list[tuple[list[int], int]] = []     # (prompt ids, gold response length), oldest first
        self.buffer: list[dict] = []                     # one dict of 1-D tensors per rollout
        self.schedule: list[list[int]] = []             # remaining minibatches (buffer indices)
        self.last_reward = 0.0
        self.ptx_weight, self.ptx_rows = cfg.ptx_weight, None
        if cfg.ptx_weight and cfg.ptx_source == "corpus":
            if cfg.ptx_corpus:
                self.ptx_rows = pack_corpus(cfg.ptx_corpus, ctx.tokenizer, cfg.ptx_length, cfg.ptx_max_tokens)
            else:
                # the gold responses would make PTX supervised fine-tuning on the task (a partly-SFT row)
                self.ptx_weight = 0.0
                if ctx.runtime is None or ctx.runtime.is_main:
                    print("kdlab: minillm: PTX term off (method.ptx_corpus=null): set method.ptx_corpus=<local "
                          "OpenWebText .txt/.jsonl> for LMOps' pre-training term, or method.ptx_source=gold to "
                          "train it on the task's gold responses", flush=True)
        self.ptx_divergence = ForwardKL()

    def phases(self) -> list[Phase]:
        phases = [Phase("minillm", self, schedule=self.cfg.schedule)]
        if self.cfg.sft_steps != 0:
            sft = MLE(OmegaConf.create({"name": "sft", "lr": self.cfg.sft_lr}), self.ctx)
            phases.insert(0, Phase("sft", sft, self.cfg.sft_steps, keep_best_valid_loss=True,
                                     epochs=self.cfg.sft_epochs))
        return phases

    def state_dict(self) -> dict:
        return {"pool": [[p, n] for p, n in self.pool], "buffer": self.buffer, "schedule": self.schedule,
                "last_reward": self.last_reward}

    def load_state_dict(self, state: dict) -> None:
        self.pool = [(list(p), int(n)) for p, n in state.get("pool", [])]
        self.buffer, self.schedule = list(state.get("buffer", [])), [list(m) for m in state.get("schedule", [])]
        self.last_reward = state.get("last_reward", 0.0)

    # -- rollouts ----------------------------------------------------------------------------------
    def remember(self, batch) -> None:
        """Put the batch's prompts at the young end of the pool (at most ``rollouts`` distinct prompts)."""
        gold = batch.response_mask.sum(dim=1).tolist()
        for ids, m, n in zip(batch.prompt_ids, batch.prompt_mask, gold):
            prompt = ids[m.bool()].tolist()
            self.pool = [e for e in self.pool if e[0] != prompt] + [(prompt, int(n))]
        self.pool = self.pool[-self.cfg.rollouts:]

    @torch.no_grad()
    def refill(self, minibatch: int, device) -> None:
        cfg, tok = self.cfg, self.ctx.tokenizer
        self.buffer = []
        for start in range(0, len(self.pool), minibatch):
            chunk = self.pool[start:start + minibatch]
            prompt_ids, prompt_mask = left_pad([p for p, _ in chunk], tok.pad_token_id)
            g = sample_mixture(self.student, self.teacher, tok, prompt_ids.to(device), prompt_mask.to(device),
                               alpha=cfg.alpha, max_new_tokens=cfg.max_new_tokens or max(n for _, n in chunk),
                               temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
            mask = g.response_mask.float()
            reward = token_rewards(g.teacher_logprobs, g.student_logprobs, cfg.reward_scale, cfg.reward_clip)
            adv = advantages(reward, mask, cfg.gamma, cfg.length_norm, from_next=cfg.single_step)
            weight = mixture_weights(g.student_logprobs, g.teacher_logprobs, cfg.alpha)
            for i, (prompt, _) in enumerate(chunk):
                n = int(g.response_mask[i].sum())
                self.buffer.append({"prompt": torch.tensor(prompt), "response": g.response_ids[i, :n].cpu(),
                                    "old_logprobs": g.student_logprobs[i, :n].cpu(), "weight": weight[i, :n].cpu(),
                                    "advantage": adv[i, :n].cpu(), "reward": reward[i, :n].cpu()})
        lengths = [len(r["advantage"]) for r in self.buffer]
        for r, adv in zip(self.buffer, whiten(torch.cat([r["advantage"] for r in self.buffer])).split(lengths)):
            r["advantage"] = adv
        self.last_reward = torch.cat([r["reward"] for r in self.buffer]).mean().item()
        # the shuffles come from the trainer's RNG stream (one draw), so resumed runs repeat them
        rng = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
        self.schedule = []
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(len(self.buffer), generator=rng).tolist()
            self.schedule += [order[i:i + minibatch] for i in range(0, len(order), minibatch)]

    # -- the update ---------------------------------------------------------------------------------
    def loss(self, batch, step):
        cfg, device = self.cfg, batch.input_ids.device
        if cfg.disable_dropout:   # here, not in __init__: the SFT phase trains the same student with dropout
            disable_dropout(self.student)
        self.remember(batch)
        if not self.schedule:
            self.refill(len(batch), device)
        rollouts = [self.buffer[i] for i in self.schedule.pop(0)]
        seqs = collate([Encoded(r["prompt"].tolist(), r["response"].tolist(), {}) for r in rollouts],
                       self.ctx.tokenizer.pad_token_id).to(device)
        old, weight, adv = (torch.cat([r[k] for r in rollouts]).to(device) for k in ("old_logprobs", "weight", "advantage"))
        student = self.logits(self.student, seqs)
        logprobs = token_logprobs(student, seqs.labels[seqs.response_mask])
        pg, clipped = clipped_surrogate(logprobs, old, adv, weight, cfg.clip_ratio)
        pg = pg.mean()
        kl = reverse_kl(student, self.teacher_logits(seqs))
        loss = pg + (weight * kl).mean() if cfg.single_step else pg
        logs = {"pg": pg.item(), "rkl": kl.mean().item(), "clipfrac": clipped.float().mean().item(),
                "ratio": ((logprobs - old).exp() * weight).mean().item(), "reward": self.last_reward,
                "response_len": seqs.response_mask.sum().item() / len(rollouts)}
        if self.ptx_weight:
            ptx, ptx_logs = self.ptx_loss(batch)
            loss = loss + self.ptx_weight * ptx
            logs.update(ptx_logs)
        return LossOutput(loss, logs)

    def ptx_batch(self, batch) -> Batch:
        """The pre-training batch: ``len(batch)`` random corpus rows (every token after the first is a
        target), or with ``method.ptx_source=gold`` the trainer's batch itself (its gold responses)."""
        if self.cfg.ptx_source == "gold":
            return batch
        rows = self.ptx_rows[torch.randint(len(self.ptx_rows), (len(batch),))].to(batch.input_ids.device)
        labels = torch.cat([rows[:, 1:], rows.new_full((len(rows), 1), -100)], dim=1)
        ones = torch.ones_like(rows)
        return Batch(rows, ones, labels, labels != -100, rows[:, :1], ones[:, :1])

    def ptx_loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """LMOps' pre-training loss on the PT batch, ``kd * KL(p || q) + (1 - kd) * NLL`` with
        ``kd = method.ptx_kd_ratio``, both means over its target tokens (module docstring)."""
        pt, kd = self.ptx_batch(batch), self.cfg.ptx_kd_ratio
        student = self.logits(self.student, pt)
        nll = self.nll(student, pt)
        fkl = self.ptx_divergence(student, self.teacher_logits(pt)) if kd else torch.zeros_like(nll)
        ptx = kd * fkl + (1 - kd) * nll
        return ptx, {"ptx": ptx.item(), "ptx_fkl": fkl.item(), "ptx_nll": nll.item()}


METHOD = MiniLLM
