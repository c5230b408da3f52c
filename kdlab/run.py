"""Entry point ``python -m kdlab.run``: one distillation job, config -> models -> data -> training -> evaluation.

Everything is written into the Hydra run folder (see docs/DESIGN.md): the resolved config,
``metrics.jsonl``, checkpoints, the trained student (``student/``, ``student_best/``) and
``results.json``. Running the same command again resumes an unfinished job and leaves a finished one
as it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from omegaconf import DictConfig

from kdlab import distributed
from kdlab.cli import main, open_run_folder, override_dirname, validate_config, write_results
from kdlab.data import JobSets, encode_job_sets, eval_dataset_cfgs, load_test_sets, load_training_splits
from kdlab.divergences import is_cross_tokenizer
from kdlab.hardware import Runtime, machine_text, start_runtime
from kdlab.loggers import build_logger
from kdlab.methods import build_job_method, method_class
from kdlab.methods.base import Method
from kdlab.metrics.evaluate import check_generation_room, decoding_text, evaluate_once
from kdlab.student import Models, derive_models, load_models, load_student
from kdlab.teacher import teacher_in_memory
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
    cross = is_cross_tokenizer(cfg.divergence.name)
    with_teacher = teacher_in_memory(cfg, method_class(cfg.method.name))
    models = load_models(cfg, runtime, with_teacher=with_teacher, cross=cross)
    sets = encode_job_sets(cfg, models.tokenizer, models.teacher_tokenizer, splits, test_sets, cross, runtime.is_main)
    models = derive_models(cfg, runtime, models, sets, with_teacher=with_teacher)
    logger = build_logger(cfg, run_dir, runtime.is_main)
    method = build_job_method(cfg, models, runtime, sets.train)
    train_items = method.prepare_data(sets.train)
    distributed.seed_rank(cfg.seed, runtime.rank)   # after everything all ranks must build identically
    rows = ResultRows(cfg.eval, run_dir, runtime, models, sets, method, cross)

    evals = rows.evaluate(teacher=models.teacher, student_init=models.student)
    info = Trainer(method, train_items, sets.valid, cfg, runtime, logger, run_dir, models.tokenizer).fit()
    save_student(models, method, run_dir, runtime)
    selected = "best" if cfg.train.select_best and (run_dir / "student_best").exists() else "final"
    if "student" in cfg.eval.models:
        best = selected == "best" and runtime.evaluates
        evals |= rows.evaluate(student=load_student(run_dir / "student_best", runtime, cfg.student) if best
                               else models.student)
    results = {"run": run_record(cfg, overrides, info, selected), "eval": evals, "data": sets.counts}
    if runtime.is_main:
        write_results(cfg, run_dir, results, logger)
    logger.finish()
    distributed.shutdown()
    return results


@dataclass
class ResultRows:
    """The rows of results.json: the teacher on its own tokenization, students against the teacher as loaded
    (its analysis; across tokenizers, where the vocabularies differ, none). Each is measured once per job
    (:func:`kdlab.metrics.evaluate.evaluate_once`)."""
    eval_cfg: DictConfig
    run_dir: Path
    runtime: Runtime
    models: Models
    sets: JobSets
    method: Method
    cross: bool

    def __post_init__(self) -> None:
        """Before the first evaluation: the student's test and validation prompts and the teacher's test prompts
        leave room for ``eval.max_new_tokens`` (not only once the student is trained)."""
        check_generation_room(self.models.student, {**self.sets.test, "valid": self.sets.valid},
                              self.eval_cfg.max_new_tokens, "student")
        if self.models.teacher is not None:
            check_generation_room(self.models.teacher, self.sets.teacher_test, self.eval_cfg.max_new_tokens, "teacher")

    def evaluate(self, **models) -> dict:
        """``{name: row}`` for each of ``models`` that ``eval.models`` names and that exists; ranks that do not
        evaluate get no row."""
        rows = {}
        for name in self.eval_cfg.models:
            if models.get(name) is None:
                continue
            teacher_row = name == "teacher"
            tokenizer, test = ((self.models.teacher_tokenizer, self.sets.teacher_test) if teacher_row
                               else (self.models.tokenizer, self.sets.test))
            with self.method.original_teacher():
                row = evaluate_once(self.run_dir, name, models[name], tokenizer, test, self.eval_cfg, self.runtime,
                                    teacher=None if teacher_row or self.cross else self.models.teacher)
            if row is not None:
                rows[name] = row
        return rows


def save_student(models: Models, method: Method, run_dir: Path, runtime: Runtime) -> None:
    """``student/`` (``from_pretrained`` loads it) and the method's own outputs, written by rank 0 (under ZeRO-3
    every rank gathers its shards for it)."""
    with distributed.full_params(models.student, runtime.strategy):
        if runtime.is_main:
            save_pretrained(models.student, models.tokenizer, run_dir / "student")
            method.save(run_dir)
    distributed.barrier()


# the packages whose version decides a run's numbers (README: "Set-up", the lock)
RECORDED_PACKAGES = ("torch", "transformers", "peft")


def run_record(cfg, overrides: str, info: dict, selected: str) -> dict:
    """The ``run`` section of results.json: what was run, and which student the ``student`` row is."""
    return {"method": cfg.method.name, "student": cfg.student.name, "teacher": cfg.teacher.name,
            "divergence": cfg.divergence.name, "dataset": cfg.dataset.name, "seed": cfg.seed,
            "experiment": cfg.experiment, "overrides": overrides, "train_time_s": info["train_time_s"],
            "selected": selected, "decoding": decoding_text(cfg.eval),
            "versions": {name: version(name) for name in RECORDED_PACKAGES}, "machine": machine_text(),
            "status": "completed"}


if __name__ == "__main__":
    main(run, "config")
