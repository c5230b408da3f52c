"""The trainer's optimizers: one per parameter group of the method, with its learning-rate schedule.

Whatever ``hardware.strategy``, an optimizer offers what :class:`kdlab.distributed.ZeroStudent` does, so
the loop never asks which one it has: ``backward(loss)`` per micro-batch, ``step()`` per optimizer step
(the gradient norm, or ``None`` when nothing computed it; :class:`ReplicatedAdamW` raises
:class:`NonFiniteGradient` and applies nothing when it is not finite), ``save(folder, tag)`` (what the
trainer's checkpoint keeps for it; ``None`` when it wrote its own files under ``folder/tag``, as ZeRO's
sharded states are), ``load(folder, tag, saved)``, and ``checkpoint_params`` (the parameters the
trainer's checkpoint holds). :class:`ReplicatedAdamW` is every group outside ZeRO (one process or DDP).
"""
from __future__ import annotations

import math

import torch

from kdlab import distributed
from kdlab.config import ConfigError


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


class NonFiniteGradient(ArithmeticError):
    """A parameter group's gradient norm is NaN or infinite (``norm``); its step was not applied."""

    def __init__(self, norm: float):
        super().__init__(f"gradient norm {norm}")
        self.norm = norm


class ReplicatedAdamW:
    """A parameter group on :func:`make_optimizer`'s AdamW, replicated on every rank: after backward the
    gradients are averaged over ranks (the mean of the ranks' micro-batch gradients is one process's
    gradient of the global batch), then clipped by ``grad_clip``."""

    def __init__(self, params, optimizer: torch.optim.Optimizer, grad_accum: int, grad_clip: float | None):
        self.params, self.optimizer = list(params), optimizer
        self.grad_accum, self.grad_clip = grad_accum, grad_clip
        self.checkpoint_params = self.params

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> float | None:
        """Apply the step; the gradient norm when clipping. Raises :class:`NonFiniteGradient` (and applies
        nothing) when a gradient holds NaN or infinity: the weights would be poisoned for good."""
        distributed.average_gradients(self.params)
        # without clipping, max_norm=inf measures the norm and scales by exactly 1 (the same gradients)
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip or math.inf))
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteGradient(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm if self.grad_clip else None

    def save(self, folder, tag: str) -> dict:
        """Its state, kept in the trainer's checkpoint (``folder`` and ``tag`` are ZeRO's)."""
        return self.optimizer.state_dict()

    def load(self, folder, tag: str, saved: dict) -> None:
        self.optimizer.load_state_dict(saved)


def build(method, train, total_steps: int, schedule: str, runtime):
    """``(optimizers, schedules)`` by parameter group of ``method``: the ``student`` group on a
    :class:`distributed.ZeroStudent` under hardware=zero2/zero3, every other group on :class:`ReplicatedAdamW`."""
    groups = method.param_groups()
    optimizers, schedules = {}, {}
    warmup = int(train.warmup_ratio * total_steps)
    for name, group in groups.items():
        wd = train.weight_decay if group.weight_decay is None else group.weight_decay
        optimizers[name] = make_optimizer(group.params, group.lr, wd)
        schedules[name] = torch.optim.lr_scheduler.LambdaLR(optimizers[name], lr_lambda(total_steps, warmup, schedule))
    distributed.broadcast_params(p for group in groups.values() for p in group.params)
    if runtime.strategy == "zero3" and set(groups) != {"student"}:
        # ZeRO-3 partitions every parameter of the (sharded) teacher, a module trained on it included
        raise ConfigError(f"hardware=zero3 trains only the student, but method={method.name} also trains "
                          f"{sorted(set(groups) - {'student'})}; use hardware=zero2 or hardware=ddp")
    for name, group in groups.items():
        if runtime.strategy in distributed.ZERO_STAGE and name == "student":
            # the schedule stays kdlab's: it sets the lr of the param groups ZeRO's optimizer reads
            ds = distributed.deepspeed_config(runtime.strategy, runtime.cfg.dtype, train, runtime.world_size,
                                              runtime.cfg.get("deepspeed"))
            optimizers[name] = distributed.ZeroStudent(method.student, optimizers[name], ds)
        else:
            optimizers[name] = ReplicatedAdamW(group.params, optimizers[name], train.grad_accum, train.grad_clip)
    return optimizers, schedules
