"""Multi-process training: the process group, rank helpers, reductions and DeepSpeed configs.

``hardware.strategy`` (conf/hardware/*.yaml) picks how a job scales:

- ``none`` (``hardware=cpu|gpu``): one process.
- ``ddp``: N processes (``torchrun --nproc_per_node N``, or ``srun`` with one task per GPU), each with
  a full replica of teacher and student. After each backward the gradients of every parameter group
  are averaged with ``all_reduce`` (:func:`average_gradients`) instead of wrapping the student in
  ``DistributedDataParallel``: the methods run the student several times per step (generation, PPO
  epochs, OKD's teacher adapter in the same backward), which DDP's one-forward-one-backward hooks
  handle only with ``find_unused_parameters``/``no_sync`` care per method, while averaging after
  backward is correct for any ``Method.loss`` and keeps ``method.student`` the plain HF model (so
  ``generate`` and ``save_pretrained`` work unchanged). The price is no overlap of communication with
  backward (one flat all-reduce per group per step).
- ``zero2`` / ``zero3``: DeepSpeed ZeRO for the ``student`` group (:class:`ZeroStudent`); other
  groups (OKD's teacher adapter) stay on AdamW + :func:`average_gradients` (``kdlab.optim``). Under ZeRO-3 the frozen
  teacher is sharded too, inference-only (:func:`shard_teacher`). See docs/SCALING.md.

Data: the global batch ``train.batch_size`` is cut into ``grad_accum`` micro-batches, each of which is
cut into ``world_size`` contiguous slices (:func:`rank_slice`); every rank walks the same epoch
permutation, so the sequence of global batches, and resumption, do not depend on the world size.

Rendezvous: torchrun's ``RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT``, else SLURM's
``SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID`` with the master at the first host of
``SLURM_JOB_NODELIST`` (``scontrol show hostnames``) and a port derived from the job id.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import random
import re
import socket
import subprocess
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist

STRATEGIES = ("none", "ddp", "zero2", "zero3")
ZERO_STAGE = {"zero2": 2, "zero3": 3}


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``gpu[03-05,09],cpu1`` -> ``gpu03``): ``scontrol show
    hostnames`` where SLURM is installed, else the list's first entry expanded by hand."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    prefix, ranges = match.group(1), match.group(2)
    return prefix + re.split(r"[-,]", ranges)[0] if ranges else prefix


def dist_env(environ=None) -> DistEnv | None:
    """The process's place in the job from torchrun's or SLURM's environment; ``None`` if neither."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        # One port per job so two jobs sharing a node do not collide.
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000))
        addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "localhost"))
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), addr, port)
    return None


def local_env() -> DistEnv:
    """A group of one process on this host (a free port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return DistEnv(0, 1, 0, "127.0.0.1", sock.getsockname()[1])


def init_process_group(env: DistEnv, device: str, timeout_min: float) -> None:
    """Join the job's process group (NCCL on GPUs, gloo on the CPU). The timeout bounds how long ranks
    wait at a barrier, e.g. while rank 0 evaluates: it must exceed the longest evaluation."""
    if dist.is_initialized():
        return
    os.environ.update(MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port), RANK=str(env.rank),
                      WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank))
    if device == "cuda":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(minutes=timeout_min))


def shutdown() -> None:
    """Leave the process group once every rank is done (rank 0 writes the results last)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def seed_rank(seed: int, rank: int) -> None:
    """Give each rank its own RNG stream for training (dropout, on-policy sampling) once the models are
    built identically from ``seed``; rank 0 keeps the single-process stream."""
    if rank > 0:
        torch.manual_seed(seed * 1_000_003 + rank)
        random.seed(seed * 1_000_003 + rank)


# -- data ------------------------------------------------------------------------------------------
def rank_slice(batch, rank: int, world_size: int):
    """This rank's contiguous slice of a global micro-batch (:class:`kdlab.data.Batch`), with the
    padding columns no row of the slice uses removed, so it equals ``collate`` of the slice's items."""
    if world_size == 1:
        return batch
    n = len(batch) // world_size
    rows = slice(rank * n, (rank + 1) * n)
    width = int(batch.attention_mask[rows].sum(1).max())          # right-padded
    start = batch.prompt_mask.shape[1] - int(batch.prompt_mask[rows].sum(1).max())  # left-padded
    return replace(batch, input_ids=batch.input_ids[rows, :width], attention_mask=batch.attention_mask[rows, :width],
                   labels=batch.labels[rows, :width], response_mask=batch.response_mask[rows, :width],
                   prompt_ids=batch.prompt_ids[rows, start:], prompt_mask=batch.prompt_mask[rows, start:],
                   examples=batch.examples[rows])


# -- reductions ------------------------------------------------------------------------------------
def average_gradients(params) -> None:
    """Average ``.grad`` over ranks in one flat all-reduce. A parameter keeps ``grad=None`` only if it
    has none on every rank (AdamW skips it, as in one process); otherwise a rank without a gradient
    contributes zeros."""
    if not is_distributed():
        return
    params = list(params)
    if not params:
        return
    ref = params[0]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
                     + [torch.tensor([float(p.grad is not None) for p in params], device=ref.device)])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        chunk = flat[offset:offset + n].view_as(p).to(p.dtype)
        p.grad = chunk if p.grad is None else p.grad.copy_(chunk)
        offset += n
    for p, has in zip(params, flat[offset:].tolist()):
        if has == 0:
            p.grad = None


def reduce_logs(logs: dict[str, float], sums: tuple[str, ...] = ()) -> dict[str, float]:
    """Average every logged value over the ranks that logged it (methods may log a key on some
    micro-batches only); keys in ``sums`` (token counts) are added instead."""
    if not is_distributed():
        return logs
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, logs)
    out = {}
    for key in {k for g in gathered for k in g}:
        values = [g[key] for g in gathered if key in g]
        out[key] = sum(values) if key in sums else sum(values) / len(values)
    return {k: out[k] for k in sorted(out)}


def any_rank(flag: bool, device) -> bool:
    """Whether ``flag`` holds on any rank (the same answer on every rank)."""
    if not is_distributed():
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def digest(params: dict[str, list[torch.Tensor]]) -> str:
    """SHA-256 of the bytes of every parameter, group by group."""
    h = hashlib.sha256()
    for name in sorted(params):
        for p in params[name]:
            h.update(p.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_replicas(params: dict[str, list[torch.Tensor]]) -> list[str]:
    """Every rank's :func:`digest`; raises if they differ. Replicas must stay bitwise equal: they start
    from rank 0's values and apply the same all-reduced gradients (all-reduce gives every rank the same
    result), so a difference means a rank trained on something the others did not."""
    digests = gather_objects(digest(params))
    if len(set(digests)) > 1:
        raise RuntimeError(f"the ranks' trainable parameters differ (digests {digests}); replicas diverged")
    return digests


def broadcast_params(params) -> None:
    """Copy rank 0's values into every rank's parameters (replicas start identical even if a random
    init differed by hardware)."""
    if is_distributed():
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)


# -- DeepSpeed -------------------------------------------------------------------------------------
def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (extra or {}).items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(strategy: str, dtype: str, train, world_size: int, extra: dict | None = None) -> dict:
    """The DeepSpeed config of the student's engine, from the hardware and train groups.

    Batch sizes follow kdlab's meaning of ``train.batch_size`` (the global batch of one optimizer
    step): micro-batch per rank = batch_size / (world_size * grad_accum). Clipping is DeepSpeed's
    (global norm over the student's partitions). The optimizer and schedule are kdlab's (a client
    AdamW and LambdaLR), hence ``zero_allow_untested_optimizer``. ``hardware.deepspeed`` entries are
    merged in last (e.g. ``zero_optimization.offload_optimizer.device=cpu``).
    """
    stage = ZERO_STAGE[strategy]
    zero = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
            "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8}
    if stage == 3:
        del zero["allgather_bucket_size"]
        zero.update({"stage3_gather_16bit_weights_on_model_save": True, "stage3_prefetch_bucket_size": 5e8,
                     "stage3_param_persistence_threshold": 1e5})
    config = {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": train.batch_size // (world_size * train.grad_accum),
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": float(train.grad_clip or 0.0),
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _merge(config, extra)


def teacher_deepspeed_config(dtype: str, train, world_size: int) -> dict:
    """ZeRO-3 inference for the frozen teacher: parameters sharded over ranks and gathered layer by
    layer in forward; no optimizer, so no gradients or optimizer states exist for it."""
    return {
        "train_micro_batch_size_per_gpu": train.batch_size // (world_size * train.grad_accum),
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1e5,
                              "stage3_prefetch_bucket_size": 5e8},
        "steps_per_print": 2**31 - 1,
    }


class _World:
    """Stands in for ``deepspeed.comm`` while a config is validated without a process group: DeepSpeed
    reads the rank and world size from it to check the batch arithmetic."""

    def __init__(self, world_size: int):
        self.world_size = world_size

    def get_rank(self) -> int:
        return 0

    def get_world_size(self, group=None) -> int:
        return self.world_size


def validate_deepspeed_config(config: dict, world_size: int):
    """DeepSpeed's own validation (batch arithmetic for ``world_size`` ranks, known keys and types),
    without a process group; returns the parsed ``DeepSpeedConfig``."""
    from unittest import mock

    import deepspeed.runtime.config as ds_config
    with mock.patch.object(ds_config, "dist", _World(world_size)):
        return ds_config.DeepSpeedConfig(copy.deepcopy(config))


class ZeroStudent:
    """The ``student`` parameter group under DeepSpeed ZeRO: the engine owns the optimizer states (and,
    ZeRO-2/3, the gradients) sharded over ranks, their reduction, clipping and checkpoint.

    ``method.student`` stays the HF module the engine wraps: calling it directly runs the same
    parameters (ZeRO-3's gather/release hooks sit on its submodules), so ``Method.loss`` and
    ``generate`` need no change. The trainer calls :meth:`backward` with the unscaled micro-batch loss
    (DeepSpeed divides by ``gradient_accumulation_steps``) and :meth:`step` once per optimizer step, as
    it calls every optimizer (``kdlab.optim``).
    """

    def __init__(self, model, optimizer, config: dict):
        import deepspeed
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.checkpoint_params = []   # the engine checkpoints them (partitioned under ZeRO-3), not the trainer

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float:
        """The engine steps at the accumulation boundary; returns the global grad norm before clipping."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, folder, tag: str) -> None:
        """Writes the engine's shards to ``folder/tag``; nothing goes into the trainer's checkpoint."""
        self.engine.save_checkpoint(str(folder), tag=tag, save_latest=False)

    def load(self, folder, tag: str, saved=None) -> None:
        self.engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)


_HF_DEEPSPEED = None   # transformers holds only a weak reference to it: kept alive for the whole run


def zero3_model_init(runtime, train) -> None:
    """Under ZeRO-3, register the DeepSpeed config with transformers (``HfDeepSpeedConfig``) before any
    model is built: ``from_pretrained``/``from_config`` then create parameters already partitioned
    (``deepspeed.zero.Init``), so no rank ever holds the whole teacher, and ``generate`` runs with
    ``synced_gpus`` (every rank keeps stepping until all have finished, since each forward is collective)."""
    global _HF_DEEPSPEED
    if runtime.strategy == "zero3":
        from transformers.integrations import HfDeepSpeedConfig
        _HF_DEEPSPEED = HfDeepSpeedConfig(deepspeed_config("zero3", runtime.cfg.dtype, train, runtime.world_size,
                                                           runtime.cfg.get("deepspeed")))


def shard_teacher(teacher, config: dict):
    """Shard the frozen teacher with ZeRO-3 and no optimizer (inference-only); returns the module with
    its parameters partitioned (gathered per layer in forward)."""
    import deepspeed
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine.module


def full_params(model, strategy: str, modify: bool = False):
    """A context in which every rank holds ``model``'s full parameters (ZeRO-3 gathers its shards, for
    saving or for a forward pass outside the engine); a no-op otherwise. ``modify``: rank 0's changes
    to them are scattered back to every rank's shard on exit."""
    if strategy != "zero3":
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0 if modify else None)
