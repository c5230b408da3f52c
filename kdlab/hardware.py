"""The hardware group: device, dtype and (for distributed strategies) the process group."""
from __future__ import annotations

import contextlib
import os
import platform
import random
from collections import Counter
from dataclasses import dataclass

import torch

from kdlab.config import ConfigError, OneOf, Range, Type, check_section
from kdlab.distributed import STRATEGIES, dist_env, init_process_group, local_env, zero3_model_init

SCHEMA = {
    "device": OneOf("cpu", "cuda"),
    "dtype": OneOf("float32", "bfloat16", "float16"),
    "num_threads": Range(1, integer=True, optional=True),
    "teacher_checkpointing": Type(bool),  # method=okd: recompute the teacher's blocks in the backward
    "slurm": Type(dict),
    # absent in cpu/gpu: one process (see kdlab.distributed for the others)
    "strategy": OneOf(*STRATEGIES),
    "timeout_min": Range(1, optional=True),      # process-group timeout: longer than the longest evaluation
    "deepspeed": Type(dict, optional=True),      # merged into the generated DeepSpeed config (zero2/zero3)
}


def validate_hardware(cfg) -> None:
    check_section("hardware", cfg, SCHEMA)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        name = cfg.get("name", "gpu")
        fix = ("hardware=cpu" if cfg.get("strategy", "none") == "none"
               else f"hardware.device=cpu hardware.dtype=float32 (hardware={name} on CPU processes, gloo)")
        raise ConfigError(f"hardware={name} (hardware.device=cuda) but no CUDA device is visible; run on a GPU "
                          f"node or use {fix}")
    env = dist_env()
    if cfg.get("strategy", "none") == "none" and env is not None and env.world_size > 1 and "RANK" in os.environ:
        raise ConfigError(f"launched as {env.world_size} processes (torchrun) but hardware={cfg.get('name')} runs one; "
                          f"use hardware=ddp (or zero2/zero3)")
    if cfg.get("strategy", "none") in ("zero2", "zero3"):
        try:
            import deepspeed  # noqa: F401
        except ImportError as err:
            raise ConfigError(f"hardware={cfg.get('name')} needs DeepSpeed ({err}); pip install deepspeed") from err


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world_size: int = 1
    strategy: str = "none"
    # the hardware section (DeepSpeed settings); None for a plain single-process runtime
    cfg: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def evaluates(self) -> bool:
        """Whether this rank runs evaluation: rank 0 only (the others wait at a barrier), except under
        ZeRO-3 where every forward pass is collective (each rank gathers the shards it lacks)."""
        return self.is_main or self.strategy == "zero3"

    def autocast(self):
        """bf16/fp16 autocast on CUDA; on the CPU everything runs in the weights' dtype."""
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()


def setup_runtime(cfg) -> Runtime:
    if cfg.get("num_threads"):
        torch.set_num_threads(cfg.num_threads)
    strategy = cfg.get("strategy", "none")
    # a distributed strategy started as one plain process gets a group of one (DeepSpeed needs a group)
    env = (dist_env() or local_env()) if strategy != "none" else None
    rank, world, local = (env.rank, env.world_size, env.local_rank) if env else (0, 1, 0)
    if env is not None:
        init_process_group(env, cfg.device, cfg.get("timeout_min") or 120)
    device = torch.device(cfg.device, local) if cfg.device == "cuda" else torch.device("cpu")
    # The frozen teacher loads in hardware.dtype (bf16 with hardware=gpu); the trained student keeps fp32
    # weights for the optimizer and computes under autocast in that dtype on a GPU (all fp32 on the CPU).
    return Runtime(device=device, dtype=getattr(torch, cfg.dtype), rank=rank, world_size=world, strategy=strategy,
                   cfg=cfg)


def start_runtime(cfg) -> Runtime:
    """The job's runtime (``cfg.hardware``), seeded with ``cfg.seed``; under ZeRO-3 registered so that models
    are created already sharded (:func:`kdlab.distributed.zero3_model_init`)."""
    runtime = setup_runtime(cfg.hardware)
    zero3_model_init(runtime, cfg.train)
    seed_everything(cfg.seed)
    return runtime


def seed_everything(seed: int) -> None:
    """Python and torch RNGs (CPU and CUDA). CPU runs are bitwise reproducible on the same CPU model, torch
    build and thread count; another CPU model runs other kernels (RESULTS.md: an Intel Xeon rerun of an AMD EPYC
    run agreed to about 3e-7 relative at step 10, not bitwise), which results.json's ``run.machine`` records. On
    GPUs some kernels (atomics in attention backward, cuBLAS split-K) are not deterministic, so GPU reruns agree
    only to within floating-point noise."""
    random.seed(seed)
    torch.manual_seed(seed)


def machine_text() -> str:
    """The machine a job's times and numbers were measured on, as results.json's ``run.machine`` records it:
    the CPU model, its cores, torch's thread count and the visible GPUs (e.g. ``AMD EPYC 7B13, 2 CPUs, 1 torch
    thread``)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    threads = torch.get_num_threads()
    text = f"{cpu}, {os.cpu_count()} CPUs, {threads} torch thread{'s' if threads > 1 else ''}"
    if torch.cuda.is_available():
        gpus = Counter(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        text += ", " + ", ".join(f"{n} x {name}" for name, n in gpus.items())
    return text
