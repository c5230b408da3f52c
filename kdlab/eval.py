"""Entry point ``python -m kdlab.eval``: evaluate any checkpoint, without training.

    python -m kdlab.eval student.path=outputs/runs/<job>/student dataset=sni eval.datasets=[unni]

Config: ``conf/eval.yaml`` (config.yaml with ``eval.models=[student]`` and its own output folder,
``outputs/eval/eval-<student>/<overrides>``). The student comes from ``student.path`` (any Hugging
Face causal-LM folder with its tokenizer, loaded with ``from_pretrained``, safetensors) or, without
a path, from its group as in training: a pruned student (``student.init=pruned``) is pruned, or reused,
exactly as a training job with the same config and ``output_dir`` does (``<output_dir>/students/``), so
without a path the ``student`` row is a training job's ``student_init``. Test sets: the ``dataset``
group's test split plus every ``eval.datasets`` entry. Metrics are those of :func:`kdlab.metrics.evaluate.evaluate` (generation with
``eval.*`` settings, test loss, and the teacher-forcing analysis).

The teacher is loaded only when it is needed: for the analysis (``eval.analysis.enabled``, the
default) or when ``eval.models`` includes ``teacher`` (a teacher row). A teacher with ``teacher.finetune``
is the fine-tuned one, as in training (fine-tuned once, or reused, under ``<output_dir>/teachers/``): the
teacher row and the analysis see the teacher a training job distils from. ``eval.analysis.enabled=false``
evaluates the student alone; otherwise the teacher and the student must share a vocabulary
(checked).

Outputs in the run folder: ``config.yaml``, ``results.json`` (``{"run": {..., "status":
"completed"}, "eval": {"student": {<dataset>: metrics}}}``, the schema of training jobs) and
``results.md`` (the tables printed at the end). A finished folder is not evaluated again.
"""
from __future__ import annotations

import time
from pathlib import Path

from kdlab.cli import main, open_run_folder, validate_config, write_results
from kdlab.config import ConfigError
from kdlab.data import encode_job_sets, eval_dataset_cfgs, load_test_sets, load_training_splits
from kdlab.hardware import machine_text, start_runtime
from kdlab.loggers import build_logger
from kdlab.metrics.evaluate import decoding_text, evaluate_sets
from kdlab.student import derive_models, load_models

MODELS = ("student", "teacher")


def evaluate_checkpoint(cfg, run_dir: Path) -> dict:
    start = time.perf_counter()
    runtime = start_runtime(cfg)
    test_sets = load_test_sets(eval_dataset_cfgs(cfg), cfg.seed, cfg.dataset.name)
    with_teacher = cfg.eval.analysis.enabled or "teacher" in cfg.eval.models
    pruned = cfg.student.init == "pruned" and not cfg.student.path
    derived = pruned or with_teacher and bool(cfg.teacher.get("finetune"))
    # pruning calibrates on, and fine-tuning trains on, the training split: loaded only then
    splits = load_training_splits(cfg) if derived else None
    models = load_models(cfg, runtime, with_teacher=with_teacher, checkpoint=True)
    sets = encode_job_sets(cfg, models.tokenizer, models.teacher_tokenizer, splits, test_sets, cross=False,
                           say=runtime.is_main)
    if derived:
        models = derive_models(cfg, runtime, models, sets, with_teacher=with_teacher)
    models.student.eval()
    rows = {"teacher": models.teacher, "student": models.student}
    reference = models.teacher if cfg.eval.analysis.enabled else None
    evals = {name: evaluate_sets(rows[name], models.tokenizer, sets.test, cfg.eval, runtime, name,
                                 teacher=None if name == "teacher" else reference)
             for name in cfg.eval.models}
    results = {
        "run": {"job": "eval", "method": "eval", "student": cfg.student.name, "student_path": cfg.student.path,
                "teacher": cfg.teacher.name if with_teacher or not cfg.student.path and cfg.student.init != "pretrained"
                else None, "divergence": None,
                "dataset": cfg.dataset.name, "datasets": list(sets.test), "seed": cfg.seed,
                "experiment": cfg.experiment, "decoding": decoding_text(cfg.eval),
                "eval_time_s": time.perf_counter() - start, "machine": machine_text(), "status": "completed"},
        "eval": evals,
        "data": sets.counts,
    }
    if runtime.is_main:
        logger = build_logger(cfg, run_dir, runtime.is_main)
        write_results(cfg, run_dir, results, logger)
        logger.finish()
    return results


def run(cfg) -> dict:
    validate_config(cfg)
    for name in cfg.eval.models:
        if name not in MODELS:
            raise ConfigError(f"eval.models contains {name!r}; kdlab.eval evaluates {' and '.join(MODELS)} "
                              f"(e.g. eval.models=[student,teacher])")
    with open_run_folder(cfg) as (run_dir, finished):
        return finished or evaluate_checkpoint(cfg, run_dir)


if __name__ == "__main__":
    main(run, "eval")
