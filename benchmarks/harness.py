"""Shared benchmark machinery: argument parsing, timing, peak tensor memory, machine info, records.

Peak memory method: :func:`peak_tensor_bytes` runs the step once under ``torch.profiler`` with
``profile_memory=True``, which records every allocation and free made through torch's allocators;
the peak is the maximum of their running sum in time order. It counts tensor bytes created during the
step (intermediates, saved activations, the produced gradients) on top of whatever existed before, and
nothing else (no Python objects, no allocator slack), so it isolates what the code under test costs and
does not depend on what the process did earlier (unlike RSS, whose freed pages glibc may keep). On CUDA
(``--device=cuda``) it is the caching allocator's peak of allocated bytes during the step above those
allocated before it: the same quantity, read from the allocator's counters.

Models: :func:`load_models` (``--teacher``/``--student``: conf file names, default the embedded
SmolLM2-135M and its 6-layer student; ``--device``: cpu, or cuda where steps run under bf16 autocast
with fp32 weights as kdlab's ``hardware=gpu`` does). Where the teacher's weights cannot travel (a GPU
machine without network, tests/gpu), ``--teacher_shape=DIR`` builds the teacher from DIR's
``config.json`` and tokenizer (tests/gpu/model_shape.py writes the embedded teacher's, 3.4 MB) with
random weights: the same architecture, vocabulary and FLOPs, so the same step times; only what depends
on the weights' values (sampled lengths, losses) differs. ``--teacher=tiny --student=tiny`` needs
nothing at all and runs every code path on tiny models.
"""
from __future__ import annotations

import ast
import datetime as dt
import gc
import importlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results.jsonl"


def parse_args(argv: list[str]) -> dict:
    """``--key=value`` pairs; values are Python literals when they parse, comma lists become lists."""
    args = {}
    for item in argv:
        if not item.startswith("--") or "=" not in item:
            raise SystemExit(f"expected --key=value, got {item!r}")
        key, raw = item[2:].split("=", 1)
        parts = [_literal(p) for p in raw.split(",")]
        args[key.replace("-", "_")] = parts if len(parts) > 1 else parts[0]
    return args


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False}.get(text.lower(), text)


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    u = platform.uname()
    return {"uname": f"{u.system} {u.release} {u.machine}", "cpu": cpu, "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "loadavg_1m": round(os.getloadavg()[0], 2),
            **({"gpu": torch.cuda.get_device_name()} if torch.cuda.is_initialized() else {})}


def load_models(args: dict):
    """``(teacher, student, tokenizer, template, runtime)`` of a benchmark on ``--device`` (module docstring)."""
    from kdlab.config import load_option
    from kdlab.hardware import Runtime
    from kdlab.student import build_student
    from kdlab.teacher import load_teacher

    teacher_cfg = load_option("teacher", str(args.get("teacher", "smollm2-135m")))
    student_cfg = load_option("student", str(args.get("student", "smollm2-6l")))
    if args.get("teacher_shape"):
        teacher, tok = random_teacher(str(args["teacher_shape"]))
    else:
        teacher, tok = load_teacher(teacher_cfg, torch.float32)
    student, tok = build_student(student_cfg, teacher, tok, teacher_cfg.name, torch.float32)
    device = torch.device(args.get("device", "cpu"))
    runtime = Runtime(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    return teacher.to(device), student.to(device), tok, teacher_cfg.template, runtime


def autocast_steps(steps: dict[str, Callable[[], object]], runtime) -> dict[str, Callable[[], object]]:
    """Each step under ``runtime``'s autocast (bf16 on CUDA, none on the CPU), as kdlab's trainer runs it."""
    def wrap(step):
        def run():
            with runtime.autocast():
                return step()
        return run

    return {name: wrap(step) for name, step in steps.items()}


def placement(runtime) -> str:
    """Where a benchmark's steps ran, for its notes: e.g. ``cuda bfloat16`` (autocast) or ``cpu float32``."""
    return f"{runtime.device.type} {str(runtime.dtype).removeprefix('torch.')}"


def teacher_label(args: dict) -> str:
    """The teacher a benchmark ran, for its notes."""
    name = args.get("teacher", "smollm2-135m")
    return f"{name} (random weights, {args['teacher_shape']})" if args.get("teacher_shape") else name


def random_teacher(folder: str):
    """A frozen fp32 teacher with ``folder``'s config.json and tokenizer and random weights (seed 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from kdlab.modeling import freeze

    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    return freeze(model), tok


def _sync() -> None:
    """Wait for queued CUDA work, so that a host clock read after it times the work itself."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_times(steps: dict[str, Callable[[], object]], repeats: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median wall-clock seconds of each step; runs are interleaved (a, b, a, b, ...) so that load from
    other processes on a shared machine hits every variant alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            gc.collect()
            _sync()
            t0 = time.perf_counter()
            step()
            _sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_tensor_bytes(step: Callable[[], object]) -> int:
    """Peak bytes of tensors allocated during one ``step()`` above what existed before (module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    if torch.cuda.is_initialized():
        _sync()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        _sync()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    peak = current = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def markdown(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for row in rows for k in row))
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in cols) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__.splitlines()[0] + "\nusage: python -m benchmarks <name> [--key=value ...]")
        return 2
    name, args = argv[0], parse_args(argv[1:])
    module = importlib.import_module(f"benchmarks.{name}")
    started, load_before = dt.datetime.now(dt.timezone.utc), round(os.getloadavg()[0], 2)
    result = module.run(args)
    record = {"benchmark": name, "date": started.isoformat(timespec="seconds"),
              "command": shlex.join([Path(sys.executable).name, "-m", "benchmarks", *argv]),
              "machine": {**machine(), "loadavg_1m_before": load_before}, "args": args, **result}
    with RESULTS.open("a") as f:
        f.write(json.dumps(record) + "\n")
    m = record["machine"]
    print(f"\n`{record['command']}` on {m['cpu']} ({m['cores']} cores, {m['uname']}, torch {m['torch']}), "
          f"{record['date']}, load average {m['loadavg_1m_before']} before / {m['loadavg_1m']} after\n")
    print(markdown(result["rows"]))
    for note in result.get("notes", []):
        print(f"\n{note}")
    return 0
