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
- with ``--serve_url`` (an OpenAI-compatible server of the same teacher, e.g. ``python -m llama_cpp.server
  --model <the GGUF> --logits_all true``), the batch is real text instead (synthetic training examples in
  the chat template, cut to ``--seq``: a text-prompt server must re-tokenise it as kdlab does) and three
  more rows, timed as consecutive steps (not interleaved: the prefetch overlaps one step with the next):
  ``server``: the server scoring one batch alone (its own cost); ``kd_served``: the step waiting for the
  server's answers; ``kd_served_prefetch``: the trainer's pattern, two batches alternating, each step
  sending the next batch's requests before computing its own loss (``Method.look_ahead``), so the server
  works while the student trains. How much latency the prefetch hides: ``kd_served - kd_served_prefetch``
  against ``server``.

Targets (issue 3): ``kd`` time <= 1.15x and tensor peak <= 1.1x ``floor_response``. Time: median of
``--repeats`` steps after ``--warmup`` steps, the variants interleaved (on shared cores, load then hits
all of them alike); peak: :func:`benchmarks.harness.peak_tensor_bytes` (tensor bytes allocated during
one step, gradients included; AdamW state exists before the step and is not counted). Args:
``--repeats`` (5), ``--warmup`` (2), ``--batch`` (4), ``--seq`` (256), ``--response`` (32),
``--divergence`` (fkl), ``--top_k`` (64), ``--threads`` (torch default), ``--seed`` (0), ``--serve_url``,
``--teacher``/``--teacher_shape``/``--student``/``--device`` (:func:`benchmarks.harness.load_models`).
"""
from __future__ import annotations

import statistics
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
    from kdlab.teacher.cached import CachedTeacher
    from kdlab.teacher.served import connect
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
    serve_url = args.get("serve_url")
    if serve_url:
        items, other_items = text_items(tok, b, t, r)
    else:
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

    def kd_method(source):
        ctx = Context(teacher=source, student=student, tokenizer=tok, divergence=divergence, runtime=runtime,
                      train_cfg=None)
        return KD(OmegaConf.create({"name": "kd", "lr": 1e-5, "alpha": 0.5}), ctx)

    def method(cache=None):
        kd = kd_method(CachedTeacher(cache) if cache else teacher)
        return lambda: optimizer_step(kd.loss(batch, 0).loss)

    with tempfile.TemporaryDirectory() as tmp:
        top_k = int(args.get("top_k", 64))
        cache = TeacherCache(build_cache(teacher, tok, items, Path(tmp) / "cache", {}, top_k=top_k))
        steps = autocast_steps({"floor_full": floor_full, "floor_response": floor_response, "kd": method(),
                                "kd_cached": method(cache)}, runtime)
        seconds = median_times(steps, repeats, warmup)
        measured = {name: (seconds[name], peak_tensor_bytes(step)) for name, step in steps.items()}
    if serve_url:
        served = connect({"url": serve_url, "top_k": top_k, "max_concurrency": b}, tok)
        measured |= served_rows(served, kd_method(served), optimizer_step, batch,
                                collate(other_items, tok.pad_token_id).to(runtime.device), repeats, warmup)

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
        f"(time {kd_s / floor_s:.3f}x, peak {kd_peak / floor_peak:.3f}x)."]
        + ([f"served: {serve_url}, top-{top_k}, {b} requests in flight; the batch is synthetic training text; "
            f"server, kd_served and kd_served_prefetch are medians of consecutive steps (peak: this process only)."]
           if serve_url else [])}


def text_items(tok, b: int, t: int, r: int):
    """Two batches of ``b`` synthetic training examples in the chat template, each cut to ``t`` tokens with
    at most ``r`` response tokens (real text, which a text-prompt server tokenises as kdlab does)."""
    from kdlab.config import load_option
    from kdlab.data import Encoded, encode, load_splits

    dataset = load_option("dataset", "synthetic", Path(__file__).resolve().parents[1] / "conf")
    encoded = encode(load_splits(dataset, 0)["train"][: 2 * b], tok, "chat", t - 1, t)
    items = [Encoded(it.prompt_ids[-(t - r):], it.response_ids[:r], it.example) for it in encoded]
    return items[:b], items[b:]


def served_rows(served, kd, optimizer_step, batch, other, repeats: int, warmup: int) -> dict:
    """``server``, ``kd_served`` and ``kd_served_prefetch`` (see the module docstring): medians of consecutive
    steps; the tensor peak is measured on a step that waits for the server."""
    def timed(step, n):
        times = []
        for i in range(n + warmup):
            t0 = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[warmup:])

    def server(i):
        served.pending.clear()
        served.distribution(batch)

    def waiting(i):
        served.pending.clear()
        optimizer_step(kd.loss(batch, 0).loss)

    def prefetching(i):
        current, upcoming = (batch, other) if i % 2 == 0 else (other, batch)
        kd.look_ahead(upcoming)
        optimizer_step(kd.loss(current, 0).loss)

    rows = {"server": (timed(server, repeats), 0), "kd_served": (timed(waiting, repeats), peak_tensor_bytes(
        lambda: waiting(0)))}
    served.pending.clear()
    rows["kd_served_prefetch"] = (timed(prefetching, repeats), peak_tensor_bytes(lambda: prefetching(0)))
    return rows


if __name__ == "__main__":
    import sys

    from benchmarks.harness import main

    sys.exit(main(["kd_step", *sys.argv[1:]]))
