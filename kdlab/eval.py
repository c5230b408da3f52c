"""``python -m kdlab.eval``: evaluate any checkpoint, without training.

    python -m kdlab.eval student.path=outputs/runs/<job>/student dataset=sni eval.datasets=[unni]

Config: ``conf/eval.yaml`` (config.yaml with ``eval.models=[student]`` and its own output folder,
``outputs/eval/eval-<student>/<overrides>``). The student comes from ``student.path`` (any Hugging
Face causal-LM folder with its tokenizer, loaded with ``from_pretrained``, safetensors) or, without
a path, from its group as in training. Test sets: the ``dataset`` group's test split plus every
``eval.datasets`` entry. Metrics are those of :func:`kdlab.metrics.evaluate.evaluate` (generation with
``eval.*`` settings, test loss, and the teacher-forcing analysis).

The teacher is loaded only when it is needed: for the analysis (``eval.analysis.enabled``, the
default) or when ``eval.models`` includes ``teacher`` (a teacher row). ``eval.analysis.enabled=false``
evaluates the student alone; otherwise the teacher and the student must share a vocabulary
(checked).

Outputs in the run folder: ``config.yaml``, ``results.json`` (``{"run": {..., "status":
"completed"}, "eval": {"student": {<dataset>: metrics}}}``, the schema of training jobs) and
``results.md`` (the tables printed at the end). A finished folder is not evaluated again.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig

from kdlab.checkpoint import atomic_write_json, read_json
from kdlab.config import ConfigError
from kdlab.cli import check_same_job, eval_dataset_cfgs, main, validate_config
from kdlab.metrics.evaluate import results_table

MODELS = ("student", "teacher")


def load_student(cfg, teacher, teacher_tokenizer):
    """``(model, tokenizer)``: ``student.path`` (or the group's own weights) with its own tokenizer;
    a ``teacher_layers`` student without a path is cut from the teacher as in training."""
    from kdlab.modeling import check_vocabularies, load_model, load_tokenizer
    from kdlab.student import build_student

    if cfg.student.init == "teacher_layers" and not cfg.student.path:
        return build_student(cfg.student, teacher, teacher_tokenizer, cfg.teacher.name, torch.float32)
    tokenizer = load_tokenizer(cfg.student, "student")
    if teacher_tokenizer is not None:
        check_vocabularies(teacher_tokenizer, tokenizer, cfg.teacher.name, cfg.student.path or cfg.student.name)
    return load_model(cfg.student, "student", torch.float32, vocab_size=len(tokenizer)), tokenizer


def evaluate_checkpoint(cfg, run_dir: Path) -> dict:
    from kdlab.data import encode_sets, load_test_sets
    from kdlab.metrics.evaluate import analysis_table, evaluate
    from kdlab.hardware import seed_everything, setup_runtime
    from kdlab.loggers import build_logger, flatten
    from kdlab.modeling import check_available
    from kdlab.teacher import load_teacher

    start = time.perf_counter()
    runtime = setup_runtime(cfg.hardware)
    seed_everything(cfg.seed)
    from_teacher = cfg.student.init == "teacher_layers" and not cfg.student.path
    use_teacher = cfg.eval.analysis.enabled or "teacher" in cfg.eval.models or from_teacher
    if use_teacher:
        check_available(cfg.teacher, "teacher")
    if not from_teacher:
        check_available(cfg.student, "student")

    test_sets = load_test_sets(eval_dataset_cfgs(cfg), cfg.seed, cfg.dataset.name)

    teacher, teacher_tokenizer = load_teacher(cfg.teacher, runtime.dtype) if use_teacher else (None, None)
    student, tokenizer = load_student(cfg, teacher, teacher_tokenizer)
    student.to(runtime.device).eval()
    if teacher is not None:
        teacher.to(runtime.device)
    vocab = len(tokenizer)

    encoded_sets, data_counts, notes = encode_sets(cfg, tokenizer, None, test_sets)   # each with its own limits
    items = encoded_sets["test"]
    if runtime.is_main and notes:
        print("\n".join(notes))

    models = {"teacher": teacher, "student": student}
    reference = teacher if cfg.eval.analysis.enabled else None
    evals = {name: {data: evaluate(models[name], tokenizer, encoded, cfg.eval, runtime, vocab, desc=f"{name}/{data}",
                                   teacher=None if name == "teacher" else reference)
                    for data, encoded in items.items()}
             for name in cfg.eval.models}

    results = {
        "run": {"job": "eval", "method": "eval", "student": cfg.student.name, "student_path": cfg.student.path,
                "teacher": cfg.teacher.name if use_teacher else None, "divergence": None,
                "dataset": cfg.dataset.name, "datasets": list(items), "seed": cfg.seed,
                "experiment": cfg.experiment, "eval_time_s": time.perf_counter() - start, "status": "completed"},
        "eval": evals,
        "data": data_counts,
    }
    if runtime.is_main:
        logger = build_logger(cfg, run_dir, runtime.is_main)
        atomic_write_json(run_dir / "results.json", results)
        logger.summary(flatten({"eval": evals}))
        logger.finish()
        tables = "\n\n".join(t for t in (results_table(evals), analysis_table(evals)) if t)
        (run_dir / "results.md").write_text(tables + "\n")
        print(f"\nkdlab: results in {run_dir}\n{tables}")
    return results


def run(cfg) -> dict:
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs every scorer it builds
    validate_config(cfg)
    for name in cfg.eval.models:
        if name not in MODELS:
            raise ConfigError(f"eval.models contains {name!r}; kdlab.eval evaluates {' and '.join(MODELS)} "
                              f"(e.g. eval.models=[student,teacher])")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    results_path = run_dir / "results.json"
    if results_path.exists() and read_json(results_path)["run"].get("status") == "completed":
        results = read_json(results_path)
        print(f"kdlab: {run_dir} is already complete (delete it to run again)\n{results_table(results['eval'])}")
        return results
    check_same_job(cfg, run_dir)
    return evaluate_checkpoint(cfg, run_dir)


if __name__ == "__main__":
    main(run, "eval")
