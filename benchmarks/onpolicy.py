"""On-policy distillation step time and peak memory: kdlab's gkd / imitkd next to kd, the floor, and TRL.

Same models (teacher SmolLM2-135M-Instruct from the embedded GGUF, fp32; student = 6 of its layers,
``student=smollm2-6l``), same prompts (synthetic set, chat template), batch, lambda, JSD beta, sampling
temperature and number of new tokens for every row. One optimizer step = loss + backward + AdamW step.

- ``floor``: teacher forward + student forward/backward with plain cross-entropy, both LM heads on the
  response rows only: the least any loss over response positions can cost (no generation).
- ``kd``: ``method=kd method.alpha=1`` with the same divergence.
- ``gkd l=0`` / ``gkd l=1``: ``method=gkd divergence=jsd`` off-policy / fully on-policy.
- ``imitkd``: at the end of its beta schedule (beta = 1/200), i.e. nearly every sequence student-sampled.
- ``trl GKDTrainer``: TRL's ``experimental.gkd.GKDTrainer`` (lambda, beta, temperature, max_new_tokens).
- ``trl DistillationTrainer``: TRL's on-policy trainer (always samples: lambda = 1), one generation per step.

kdlab rows: median of ``repeats`` steps after one warm-up, the variants interleaved
(:func:`benchmarks.harness.median_times`, one AdamW over the student shared by all), peak
via :func:`benchmarks.harness.peak_tensor_bytes` on one more step. TRL rows: ``trainer.train()`` for
``1 + repeats`` steps, step times from a callback (median of all but the first), peak from the same
profiler method around one step after the first (optimizer state already allocated, as for kdlab).
Random draws differ between implementations, so on-policy lengths can differ: every row reports the
mean number of generated tokens per sequence it saw.

Args: ``--batch`` (4), ``--new_tokens`` (32), ``--lmbda`` (0.5 for TRL GKD besides 0 and 1), ``--beta``
(0.5), ``--temperature`` (0.9), ``--repeats`` (3), ``--trl`` (true), ``--rows`` (all: comma list of names),
``--teacher``/``--teacher_shape``/``--student``/``--device`` (:func:`benchmarks.harness.load_models`),
``--max_prompt_length``/``--max_length`` (256/512; a byte-level tokenizer, as ``tiny``'s, needs 384/512).
"""
from __future__ import annotations

import statistics
import time

import torch
from omegaconf import OmegaConf

from benchmarks.harness import (as_list, autocast_steps, load_models, median_times, peak_tensor_bytes, placement,
                                teacher_label)
from kdlab.modeling import sparse_tied_embedding_grad
from kdlab.optim import make_optimizer

GB = 1024**3


def examples(n: int) -> list[dict]:
    from kdlab.data.synthetic import make_synthetic

    return make_synthetic(0, {"train": n, "valid": 1, "test": 1})["train"]


def kdlab_method(name: str, teacher, student, tok, args: dict, **cfg):
    from kdlab.divergences import build_divergence
    from kdlab.methods import method_class
    from kdlab.methods.base import Context

    div = build_divergence({"name": "jsd", "beta": args["beta"]})
    ctx = Context(teacher=teacher, student=student, tokenizer=tok, divergence=div, runtime=None,
                  train_cfg=OmegaConf.create({"max_steps": 100}))
    cfg = OmegaConf.create({"name": name, "lr": 1e-5, **cfg})
    cls = method_class(name)
    cls.validate(cfg)
    return cls(cfg, ctx)


class Floor:
    """Teacher forward + student forward/backward with cross-entropy, LM heads on response rows only."""

    def __init__(self, teacher, student, vocab):
        from kdlab.methods.base import Method

        self.method = Method.__new__(Method)
        self.method.teacher, self.method.student = teacher, student
        self.method.vocab_size = vocab

    def loss(self, batch, step):
        from kdlab.methods.base import LossOutput

        self.method.teacher_logits(batch)
        return LossOutput(self.method.nll(self.method.logits(self.method.student, batch), batch))


def kdlab_rows(names, teacher, student, tok, batches, args, runtime) -> list[dict]:
    sampling = dict(temperature=args["temperature"], top_p=1.0, top_k=0, max_new_tokens=args["new_tokens"])
    builders = {
        "floor": lambda: Floor(teacher, student, len(tok)),
        "kd": lambda: kdlab_method("kd", teacher, student, tok, args, alpha=1.0),
        "gkd l=0": lambda: kdlab_method("gkd", teacher, student, tok, args, lmbda=0.0, normalize="token", **sampling),
        "gkd l=1": lambda: kdlab_method("gkd", teacher, student, tok, args, lmbda=1.0, normalize="token", **sampling),
        "imitkd": lambda: kdlab_method("imitkd", teacher, student, tok, args, schedule="exponential",
                                       exp_base=200.0, decay_steps=1, **dict(sampling, temperature=1.0)),
    }
    methods = {name: builders[name]() for name in names if name in builders}
    sparse_tied_embedding_grad(student)   # as kdlab's trainer does (undone below: TRL gets the model as loaded)
    opt = make_optimizer(student.parameters(), 1e-5, 0.0)
    tokens = {name: [] for name in methods}

    def stepper(name):
        def step():   # every variant sees the same sequence of batches
            batch = batches[len(tokens[name]) % len(batches)]
            out = methods[name].loss(batch, 5)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens[name].append(out.logs.get("response_tokens", float(batch.response_mask.sum())) / len(batch))
        return step

    steps = autocast_steps({name: stepper(name) for name in methods}, runtime)
    seconds = median_times(steps, args["repeats"], warmup=1)
    rows = [{"impl": f"kdlab {name}", "s/step": seconds[name], "peak GB": peak_tensor_bytes(step) / GB,
             "tokens/seq": statistics.mean(tokens[name])} for name, step in steps.items()]
    student.get_input_embeddings().sparse = False
    return rows


def trl_row(kind: str, teacher, student, tok, items: list[dict], args: dict) -> dict:
    """One TRL trainer run on a copy of the student; step times and peak memory from a callback."""
    import copy
    import tempfile

    from datasets import Dataset
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    n_steps = 1 + args["repeats"]
    common = dict(output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=args["batch"],
                  max_steps=n_steps + 1, learning_rate=1e-5, logging_steps=1000, save_strategy="no",
                  report_to=[], use_cpu=teacher.device.type == "cpu", temperature=args["temperature"],
                  beta=args["beta"], dataloader_num_workers=0, seed=0, bf16=teacher.device.type == "cuda")
    user = [[{"role": "user", "content": f"{ex['instruction']}\n\n{ex['input']}".strip()}] for ex in items]
    if kind == "GKDTrainer":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        data = Dataset.from_list([{"messages": u + [{"role": "assistant", "content": ex["output"]}]}
                                  for u, ex in zip(user, items)])
        config = GKDConfig(**common, lmbda=args["trl_lmbda"], max_new_tokens=args["new_tokens"], max_length=512)
        trainer_cls = GKDTrainer
    else:
        from trl import DistillationConfig, DistillationTrainer

        data = Dataset.from_list([{"prompt": u} for u in user])
        config = DistillationConfig(**common, max_completion_length=args["new_tokens"])
        trainer_cls = DistillationTrainer

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.t0, self.prof, self.peak = [], None, None, None

        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == n_steps:    # the extra last step is profiled, not timed
                self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                self.prof.__enter__()
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if self.prof is not None:
                self.prof.__exit__(None, None, None)
                events = sorted((e.start_ns(), e.nbytes()) for e in self.prof.profiler.kineto_results.events()
                                if e.name() == "[memory]")
                current = peak = 0
                for _, nbytes in events:
                    current += nbytes
                    peak = max(peak, current)
                self.peak, self.prof = peak, None
            else:
                self.times.append(time.perf_counter() - self.t0)

    timer = Timer()
    trainer = trainer_cls(model=copy.deepcopy(student), teacher_model=teacher, args=config, train_dataset=data,
                          processing_class=tok, callbacks=[timer])
    trainer.train()
    return {"impl": f"trl {kind}" + (f" l={args['trl_lmbda']}" if kind == "GKDTrainer" else " (l=1)"),
            "s/step": statistics.median(timer.times[1:]), "peak GB": timer.peak / GB, "tokens/seq": ""}


def run(args: dict) -> dict:
    from kdlab.data import collate, encode

    args = {"batch": 4, "new_tokens": 32, "beta": 0.5, "temperature": 0.9, "repeats": 3, "trl": True,
            "trl_lmbda": None, "max_prompt_length": 256, "max_length": 512, **args}
    torch.manual_seed(0)
    teacher, student, tok, template, runtime = load_models(args)
    items = examples(args["batch"] * (2 + args["repeats"]) * 2)
    encoded = encode(items, tok, template, args["max_prompt_length"], args["max_length"])
    batches = [collate(encoded[i:i + args["batch"]], tok.pad_token_id).to(runtime.device)
               for i in range(0, len(encoded) - args["batch"] + 1, args["batch"])]
    names = as_list(args.get("rows", ["floor", "kd", "gkd l=0", "gkd l=1", "imitkd"]))
    rows = kdlab_rows(names, teacher, student, tok, batches, args, runtime)
    if args["trl"]:
        for kind, lmbda in (("GKDTrainer", 0.0), ("GKDTrainer", 1.0), ("DistillationTrainer", None)):
            try:
                rows.append(trl_row(kind, teacher, student, tok, items, {**args, "trl_lmbda": lmbda}))
            except Exception as err:   # a peer's failure is a result to report, not a reason to lose the others
                rows.append({"impl": f"trl {kind}", "s/step": "", "peak GB": "", "tokens/seq": f"failed: {err!r}"[:200]})
    return {"rows": rows, "notes": [
        f"teacher {teacher_label(args)}, student {args.get('student', 'smollm2-6l')}, batch {args['batch']}, "
        f"{args['new_tokens']} new tokens, JSD beta {args['beta']}, sampling temperature {args['temperature']} "
        f"(imitkd: 1.0), {placement(runtime)}, AdamW; median of {args['repeats']} steps; peak = tensor bytes "
        "allocated during one step (torch.profiler memory events). Targets: kdlab gkd <= 0.8x TRL GKDTrainer "
        "time at the same lambda, peak <= TRL's."]}


if __name__ == "__main__":
    import sys

    from benchmarks.harness import main

    sys.exit(main(["onpolicy", *sys.argv[1:]]))
