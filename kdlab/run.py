"""``python -m kdlab.run``: one distillation job, config -> models -> data -> training -> evaluation.

Everything is written into the Hydra run folder (see docs/DESIGN.md): the resolved config,
``metrics.jsonl``, checkpoints, the trained student (``student/``, ``student_best/``) and
``results.json``. Running the same command again resumes an unfinished job and leaves a finished one
as it is.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from kdlab import distributed, runlock
from kdlab.checkpoint import atomic_write_json, atomic_write_text, read_json
from kdlab.config import ConfigError
from kdlab.modeling import ModelUnavailable
from kdlab.preemption import Stopped


def _dirname(overrides: str) -> str:
    """A folder name for a job's overrides: readable when short, hashed when long."""
    name = overrides.replace("/", "_") or "default"
    return name if len(name) <= 100 else f"{name[:60]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"


OmegaConf.register_new_resolver("kdlab.dirname", _dirname, replace=True)

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def validate_config(cfg) -> None:
    """Check every group before anything is loaded; raises :class:`ConfigError`."""
    from kdlab.alignment import check_config as check_cross_tokenizer
    from kdlab.data import validate_dataset
    from kdlab.divergences import DIVERGENCES, validate_divergence
    from kdlab.evaluation import validate_eval
    from kdlab.hardware import validate_hardware
    from kdlab.loggers import validate_logger
    from kdlab.methods import method_class
    from kdlab.student import validate_student
    from kdlab.teacher import validate_teacher
    from kdlab.trainer import validate_train

    validate_teacher(cfg.teacher)
    validate_student(cfg.student)
    method_class(cfg.method.name).validate(cfg.method)
    validate_divergence(cfg.divergence)
    validate_dataset(cfg.dataset)
    validate_hardware(cfg.hardware)
    validate_logger(cfg.logger)
    validate_train(cfg.train)
    validate_eval(cfg.eval)
    eval_dataset_cfgs(cfg)   # every eval.datasets entry checked as a dataset
    check_cross_tokenizer(cfg)
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ConfigError(f"seed={cfg.seed!r} is not an integer; set seed=<int>")
    method = method_class(cfg.method.name)
    if cfg.teacher.get("cache") and method.needs_teacher and not method.uses_teacher_cache:
        raise ConfigError(f"method={cfg.method.name} needs the live teacher during training, not a cached one "
                          f"(teacher.cache works with off-policy methods such as kd); set teacher.cache=null")
    if cfg.teacher.get("cache") and method.uses_teacher_cache and not DIVERGENCES[cfg.divergence.name].supports_topk:
        raise ConfigError(f"divergence={cfg.divergence.name} needs the teacher's full distribution, which a cached "
                          f"top-k teacher does not have; set teacher.cache=null or pick another divergence")


def prompt_template(cfg) -> str:
    """The student side's template: the teacher's (the two share a tokenizer), or across tokenizers
    (divergence=uld) the student's own; the teacher then renders its own (kdlab.alignment)."""
    from kdlab.divergences import is_cross_tokenizer

    cross = "divergence" in cfg and is_cross_tokenizer(cfg.divergence.name)   # kdlab.cache_teacher has none
    own = cfg.student if cross else cfg.teacher
    return own.template if cfg.dataset.template == "auto" else cfg.dataset.template


def eval_dataset_cfgs(cfg) -> dict:
    """The training dataset's test split plus every ``eval.datasets`` entry (:func:`kdlab.data.eval_datasets`)."""
    from kdlab.data import eval_datasets

    return {cfg.dataset.name: cfg.dataset, **eval_datasets(cfg.eval.datasets, cfg.dataset, CONF_DIR)}


def format_table(evals: dict) -> str:
    rows = ["| model | dataset | ROUGE-L | EM | loss |", "|---|---|---:|---:|---:|"]
    for model, per_data in evals.items():
        for data, m in per_data.items():
            loss = f"{m['loss']:.3f}" if "loss" in m else "-"
            rows.append(f"| {model} | {data} | {m['rougeL']:.2f} | {m['exact_match']:.2f} | {loss} |")
    return "\n".join(rows)


def run(cfg) -> dict:
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs every scorer it builds
    validate_config(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    # the lock before anything of kdlab's is written into the folder (Hydra's .hydra/ and log are already there)
    with runlock.hold(run_dir, locks=runlock.main_process()):
        if runlock.main_process():
            runlock.remove_leftovers(run_dir)
        check_same_job(cfg, run_dir)
        results_path = run_dir / "results.json"
        if results_path.exists() and read_json(results_path)["run"].get("status") == "completed":
            results = read_json(results_path)
            print(f"kdlab: {run_dir} is already complete (delete it to run again)\n{format_table(results['eval'])}")
            return results
        return train_and_evaluate(cfg, run_dir, HydraConfig.get().job.override_dirname)


def check_same_job(cfg, run_dir: Path) -> None:
    """Refuse to resume a folder whose job had a different config and made progress (its checkpoint and
    cached evaluations would be silently mixed into this one); a job that stopped before any progress
    (a missing model, say) is simply started again with the new config."""
    saved = run_dir / "config.yaml"
    current = OmegaConf.to_yaml(cfg, resolve=True)
    progress = [run_dir / "checkpoints" / "LAST", run_dir / "eval", run_dir / "results.json"]
    if saved.exists() and saved.read_text() != current and any(p.exists() for p in progress):
        raise ConfigError(f"{run_dir} holds a job with a different config; delete that folder or pass "
                          f"hydra.run.dir=<another folder> (output_dir=<folder> for a new tree)")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, current)   # atomic: the ranks of a distributed job all write it and read it


def train_and_evaluate(cfg, run_dir: Path, overrides: str = "") -> dict:
    """Train and evaluate one job in ``run_dir``; ``overrides`` (Hydra's ``override_dirname``: the command
    line minus seed, method, student, ...) goes into results.json, where ``kdlab.report`` tells configurations apart by it."""
    from transformers import AutoModelForCausalLM

    from kdlab.alignment import CrossTokenizer
    from kdlab.data import check_batch_size, encode_sets, load_splits, load_test_sets
    from kdlab.divergences import build_divergence, is_cross_tokenizer
    from kdlab.evaluation import analysis_table, evaluate
    from kdlab.hardware import seed_everything, setup_runtime
    from kdlab.loggers import build_logger, flatten
    from kdlab.methods import build_method, method_class
    from kdlab.methods.base import Context
    from kdlab.modeling import check_available, load_tokenizer
    from kdlab.student import build_student
    from kdlab.teacher import load_teacher
    from kdlab.teacher_cache import open_cache
    from kdlab.teacher_finetune import finetuned_teacher
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

    trainer = Trainer(method, train_items, valid_items, cfg, runtime, logger, run_dir, tokenizer, vocab)
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
        table = "\n\n".join(t for t in (format_table(evals), analysis_table(evals)) if t)
        (run_dir / "results.md").write_text(table + "\n")
        print(f"\nkdlab: results in {run_dir}\n{table}")
    logger.finish()
    distributed.shutdown()
    return results


def multirun_flag_first() -> None:
    """Let ``-m``/``--multirun`` stand anywhere on the command line.

    Hydra's parser takes the overrides as one positional list, so in
    ``kdlab.run method=okd student=gpt2-base -m seed=1,2,3`` the overrides after ``-m`` would be
    rejected as unrecognised arguments; moving the flag to the front keeps every override.
    """
    flags = [a for a in sys.argv[1:] if a in ("-m", "--multirun")]
    sys.argv[1:] = flags + [a for a in sys.argv[1:] if a not in ("-m", "--multirun")]


def refuse_null_groups(argv: list[str]) -> None:
    """``student=null`` (or ``~teacher``) would drop a required group, which Hydra reports with a traceback
    (or kdlab later with a missing key): end with one line naming the options instead."""
    for arg in argv:
        group = arg[1:] if arg.startswith("~") and "=" not in arg else arg.lstrip("+").removesuffix("=null")
        if arg != group and group in ("teacher", "student", "method", "divergence", "dataset", "hardware", "logger"):
            options = ", ".join(sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml")))
            print(f"kdlab: error: {arg} removes the {group} group, which every job needs; choose {group}=<one of: "
                  f"{options}>", file=sys.stderr)
            sys.exit(2)


def cli(job, config_name: str) -> None:
    """Run ``job(cfg)`` as a Hydra app on ``conf/<config_name>.yaml``: ``-m`` may stand anywhere; a bad
    config, an unavailable model, a busy run folder or a full disk end the process with one line and exit
    status 2, a stop on SIGTERM/SIGUSR1/SIGUSR2 (checkpoint written) with 128 + the signal's number, and
    Ctrl-C with one line and 130."""
    @hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")
    def main(cfg) -> None:
        try:
            job(cfg)
        except (ConfigError, ModelUnavailable) as err:
            print(f"kdlab: error: {err}", file=sys.stderr)
            sys.exit(2)
        except Stopped as stop:
            print(f"kdlab: {stop}", file=sys.stderr)
            stop.chain()   # under submitit, its own handler of that signal (requeue on its USR2) runs now
            sys.exit(128 + stop.signum)
        except KeyboardInterrupt:
            print("kdlab: interrupted (Ctrl-C); run the same command again to resume from the last checkpoint",
                  file=sys.stderr)
            sys.exit(130)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            print(f"kdlab: error: {err.strerror} writing {err.filename or 'a file'}; the files written before "
                  f"are intact: free space and run the same command again to resume", file=sys.stderr)
            sys.exit(2)

    multirun_flag_first()
    refuse_null_groups(sys.argv[1:])
    main()


if __name__ == "__main__":
    cli(run, "config")
