"""``python -m kdlab.run``: one distillation job, config -> models -> data -> training -> evaluation.

Everything is written into the Hydra run folder (see docs/DESIGN.md): the resolved config,
``metrics.jsonl``, checkpoints, the trained student (``student/``, ``student_best/``) and
``results.json``. Running the same command again resumes an unfinished job and leaves a finished one
as it is.
"""
from __future__ import annotations

from pathlib import Path

import torch

from kdlab import distributed
from kdlab.checkpoint import atomic_write_json, read_json
from kdlab.cli import eval_dataset_cfgs, main, open_run_folder, override_dirname, validate_config
from kdlab.config import ConfigError


def run(cfg) -> dict:
    validate_config(cfg)
    with open_run_folder(cfg) as (run_dir, finished):
        return finished or train_and_evaluate(cfg, run_dir, override_dirname())


def train_and_evaluate(cfg, run_dir: Path, overrides: str = "") -> dict:
    """Train and evaluate one job in ``run_dir``; ``overrides`` (Hydra's ``override_dirname``: the command
    line minus seed, method, student, ...) goes into results.json, where ``kdlab.report`` tells configurations apart by it."""
    from transformers import AutoModelForCausalLM

    from kdlab.alignment import CrossTokenizer
    from kdlab.data import check_batch_size, encode_sets, load_splits, load_test_sets
    from kdlab.divergences import build_divergence, is_cross_tokenizer
    from kdlab.metrics.evaluate import analysis_table, evaluate, results_table
    from kdlab.hardware import seed_everything, setup_runtime
    from kdlab.loggers import build_logger, flatten
    from kdlab.methods import build_method, method_class
    from kdlab.methods.base import Context
    from kdlab.modeling import check_available, load_tokenizer
    from kdlab.student import build_student
    from kdlab.teacher import load_teacher
    from kdlab.teacher.topk_cache import open_cache
    from kdlab.teacher.finetune import finetuned_teacher
    from kdlab.trainer import Trainer, save_pretrained

    runtime = setup_runtime(cfg.hardware)
    distributed.zero3_model_init(runtime, cfg.train)   # ZeRO-3: models are created already sharded
    seed_everything(cfg.seed)
    check_available(cfg.teacher, "teacher")
    if cfg.student.init != "teacher_layers":
        check_available(cfg.student, "student")

    splits = load_splits(cfg.dataset, cfg.seed)
    for split in ("train", "valid", "test"):
        if not splits.get(split):
            raise ConfigError(f"dataset={cfg.dataset.name} has no {split} split; training needs train, valid and "
                              f"test (e.g. dataset=dolly dataset.path=../shared/data/dolly-1k)")
    check_batch_size(cfg.train.batch_size, len(splits["train"]), f"{len(splits['train'])} rows")
    test_sets = load_test_sets(eval_dataset_cfgs(cfg), cfg.seed, cfg.dataset.name)

    # teacher.cache: no teacher in memory (only loaded to build a student from its layers); its top-k is
    # read from the cache, and the evaluation rows that need the teacher (its own, the analysis) are skipped
    use_cache = bool(cfg.teacher.get("cache")) and method_class(cfg.method.name).needs_teacher
    if use_cache and cfg.student.init != "teacher_layers":
        teacher, tokenizer = None, load_tokenizer(cfg.teacher, "teacher")
    else:
        teacher, tokenizer = load_teacher(cfg.teacher, runtime.dtype)
    teacher_tok, cross = tokenizer, is_cross_tokenizer(cfg.divergence.name)
    student, tokenizer = build_student(cfg.student, teacher, tokenizer, cfg.teacher.name, torch.float32,
                                       own_tokenizer=cross)
    if use_cache:
        teacher = None
    else:
        teacher.to(runtime.device)
        if runtime.strategy == "zero3":
            teacher = distributed.shard_teacher(teacher, distributed.teacher_deepspeed_config(
                cfg.hardware.dtype, cfg.train, runtime.world_size))
    student.to(runtime.device)
    vocab = len(tokenizer)

    # each set with its own limits; across tokenizers the student side renders the student's template
    items, data_counts, notes = encode_sets(cfg, tokenizer, splits, test_sets,
                                           (cfg.student if cross else cfg.teacher).template)
    train_items, valid_items, test_items = items["train"], items["valid"], items["test"]
    if runtime.is_main and notes:
        print("\n".join(notes))
    if cross:   # the teacher is fine-tuned and evaluated on its own tokenization and template
        teacher_items = encode_sets(cfg, teacher_tok, splits if cfg.teacher.get("finetune") else None, test_sets,
                                    cfg.teacher.template)[0]
        t_test_items = teacher_items["test"]
    if teacher is not None and cfg.teacher.get("finetune"):   # the student above was cut from the loaded teacher
        teacher = finetuned_teacher(cfg, runtime, teacher, teacher_tok,
                                    teacher_items["train"] if cross else train_items)

    divergence = build_divergence(cfg.divergence)
    if cross:   # the hybrid maps the tokens the two vocabularies share
        divergence = divergence.bind(tokenizer, teacher_tok)
    logger = build_logger(cfg, run_dir, runtime.is_main)
    ctx = Context(teacher=teacher, student=student, tokenizer=tokenizer, divergence=divergence,
                  runtime=runtime, train_cfg=cfg.train, vocab_size=vocab,
                  teacher_cache=open_cache(cfg, tokenizer, train_items) if use_cache else None,
                  cross_tokenizer=CrossTokenizer(tokenizer, teacher_tok, cfg.teacher.template) if cross else None)
    method = build_method(cfg.method, ctx)
    train_items = method.prepare_data(train_items)
    distributed.seed_rank(cfg.seed, runtime.rank)   # after everything all ranks must build identically

    evals = {}

    def evaluate_cached(name: str, model) -> None:
        """Evaluate once per job: a resumed job reuses what the interrupted one measured."""
        path = run_dir / "eval" / f"{name}.json"
        # across tokenizers the teacher-forcing analysis (one vocabulary) is skipped
        reference = None if name == "teacher" or cross else teacher
        tok, sets = (teacher_tok, t_test_items) if cross and name == "teacher" else (tokenizer, test_items)
        if path.exists():
            evals[name] = read_json(path)
        elif runtime.evaluates:   # rank 0 (every rank under ZeRO-3); the others wait and write nothing
            evals[name] = {data: evaluate(model, tok, items, cfg.eval, runtime, len(tok), desc=f"{name}/{data}",
                                          teacher=reference)
                           for data, items in sets.items()}
            if runtime.is_main:
                atomic_write_json(path, evals[name])
        distributed.barrier()

    with method.original_teacher():
        for name in cfg.eval.models:
            if name == "teacher" and teacher is not None:
                evaluate_cached("teacher", teacher)
            elif name == "student_init":
                evaluate_cached("student_init", student)

    trainer = Trainer(method, train_items, valid_items, cfg, runtime, logger, run_dir, tokenizer)
    info = trainer.fit()
    with distributed.full_params(student, runtime.strategy):
        if runtime.is_main:
            save_pretrained(student, tokenizer, run_dir / "student")
            method.save(run_dir)
    distributed.barrier()
    if "student" in cfg.eval.models:
        best = run_dir / "student_best"
        final = student
        if cfg.train.select_best and best.exists() and runtime.evaluates:
            final = AutoModelForCausalLM.from_pretrained(best, dtype=torch.float32).to(runtime.device)
        with method.original_teacher():
            evaluate_cached("student", final)

    results = {
        "run": {"method": cfg.method.name, "student": cfg.student.name, "teacher": cfg.teacher.name,
                "divergence": cfg.divergence.name, "dataset": cfg.dataset.name, "seed": cfg.seed,
                "experiment": cfg.experiment, "overrides": overrides, "train_time_s": info["train_time_s"],
                "selected": "best" if cfg.train.select_best and (run_dir / "student_best").exists() else "final",
                "status": "completed"},
        "eval": evals,
        "data": data_counts,
    }
    if runtime.is_main:
        atomic_write_json(run_dir / "results.json", results)
        logger.summary(flatten({"eval": evals}))
        table = "\n\n".join(t for t in (results_table(evals), analysis_table(evals)) if t)
        (run_dir / "results.md").write_text(table + "\n")
        print(f"\nkdlab: results in {run_dir}\n{table}")
    logger.finish()
    distributed.shutdown()
    return results


if __name__ == "__main__":
    main(run, "config")
