"""The training loop. It does not know which method it runs (see ``kdlab.methods.base``).

Per optimizer step: ``train.grad_accum`` micro-batches through the running phase's ``method.loss`` and
one backward each, then every parameter group's optimizer step (``kdlab.optim``: AdamW, or DeepSpeed
ZeRO for the student under hardware=zero2/zero3) and schedule step. Every ``eval_every`` steps the
student is validated and the best one kept (``kdlab.validation``); every ``save_every`` steps a
resumable checkpoint is written. Running the same job again in the same folder resumes from the newest
checkpoint that loads and reproduces the uninterrupted run; the metrics logged after it (or all of them,
when there is none) are dropped first, so no step is logged twice. SIGTERM, SIGUSR1 and SIGUSR2 end
training at the next step boundary with a checkpoint of that step (``kdlab.preemption``). A step whose
loss (or a term the method logs) or gradient is not finite ends training before its optimizer step, with
nothing of it saved (:class:`TrainingDiverged`; gradients are checked outside ZeRO, see ``kdlab.optim``).
A served teacher that stops answering mid-step (:class:`kdlab.modeling.TeacherFault`, after its retries)
ends training with a checkpoint of the last complete step: the half step is dropped, its RNG draws undone.
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from kdlab import distributed, optim
from kdlab.checkpoint import capture_rng, load_checkpoint, prune, restore_params, restore_rng, save_checkpoint
from kdlab.config import ConfigError, OneOf, Range, Type, check_section
from kdlab.data import batches
from kdlab.loggers import progress, say
from kdlab.preemption import StopSignals
from kdlab.validation import Validation
from kdlab.modeling import TeacherFault, sparse_tied_embedding_grad


SCHEMA = {
    "max_steps": Range(1, integer=True, optional=True),
    "epochs": Range(1, integer=True, optional=True),
    "batch_size": Range(1, integer=True),
    "grad_accum": Range(1, integer=True),
    "warmup_ratio": Range(0, 1),
    "schedule": OneOf("linear", "constant"),
    "weight_decay": Range(0),
    "grad_clip": Range(0, optional=True),
    "log_every": Range(1, integer=True),
    "eval_every": Range(1, integer=True, optional=True),
    "save_every": Range(1, integer=True, optional=True),
    "valid_examples": Range(1, integer=True, optional=True),
    "select_best": Type(bool),
}


def run_steps(train_cfg, examples: int, max_steps=None, epochs=None) -> int:
    """A length in optimizer steps: ``max_steps``, else ``epochs`` passes over ``examples`` training examples in
    batches of ``train.batch_size`` (a last partial batch is dropped); with neither given (a phase that sets no
    length of its own), the run's ``train.max_steps`` / ``train.epochs``."""
    if max_steps is None and epochs is None:
        max_steps, epochs = train_cfg.max_steps, train_cfg.epochs
    return max_steps if max_steps is not None else epochs * (examples // train_cfg.batch_size)


def check_length(key: str, max_steps, epochs) -> None:
    """Exactly one of ``max_steps`` and ``epochs`` gives a run's length: with both null there is none, and with
    both set ``max_steps`` would decide alone and ``epochs`` be silently ignored."""
    if max_steps is None and epochs is None:
        raise ConfigError(f"{key}.max_steps and {key}.epochs are both null; set one of them")
    if max_steps is not None and epochs is not None:
        raise ConfigError(f"{key}.max_steps={max_steps} and {key}.epochs={epochs} are both set, and max_steps would "
                          f"decide alone; set {key}.max_steps=null to train {epochs} epoch(s), or {key}.epochs=null "
                          f"to train {max_steps} steps")


def validate_train(cfg) -> None:
    check_section("train", cfg, SCHEMA)
    check_length("train", cfg.max_steps, cfg.epochs)
    if cfg.batch_size % cfg.grad_accum:
        raise ConfigError(f"train.batch_size={cfg.batch_size} is not divisible by train.grad_accum={cfg.grad_accum}; "
                          f"make batch_size a multiple of grad_accum")


class TrainingDiverged(Exception):
    """A step's loss, a term of it or a gradient is NaN or infinite; the message is one line naming the step and
    the terms."""


class Trainer:
    def __init__(self, method, train_items, valid_items, cfg, runtime, logger, run_dir: Path, tokenizer):
        self.method, self.cfg, self.train_cfg = method, cfg, cfg.train
        self.train_items = train_items
        self.runtime, self.logger, self.run_dir, self.tokenizer = runtime, logger, Path(run_dir), tokenizer
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.zero_dir = self.ckpt_dir / "deepspeed"   # ZeRO's shards, one folder per checkpoint tag
        self.phases = method.phases()
        self.phase = None                   # the running one: its method is the one trained and checkpointed
        self.optimizers, self.schedules = {}, {}   # by parameter group of the running phase (kdlab.optim)
        self.validation = Validation(method, valid_items, tokenizer, cfg.eval, runtime, run_dir)
        self.time_before, self.started = 0.0, time.time()   # training time of the runs resumed; this one's start
        self.signals = StopSignals()        # active during fit
        if runtime.strategy in ("none", "ddp"):   # DeepSpeed's ZeRO hooks expect dense gradients
            sparse_tied_embedding_grad(method.student)
        if cfg.train.batch_size % (runtime.world_size * cfg.train.grad_accum):
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by world_size * grad_accum = "
                              f"{runtime.world_size} * {cfg.train.grad_accum}; each rank takes an equal slice of "
                              f"every micro-batch")

    def steps_for(self, phase) -> int:
        return run_steps(self.train_cfg, len(self.train_items), phase.max_steps, phase.epochs)

    def elapsed(self) -> float:
        return self.time_before + time.time() - self.started

    # -- checkpoints -------------------------------------------------------------------------------
    def params(self) -> dict[str, list[torch.Tensor]]:
        return {name: opt.checkpoint_params for name, opt in self.optimizers.items()}

    @staticmethod
    def zero_tag(phase_index: int, step: int) -> str:
        return f"phase{phase_index}-step{step:07d}"

    def save(self, index: int, step: int, offset: int, position: tuple[int, int]) -> None:
        """Every rank takes part (RNG states are gathered, ZeRO writes its shards); rank 0 writes the
        checkpoint, which points at the ZeRO tag only once that is complete; the others wait."""
        tag = self.zero_tag(index, step)
        saved = {name: opt.save(self.zero_dir, tag) for name, opt in self.optimizers.items()}
        state = {
            "phase": index, "step": step, "epoch": position[0], "batch": position[1],
            **self.validation.state_dict(),
            "optimizers": {name: s for name, s in saved.items() if s is not None},   # None: in ZeRO's shards
            "schedulers": {name: s.state_dict() for name, s in self.schedules.items()},
            "method": self.phase.method.state_dict(), "elapsed_s": self.elapsed(),
            **capture_rng(self.runtime.world_size),
        }
        if self.runtime.world_size > 1:
            state["replica_digests"] = distributed.check_replicas(self.params())
        if self.runtime.is_main:
            save_checkpoint(self.ckpt_dir, offset + step, self.params(), state)
            prune(self.zero_dir.glob("phase*"), tag)   # tags sort by phase, then step, as checkpoints do
        distributed.barrier()

    def restore(self, flat, state) -> None:
        restore_params(self.params(), flat)
        tag = self.zero_tag(state["phase"], state["step"])
        for name, opt in self.optimizers.items():
            opt.load(self.zero_dir, tag, state["optimizers"].get(name))
        for name, s in self.schedules.items():
            s.load_state_dict(state["schedulers"][name])
        restore_rng(state, self.runtime.rank, self.runtime.world_size)
        self.validation.load_state_dict(state)
        self.phase.method.load_state_dict(state["method"])

    def diverged(self, step: int, logs: dict) -> TrainingDiverged:
        """The error for ``step``, raised before the optimizer applies it: the weights, and every checkpoint and
        student written, are from before it; the rerun would meet the same step again (training is reproducible)."""
        terms = ", ".join(f"{k}={v:.4g}" for k, v in logs.items())
        last = (self.ckpt_dir / "LAST").read_text().strip() if (self.ckpt_dir / "LAST").exists() else "none"
        return TrainingDiverged(f"training diverged at step {step}, a loss term or gradient is not finite ({terms}); "
                                f"nothing of this step was saved (last checkpoint: {last}); lower the learning rate "
                                f"or check the training data, then run in a new folder (hydra.run.dir=<folder>)")

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> dict:
        if self.runtime.is_main:
            self.validation.recover(len(self.phases))
        resume = load_checkpoint(self.ckpt_dir, say=say)
        if resume is None:
            self.logger.truncate_after(0)   # a job killed before its first checkpoint logged steps it redoes
        start_phase = resume[1]["phase"] if resume else 0
        self.time_before, self.started = resume[1].get("elapsed_s", 0.0) if resume else 0.0, time.time()
        offset = 0
        with self.signals:
            for index, phase in enumerate(self.phases):
                total = self.steps_for(phase)
                if index >= start_phase:
                    self.run_phase(index, phase, total, offset, resume if index == start_phase else None,
                                   is_last=index == len(self.phases) - 1)
                offset += total
        return {"train_time_s": self.elapsed()}

    def micro_batches(self, data):
        """``(epoch, index, batch, next batch)`` on this rank's device: the next one lets a served teacher
        start on it while the student trains on this one (``Method.look_ahead``)."""
        def placed(item):
            epoch, index, batch = item
            return epoch, index, distributed.rank_slice(batch, self.runtime.rank, self.runtime.world_size).to(
                self.runtime.device)

        current = placed(next(data))
        while True:
            upcoming = placed(next(data))
            yield *current, upcoming[2]
            current = upcoming

    def run_phase(self, index, phase, total, offset, resume, is_last: bool) -> None:
        """Train one phase. The last one validates by ROUGE-L; an earlier one that keeps its best student
        validates by loss and hands its lowest-loss student to the next phase."""
        tc = self.train_cfg
        self.phase = phase
        self.optimizers, self.schedules = optim.build(phase.method, tc, total, phase.schedule or tc.schedule,
                                                      self.runtime)
        self.validation.start_phase()
        keeps_best = phase.keep_best_valid_loss and not is_last and bool(tc.eval_every)
        step, epoch, batch_index = 0, 0, 0
        if resume is not None:
            self.restore(*resume)
            step, epoch, batch_index = (resume[1][key] for key in ("step", "epoch", "batch"))
            self.logger.truncate_after(offset + step)
            if self.runtime.is_main:
                say(f"kdlab: resuming from step {offset + step} (checkpoint in {self.ckpt_dir})")
        data = self.micro_batches(batches(self.train_items, tc.batch_size // tc.grad_accum,
                                          self.tokenizer.pad_token_id, self.cfg.seed, epoch, batch_index * tc.grad_accum))
        bar = progress(total=total, initial=step, desc=phase.name, unit="steps", disable=not self.runtime.is_main)
        position = (epoch, batch_index)
        while step < total:
            t0 = time.time()
            logs, tokens = {}, 0
            rng = torch.get_rng_state(), random.getstate()
            try:
                for _ in range(tc.grad_accum):
                    epoch, micro_index, batch, upcoming = next(data)
                    phase.method.look_ahead(upcoming)
                    with self.runtime.autocast():
                        out = phase.method.loss(batch, offset + step)
                    # one backward fills every group's gradients; under ZeRO the student's engine must run it
                    self.optimizers["student"].backward(out.loss)
                    tokens += int(batch.attention_mask.sum())
                    for k, v in {"loss": out.loss.item(), **out.logs}.items():
                        logs[k] = logs.get(k, 0.0) + v / tc.grad_accum
            except TeacherFault as fault:
                torch.set_rng_state(rng[0])
                random.setstate(rng[1])
                self.save(index, step, offset, position)
                bar.close()
                raise TeacherFault(f"{fault}; checkpoint of step {offset + step} written: run the same command "
                                   f"again to resume (once the server answers)") from None
            if distributed.any_rank(not all(math.isfinite(v) for v in logs.values()), self.runtime.device):
                bar.close()
                raise self.diverged(offset + step + 1, logs)
            position = (epoch, (micro_index + 1) // tc.grad_accum)
            for name, opt in self.optimizers.items():
                try:
                    norm = opt.step()
                except optim.NonFiniteGradient as err:
                    bar.close()
                    raise self.diverged(offset + step + 1, {**logs, f"grad_norm/{name}": err.norm}) from None
                if norm is not None:
                    logs[f"grad_norm/{name}"] = norm
                logs[f"lr/{name}"] = self.schedules[name].get_last_lr()[0]
                self.schedules[name].step()
            step += 1
            dt = time.time() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
            metrics = {}
            if step % tc.log_every == 0 or step == total:
                logs = distributed.reduce_logs({**logs, "tokens": tokens}, sums=("tokens",))
                tokens = logs.pop("tokens")
                metrics.update({f"train/{k}": v for k, v in logs.items()})
                metrics.update({"train/step_time_s": dt, "train/tokens_per_s": tokens / dt, "train/phase": index})
            if (is_last or keeps_best) and tc.eval_every and (step % tc.eval_every == 0 or step == total):
                if self.runtime.evaluates:
                    metrics.update(self.validation.validate(phase.name, index, offset + step, is_last))
                distributed.barrier()
            if metrics:
                self.logger.log(metrics, step=offset + step)
            signum = self.signals.requested(self.runtime.device)
            if signum or tc.save_every and (step % tc.save_every == 0 or step == total):
                self.save(index, step, offset, position)
            if signum:
                bar.close()
                raise self.signals.stop(signum, offset + step)
        bar.close()
        if keeps_best:
            self.validation.restore_phase_best(index)
