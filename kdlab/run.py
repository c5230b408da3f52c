"""Entry point ``python -m kdlab.run``: one distillation job, config -> models -> data -> training -> evaluation.

Everything is written into the Hydra run folder (see docs/DESIGN.md): the resolved config,
``metrics.jsonl``, checkpoints, the trained student (``student/``, ``student_best/``) and
``results.json``. Running the same command again resumes an unfinished job and leaves a finished one
as it is.
"""
from __future__ import annotations

from pathlib import Path

from kdlab import distributed
from kdlab.cli import main, open_run_folder, override_dirname, validate_config, write_results
from kdlab.data import encode_job_sets, eval_dataset_cfgs, load_test_sets, load_training_splits
from kdlab.divergences import is_cross_tokenizer
from kdlab.hardware import start_runtime
from kdlab.loggers import build_logger
from kdlab.methods import build_job_method, method_class
from kdlab.metrics.evaluate import evaluate_once
from kdlab.student import load_models, load_student
from kdlab.teacher.finetune import finetuned_teacher
from kdlab.checkpoint import save_pretrained
from kdlab.trainer import Trainer


def run(cfg) -> dict:
    validate_config(cfg)
    with open_run_folder(cfg) as (run_dir, finished):
        return finished or train_and_evaluate(cfg, run_dir, override_dirname())


def train_and_evaluate(cfg, run_dir: Path, overrides: str = "") -> dict:
    """Train and evaluate one job in ``run_dir``; ``overrides`` (Hydra's ``override_dirname``) goes into
    results.json, where ``kdlab.report`` tells configurations apart by it."""
    runtime = start_runtime(cfg)
    splits = load_training_splits(cfg)
    test_sets = load_test_sets(eval_dataset_cfgs(cfg), cfg.seed, cfg.dataset.name)
    # teacher.cache: no teacher in memory; the evaluation rows that need it (its own, the analysis) are skipped
    cached_teacher = bool(cfg.teacher.get("cache")) and method_class(cfg.method.name).needs_teacher
    cross = is_cross_tokenizer(cfg.divergence.name)
    models = load_models(cfg, runtime, with_teacher=not cached_teacher, cross=cross)
    sets = encode_job_sets(cfg, models.tokenizer, models.teacher_tokenizer, splits, test_sets, cross, runtime.is_main)
    if models.teacher is not None and cfg.teacher.get("finetune"):   # the student was cut from the teacher as loaded
        models.teacher = finetuned_teacher(cfg, runtime, models.teacher, models.teacher_tokenizer, sets.teacher_train)
    logger = build_logger(cfg, run_dir, runtime.is_main)
    method = build_job_method(cfg, models, runtime, sets.train)
    train_items = method.prepare_data(sets.train)
    distributed.seed_rank(cfg.seed, runtime.rank)   # after everything all ranks must build identically

    def evaluate(name: str, model) -> dict:
        """One row of results: the teacher on its own tokenization, students against the teacher as loaded
        (across tokenizers the teacher-forcing analysis, one vocabulary, is skipped)."""
        teacher_row = name == "teacher"
        tokenizer, test = (models.teacher_tokenizer, sets.teacher_test) if teacher_row else (models.tokenizer, sets.test)
        with method.original_teacher():
            row = evaluate_once(run_dir, name, model, tokenizer, test, cfg.eval, runtime,
                                teacher=None if teacher_row or cross else models.teacher)
        return {} if row is None else {name: row}   # ranks that do not evaluate get no row

    evals, before_training = {}, {"teacher": models.teacher, "student_init": models.student}
    for name in cfg.eval.models:
        if before_training.get(name) is not None:
            evals |= evaluate(name, before_training[name])
    info = Trainer(method, train_items, sets.valid, cfg, runtime, logger, run_dir, models.tokenizer).fit()
    with distributed.full_params(models.student, runtime.strategy):
        if runtime.is_main:
            save_pretrained(models.student, models.tokenizer, run_dir / "student")
            method.save(run_dir)
    distributed.barrier()
    selected = "best" if cfg.train.select_best and (run_dir / "student_best").exists() else "final"
    if "student" in cfg.eval.models:
        best = selected == "best" and runtime.evaluates
        evals |= evaluate("student", load_student(run_dir / "student_best", runtime) if best else models.student)

    results = {
        "run": {"method": cfg.method.name, "student": cfg.student.name, "teacher": cfg.teacher.name,
                "divergence": cfg.divergence.name, "dataset": cfg.dataset.name, "seed": cfg.seed,
                "experiment": cfg.experiment, "overrides": overrides, "train_time_s": info["train_time_s"],
                "selected": selected, "status": "completed"},
        "eval": evals,
        "data": sets.counts,
    }
    if runtime.is_main:
        write_results(cfg, run_dir, results, logger)
    logger.finish()
    distributed.shutdown()
    return results


if __name__ == "__main__":
    main(run, "config")
