"""OKD step time against its physical floor and against KD on the embedded models: ``python -m benchmarks okd``.

Teacher SmolLM2-135M-Instruct (GGUF, fp32, 30 blocks), student ``smollm2-6l`` (6 of its blocks), the
same batch for all: ``--batch`` sequences (4) of ``--prompt`` (96) prompt + ``--response`` (32)
response tokens, random ids, logits at response positions only. A step is what the trainer does:
``loss``, backward, one AdamW step per parameter group.

- ``kd`` (``conf/method/kd.yaml``, forward KL): the teacher runs without gradients.
- ``floor``: the work any OKD implementation must do, with no LoRA at all: the teacher forward under
  autograd from the input of the lowest adapted block (block 0 for every-block LoRA), OKD's two losses
  (Rao et al. Eqs. 16-17) on its logits, the backward down to that input, and the student's forward,
  backward and optimizer step. OKD's step over this is the online module's own cost (LoRA's matmuls,
  its dropout, peft's dispatch).
- ``okd <variant>`` (``conf/method/okd.yaml``): ``lora`` (the default: every block, dropout 0.1),
  ``lora@K`` / ``lora@0.25`` (the last K blocks / a fraction), ``lora-nodrop`` (``method.dropout=0``:
  peft skips the dropout; a different run than the default, so an option only), ``lora-ckpt``
  (``hardware.teacher_checkpointing=true``: the teacher's blocks recomputed in the backward, same
  gradients), ``prefix``, ``ptuning``.

Steps of all variants alternate round by round, so a shared, busy CPU slows them alike; ratios are the
medians of the per-round ratios. Target (issue 13): the default OKD step <= 1.15 x its floor.

Args: ``--variants`` (``lora,lora-nodrop,lora-ckpt``), ``--repeats`` (5), ``--batch``, ``--prompt``, ``--response``,
``--memory`` (true: peak tensor bytes of one step), ``--seed`` (0).
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
from omegaconf import OmegaConf

from benchmarks.harness import as_list, peak_tensor_bytes
from kdlab.config import load_option
from kdlab.data import Encoded, collate
from kdlab.divergences import build_divergence
from kdlab.divergences.losses import ForwardKL
from kdlab.hardware import Runtime
from kdlab.methods import build_method
from kdlab.methods.base import Context
from kdlab.methods.okd import adapted_blocks
from kdlab.modeling import layer_list
from kdlab.student import build_student
from kdlab.teacher import load_teacher
from kdlab.optim import make_optimizer

GB = 1024**3


def make_step(method, batch):
    opts = [make_optimizer(g.params, g.lr, 0.0) for g in method.param_groups().values()]

    def step():
        method.loss(batch, 0).loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def okd_config(variant: str):
    """``(method config, hardware.teacher_checkpointing)`` of a variant (module docstring)."""
    module, _, last = variant.partition("@")
    cfg = OmegaConf.load("conf/method/okd.yaml")
    if module == "lora-nodrop":
        module, cfg.dropout = "lora", 0.0
    checkpointing = module == "lora-ckpt"
    cfg.online_module = "lora" if checkpointing else module
    if last:
        cfg.lora_layers = float(last) if "." in last else int(last)
    return cfg, checkpointing


def make_floor_step(kd, okd_cfg, batch):
    """OKD's step with a LoRA-free teacher: autograd from the lowest adapted block's input (module docstring)."""
    blocks = layer_list(kd.teacher)
    lowest = (adapted_blocks(len(blocks), okd_cfg.lora_layers) or [0])[0]

    def track_input(_module, args, kwargs):  # a leaf that needs a gradient: the backward stops here
        if args:
            return (args[0].detach().requires_grad_(), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_()}

    blocks[lowest].register_forward_pre_hook(track_input, with_kwargs=True)
    div = kd.ctx.divergence
    module_div = ForwardKL(tau=div.tau, scale_by_tau_squared=div.scale != 1.0, chunk_size=div.chunk_size)
    opt = make_optimizer([p for p in kd.student.parameters() if p.requires_grad], okd_cfg.lr, 0.0)
    alpha = okd_cfg.alpha

    def step():
        student = kd.logits(kd.student, batch)
        teacher = kd.logits(kd.teacher, batch)
        loss = (div(student, teacher.detach()) + alpha * module_div(teacher, student.detach())
                + (1 - alpha) * kd.nll(teacher, batch))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def run(args: dict) -> dict:
    repeats = int(args.get("repeats", 5))
    b, p, r = int(args.get("batch", 4)), int(args.get("prompt", 96)), int(args.get("response", 32))
    torch.manual_seed(int(args.get("seed", 0)))
    t0 = time.time()
    teacher, tok = load_teacher(load_option("teacher", "smollm2-135m"), torch.float32)
    student_cfg = load_option("student", "smollm2-6l")
    student, _ = build_student(student_cfg, teacher, tok, "smollm2-135m", torch.float32)
    load_s = time.time() - t0
    vocab = len(tok)
    items = [Encoded(torch.randint(0, vocab, (p,)).tolist(), torch.randint(0, vocab, (r,)).tolist(), {})
             for _ in range(b)]
    batch = collate(items, tok.pad_token_id)

    def method(cfg, checkpointing=False):
        runtime = Runtime(torch.device("cpu"), torch.float32,
                          cfg=OmegaConf.create({"teacher_checkpointing": checkpointing}))
        ctx = Context(teacher=copy.deepcopy(teacher), student=copy.deepcopy(student), tokenizer=tok,
                      divergence=build_divergence({"name": "fkl"}), runtime=runtime, train_cfg=None)
        return build_method(cfg, ctx)

    kd_cfg = OmegaConf.load("conf/method/kd.yaml")
    default = OmegaConf.load("conf/method/okd.yaml")
    steps = {"kd": make_step(method(kd_cfg), batch), "floor": make_floor_step(method(kd_cfg), default, batch)}
    for variant in as_list(args.get("variants", "lora,lora-nodrop,lora-ckpt")):
        steps[f"okd {variant}"] = make_step(method(*okd_config(variant)), batch)
    for step in steps.values():  # warm-up (allocator growth, first-call overheads)
        step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, ts in times.items():
        row = {"method": name, "median step s": statistics.median(ts), "min step s": min(ts),
               "x floor": statistics.median(t / f for t, f in zip(ts, times["floor"])),
               "x kd": statistics.median(t / k for t, k in zip(ts, times["kd"]))}
        if args.get("memory", True):
            row["peak GB"] = peak_tensor_bytes(steps[name]) / GB
        rows.append(row)
    return {"rows": rows, "notes": [(
        f"batch {b} x ({p} prompt + {r} response) tokens, {r * b} response rows, vocab {vocab}; teacher+student "
        f"load {load_s:.0f} s; {repeats} alternating rounds after one warm-up step each; torch threads "
        f"{torch.get_num_threads()}. floor: no LoRA, autograd from the input of the default's lowest adapted "
        f"block. 'peak GB': tensor bytes allocated during one step (torch.profiler).")]}
