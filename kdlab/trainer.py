"""The training loop. It does not know which method it runs (see ``kdlab.methods.base``).

Per optimizer step: ``train.grad_accum`` micro-batches through ``method.loss`` and one backward each,
gradient clipping per optimizer, AdamW steps, schedule steps. Every ``eval_every`` steps the student is
validated (greedy ROUGE-L and loss on the validation split) and the best one by ROUGE-L is saved to
``student_best/``; an earlier phase that keeps its best student (MiniLLM's SFT) is validated by loss
only, and the next phase starts from its lowest-loss student (``phase<i>_best/``). Every
``save_every`` steps a resumable checkpoint is written. Running the same job again in the same folder
resumes from the newest checkpoint that loads and reproduces the uninterrupted run; the metrics logged
after it (or all of them, when there is none) are dropped first, so no step is logged twice. SIGTERM,
SIGUSR1 and SIGUSR2 end training at the next step boundary with a checkpoint of that step
(``kdlab.preemption``).
"""
from __future__ import annotations

import math
import random
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm

from kdlab.config import ConfigError, OneOf, Range, Type, check_section
from kdlab.checkpoint import KEEP, atomic_dir, load_checkpoint, recover_dir, restore_params, save_checkpoint
from kdlab.data import batches
from kdlab import distributed
from kdlab.preemption import StopSignals
from kdlab.metrics.evaluate import evaluate, test_loss
from kdlab.modeling import sparse_tied_embedding_grad


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


def validate_train(cfg) -> None:
    check_section("train", cfg, SCHEMA)
    if cfg.max_steps is None and cfg.epochs is None:
        raise ConfigError("train.max_steps and train.epochs are both null; set one of them")
    if cfg.batch_size % cfg.grad_accum:
        raise ConfigError(f"train.batch_size={cfg.batch_size} is not divisible by train.grad_accum={cfg.grad_accum}; "
                          f"make batch_size a multiple of grad_accum")


def make_optimizer(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases), fused: one kernel per step
    and no parameter-sized temporaries (the default for-each AdamW's are the largest tensors of a KD
    step once the loss is chunked)."""
    params = list(params)
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=True)


def lr_lambda(total: int, warmup: int, schedule: str):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def save_pretrained(model, tokenizer, folder: Path) -> None:
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


class Trainer:
    def __init__(self, method, train_items, valid_items, cfg, runtime, logger, run_dir: Path, tokenizer,
                 vocab_size: int):
        self.method, self.cfg, self.train_cfg = method, cfg, cfg.train
        self.train_items, self.valid_items = train_items, valid_items
        self.runtime, self.logger, self.run_dir = runtime, logger, Path(run_dir)
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.best_rouge = -math.inf
        self.phase_best_loss = math.inf   # of the running phase, when it keeps its best (Phase.keep_best_valid_loss)
        self.zero = None    # distributed.ZeroStudent owning the "student" group under hardware=zero2/zero3
        self.signals = StopSignals()   # active during fit
        if runtime.strategy in ("none", "ddp"):   # DeepSpeed's ZeRO hooks expect dense gradients
            sparse_tied_embedding_grad(method.student)
        if cfg.train.batch_size % (runtime.world_size * cfg.train.grad_accum):
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by world_size * grad_accum = "
                              f"{runtime.world_size} * {cfg.train.grad_accum}; each rank takes an equal slice of "
                              f"every micro-batch")

    # -- optimisation ----------------------------------------------------------------------------
    def build_optimizers(self, method, total_steps: int, schedule: str):
        tc = self.train_cfg
        self.groups = method.param_groups()
        self.optimizers, self.schedulers = {}, {}
        warmup = int(tc.warmup_ratio * total_steps)
        for name, group in self.groups.items():
            wd = tc.weight_decay if group.weight_decay is None else group.weight_decay
            opt = make_optimizer(group.params, group.lr, wd)
            self.optimizers[name] = opt
            self.schedulers[name] = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, warmup, schedule))
        distributed.broadcast_params(p for group in self.groups.values() for p in group.params)
        if self.runtime.strategy == "zero3" and set(self.groups) != {"student"}:
            # ZeRO-3 partitions every parameter of the (sharded) teacher, a module trained on it included
            raise ConfigError(f"hardware=zero3 trains only the student, but method={method.name} also trains "
                              f"{sorted(set(self.groups) - {'student'})}; use hardware=zero2 or hardware=ddp")
        if self.runtime.strategy in distributed.ZERO_STAGE and "student" in self.groups:
            # the schedule above stays kdlab's: it sets the lr of the param groups ZeRO's optimizer reads
            ds = distributed.deepspeed_config(self.runtime.strategy, self.runtime.cfg.dtype, tc, self.runtime.world_size,
                                              self.runtime.cfg.get("deepspeed"))
            self.zero = distributed.ZeroStudent(method.student, self.optimizers["student"], ds)

    def params(self) -> dict[str, list[torch.Tensor]]:
        # under ZeRO the engine checkpoints the student group (its parameters may be partitioned)
        return {name: list(group.params) for name, group in self.groups.items()
                if not (self.zero is not None and name == "student")}

    @staticmethod
    def zero_tag(phase_index: int, step: int) -> str:
        return f"phase{phase_index}-step{step:07d}"

    def steps_for(self, phase) -> int:
        tc = self.train_cfg
        if phase.max_steps is not None:
            return phase.max_steps
        per_epoch = len(self.train_items) // tc.batch_size
        if phase.epochs is not None:
            return phase.epochs * per_epoch
        if tc.max_steps is not None:
            return tc.max_steps
        return tc.epochs * per_epoch

    # -- checkpoints -------------------------------------------------------------------------------
    def checkpoint_state(self, phase_index: int, step: int, position: tuple[int, int], method) -> dict:
        state = {
            "phase": phase_index, "step": step, "epoch": position[0], "batch": position[1],
            "best_rouge": self.best_rouge, "phase_best_loss": self.phase_best_loss,
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
            "method": method.state_dict(), "elapsed_s": self.elapsed(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        if self.runtime.world_size > 1:   # each rank has its own stream (distributed.seed_rank)
            state["rank_rng"] = distributed.gather_objects((torch.get_rng_state(), random.getstate()))
            state["replica_digests"] = distributed.check_replicas(self.params())
        if self.zero is not None:         # ZeRO's optimizer states live in its own checkpoint
            del state["optimizers"]["student"]
        return state

    def restore(self, flat, state, method) -> None:
        restore_params(self.params(), flat)
        for k, o in self.optimizers.items():
            if self.zero is not None and k == "student":
                self.zero.load(self.ckpt_dir / "deepspeed", self.zero_tag(state["phase"], state["step"]))
                continue
            o.load_state_dict(state["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if len(state.get("rank_rng", [])) == self.runtime.world_size:
            torch.set_rng_state(state["rank_rng"][self.runtime.rank][0])
            random.setstate(state["rank_rng"][self.runtime.rank][1])
        self.best_rouge = state["best_rouge"]
        self.phase_best_loss = state.get("phase_best_loss", math.inf)
        method.load_state_dict(state["method"])

    def save(self, index: int, step: int, offset: int, position: tuple[int, int], method) -> None:
        """Every rank takes part (RNG states are gathered, ZeRO writes its shards); rank 0 writes the
        checkpoint, which points at the ZeRO tag only once that is complete; the others wait."""
        if self.zero is not None:
            self.zero.save(self.ckpt_dir / "deepspeed", self.zero_tag(index, step))
        state = self.checkpoint_state(index, step, position, method)
        if self.runtime.is_main:
            save_checkpoint(self.ckpt_dir, offset + step, self.params(), state)
            if self.zero is not None:   # the tags of the checkpoints kept (names sort by phase, then step)
                tags = sorted(p for p in (self.ckpt_dir / "deepspeed").iterdir() if p.is_dir())
                kept = tags[:tags.index(self.ckpt_dir / "deepspeed" / self.zero_tag(index, step)) + 1][-KEEP:]
                for old in set(tags) - set(kept):
                    shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()

    # -- validation --------------------------------------------------------------------------------
    def validate(self, step: int) -> dict:
        if not self.runtime.evaluates:
            distributed.barrier()
            return {}
        cfg = self.cfg.eval.copy()
        cfg.do_sample = False
        student = self.method.student
        result = evaluate(student, self.tokenizer, self.valid_items, cfg, self.runtime,
                          desc=f"valid@{step}")
        metrics = {"valid/rougeL": result["rougeL"], "valid/exact_match": result["exact_match"],
                   "valid/loss": result["loss"]}
        if result["rougeL"] > self.best_rouge:
            self.best_rouge = result["rougeL"]
            with distributed.full_params(student, self.runtime.strategy):
                if self.runtime.is_main:
                    save_pretrained(student, self.tokenizer, self.run_dir / "student_best")
        metrics["valid/best_rougeL"] = self.best_rouge
        distributed.barrier()
        return metrics

    def phase_best_dir(self, index: int) -> Path:
        return self.run_dir / f"phase{index}_best"

    def validate_phase_loss(self, index: int, name: str) -> dict:
        """Validation loss of a phase that keeps its best student; a new best is saved (safetensors)."""
        metrics = {}
        if self.runtime.evaluates:
            student = self.method.student
            loss = test_loss(student, self.valid_items, self.tokenizer, self.cfg.eval.batch_size, self.runtime.device,
                             self.runtime.autocast())
            metrics[f"valid/{name}_loss"] = loss
            if loss < self.phase_best_loss:
                self.phase_best_loss = loss
                with distributed.full_params(student, self.runtime.strategy):
                    if self.runtime.is_main:
                        with atomic_dir(self.phase_best_dir(index)) as tmp:
                            save_model(student, str(tmp / "model.safetensors"))
        distributed.barrier()
        return metrics

    def restore_phase_best(self, index: int) -> None:
        """Every rank loads the phase's lowest-validation-loss student (ZeRO-3: rank 0's copy is broadcast)."""
        path = self.phase_best_dir(index) / "model.safetensors"
        if path.exists():
            student = self.method.student
            with distributed.full_params(student, self.runtime.strategy, modify=True):
                load_model(student, str(path), device=str(self.runtime.device))
        distributed.barrier()

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> dict:
        if self.runtime.is_main:
            recover_dir(self.run_dir / "student_best")
            for index in range(len(self.method.phases())):
                recover_dir(self.phase_best_dir(index))
        resume = load_checkpoint(self.ckpt_dir)
        if resume is None:
            self.logger.truncate_after(0)   # a job killed before its first checkpoint logged steps it redoes
        start_phase = resume[1]["phase"] if resume else 0
        global_offset = 0
        phases = self.method.phases()
        t_start = time.time()
        elapsed = resume[1].get("elapsed_s", 0.0) if resume else 0.0
        self.elapsed = lambda: elapsed + time.time() - t_start
        with self.signals:
            for index, phase in enumerate(phases):
                total = self.steps_for(phase)
                if index < start_phase:
                    global_offset += total
                    continue
                self.run_phase(index, phase, total, global_offset, resume if index == start_phase else None,
                               validates=index == len(phases) - 1)
                global_offset += total
        return {"train_time_s": self.elapsed()}

    def run_phase(self, index, phase, total, offset, resume, validates: bool) -> None:
        """Train one phase; only the last phase validates (and so selects the best student)."""
        tc, method = self.train_cfg, phase.method
        self.build_optimizers(method, total, phase.schedule or tc.schedule)
        step, epoch, batch_index = 0, 0, 0
        self.phase_best_loss = math.inf
        keeps_best = phase.keep_best_valid_loss and not validates and bool(tc.eval_every)
        if resume is not None:
            flat, state = resume
            self.restore(flat, state, method)
            step, epoch, batch_index = state["step"], state["epoch"], state["batch"]
            self.logger.truncate_after(offset + step)
        micro = tc.batch_size // tc.grad_accum
        data = batches(self.train_items, micro, self.tokenizer.pad_token_id, self.cfg.seed, epoch,
                       batch_index * tc.grad_accum)
        position = (epoch, batch_index)
        bar = tqdm(total=total, initial=step, desc=phase.name, dynamic_ncols=True, disable=not self.runtime.is_main)
        while step < total:
            t0 = time.time()
            logs, tokens = {}, 0
            for _ in range(tc.grad_accum):
                epoch, micro_index, batch = next(data)
                batch = distributed.rank_slice(batch, self.runtime.rank, self.runtime.world_size).to(self.runtime.device)
                with self.runtime.autocast():
                    out = method.loss(batch, offset + step)
                if self.zero is not None:
                    self.zero.backward(out.loss)    # DeepSpeed divides by its gradient_accumulation_steps
                else:
                    (out.loss / tc.grad_accum).backward()
                tokens += int(batch.attention_mask.sum())
                for k, v in {"loss": out.loss.item(), **out.logs}.items():
                    logs[k] = logs.get(k, 0.0) + v / tc.grad_accum
            position = (epoch, (micro_index + 1) // tc.grad_accum)
            for name, opt in self.optimizers.items():
                if self.zero is not None and name == "student":
                    logs[f"grad_norm/{name}"] = self.zero.step()   # reduces, clips, steps, zeroes
                    logs[f"lr/{name}"] = self.schedulers[name].get_last_lr()[0]
                    self.schedulers[name].step()
                    continue
                # the mean over ranks of their micro-batch gradients = one process on the global batch
                distributed.average_gradients(self.groups[name].params)
                if tc.grad_clip:
                    norm = torch.nn.utils.clip_grad_norm_(self.groups[name].params, tc.grad_clip)
                    logs[f"grad_norm/{name}"] = float(norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                logs[f"lr/{name}"] = self.schedulers[name].get_last_lr()[0]
                self.schedulers[name].step()
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
            if validates and tc.eval_every and (step % tc.eval_every == 0 or step == total):
                metrics.update(self.validate(offset + step))
            if keeps_best and (step % tc.eval_every == 0 or step == total):
                metrics.update(self.validate_phase_loss(index, phase.name))
            if metrics:
                self.logger.log(metrics, step=offset + step)
            signum = self.signals.requested(self.runtime.device)
            if signum or tc.save_every and (step % tc.save_every == 0 or step == total):
                self.save(index, step, offset, position, method)
            if signum:
                bar.close()
                raise self.signals.stop(signum, offset + step)
        bar.close()
        if keeps_best:
            self.restore_phase_best(index)
