"""Full ``kd`` training step against its floors, on REFERENCE.md's "smollm" setup.

Models: the embedded teacher SmolLM2-135M-Instruct (GGUF, dequantised to fp32) and the ``smollm2-6l``
student (6 of its 30 blocks; REFERENCE.md's numbers used a 4-layer student). One batch of 4 sequences
x 256 tokens, the last ``response`` (32) of each being response tokens (random token ids: speed does
not depend on them). Every row is one optimizer step of the student: forward, backward, AdamW step.

- ``floor_full``: teacher forward + student forward/backward, full ``(B, T, V)`` logits of both, plain
  cross-entropy on every position (what a loss that needs every position costs at least).
- ``floor_response``: the same with both LM heads on the response positions only and cross-entropy on
  them (the floor for any loss that needs only response positions, KD included).
- ``kd``: :class:`kdlab.methods.kd.KD` (``alpha`` 0.5, ``divergence`` fkl: chunked, response positions
  only) with the live teacher.
- ``kd_cached``: the same reading a top-``top_k`` teacher cache (``teacher.cache=``): no teacher forward.

Targets (issue 3): ``kd`` time <= 1.15x and tensor peak <= 1.1x ``floor_response``. Time: median of
``--repeats`` steps after ``--warmup`` steps, the variants interleaved (on shared cores, load then hits
all of them alike); peak: :func:`benchmarks.harness.peak_tensor_bytes` (tensor bytes allocated during
one step, gradients included; AdamW state exists before the step and is not counted). Args:
``--repeats`` (5), ``--warmup`` (2), ``--batch`` (4), ``--seq`` (256), ``--response`` (32),
``--divergence`` (fkl), ``--top_k`` (64), ``--threads`` (torch default), ``--seed`` (0),
``--teacher``/``--teacher_shape``/``--student``/``--device`` (:func:`benchmarks.harness.load_models`).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from benchmarks.harness import autocast_steps, load_models, median_times, peak_tensor_bytes, placement, teacher_label
from kdlab.optim import make_optimizer

GB = 1024**3
REFERENCE_S = {"floor_full": 3.51, "floor_response": 2.28, "kd": 2.32}   # REFERENCE.md, 4-layer student


def run(args: dict) -> dict:
    from kdlab.data import Encoded, collate
    from kdlab.divergences import build_divergence
    from kdlab.methods.base import Context
    from kdlab.methods.kd import KD
    from kdlab.modeling import response_logits
    from kdlab.teacher.topk_cache import TeacherCache, build_cache

    if args.get("threads"):
        torch.set_num_threads(int(args["threads"]))
    repeats, warmup = int(args.get("repeats", 5)), int(args.get("warmup", 2))
    b, t, r = int(args.get("batch", 4)), int(args.get("seq", 256)), int(args.get("response", 32))

    t0 = time.perf_counter()
    teacher, student, tok, _, runtime = load_models(args)
    load_s = time.perf_counter() - t0
    vocab = len(tok)
    g = torch.Generator().manual_seed(int(args.get("seed", 0)))
    items = [Encoded(torch.randint(0, vocab, (t - r,), generator=g).tolist(),
                     torch.randint(0, vocab, (r,), generator=g).tolist(), {}) for _ in range(b)]
    batch = collate(items, tok.pad_token_id).to(runtime.device)
    opt = make_optimizer([p for p in student.parameters() if p.requires_grad], 1e-5, 0.0)
    divergence = build_divergence({"name": args.get("divergence", "fkl")})

    def optimizer_step(loss):
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def floor_full():
        with torch.no_grad():
            teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[..., :vocab]
        optimizer_step(F.cross_entropy(logits[:, :-1].reshape(-1, vocab), batch.input_ids[:, 1:].reshape(-1)))

    def floor_response():
        with torch.no_grad():
            response_logits(teacher, batch.input_ids, batch.attention_mask, batch.response_mask, vocab)
        logits = response_logits(student, batch.input_ids, batch.attention_mask, batch.response_mask, vocab)
        optimizer_step(F.cross_entropy(logits, batch.labels[batch.response_mask]))

    def method(cache=None):
        ctx = Context(teacher=None if cache else teacher, student=student, tokenizer=tok, divergence=divergence,
                      runtime=runtime, train_cfg=None, teacher_cache=cache)
        kd = KD(OmegaConf.create({"name": "kd", "lr": 1e-5, "alpha": 0.5}), ctx)
        return lambda: optimizer_step(kd.loss(batch, 0).loss)

    with tempfile.TemporaryDirectory() as tmp:
        top_k = int(args.get("top_k", 64))
        cache = TeacherCache(build_cache(teacher, tok, items, Path(tmp) / "cache", {}, top_k=top_k))
        steps = autocast_steps({"floor_full": floor_full, "floor_response": floor_response, "kd": method(),
                                "kd_cached": method(cache)}, runtime)
        seconds = median_times(steps, repeats, warmup)
        measured = {name: (seconds[name], peak_tensor_bytes(step)) for name, step in steps.items()}

    floor_s, floor_peak = measured["floor_response"]
    rows = []
    for name, (seconds, peak) in measured.items():
        row = {"step": name, "median s": seconds, "x floor_response": seconds / floor_s,
               "x floor_full": seconds / measured["floor_full"][0], "peak GB": peak / GB,
               "peak x floor_response": peak / floor_peak, "REFERENCE.md s": REFERENCE_S.get(name, "-")}
        rows.append(row)
    kd_s, kd_peak = measured["kd"]
    met = kd_s <= 1.15 * floor_s and kd_peak <= 1.1 * floor_peak
    return {"rows": rows, "met": met, "notes": [
        f"batch {b} x {t} tokens, {r} response tokens per sequence ({b * r} distilled rows), vocab {vocab}; "
        f"student {args.get('student', 'smollm2-6l')} ({sum(p.numel() for p in student.parameters()) / 1e6:.1f}M "
        f"params), teacher {teacher_label(args)}, {placement(runtime)}; divergence {divergence!r}; kd_cached: "
        f"top-{top_k} fp16 cache; models loaded in "
        f"{load_s:.0f} s; median of {repeats} steps after {warmup} warm-up; torch threads {torch.get_num_threads()}.",
        f"target kd <= 1.15x floor_response time and <= 1.1x its tensor peak: {'met' if met else 'NOT met'} "
        f"(time {kd_s / floor_s:.3f}x, peak {kd_peak / floor_peak:.3f}x)."]}


if __name__ == "__main__":
    import sys

    from benchmarks.harness import main

    sys.exit(main(["kd_step", *sys.argv[1:]]))
