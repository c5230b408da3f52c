"""What every ``python -m kdlab.<entry>`` shares: the Hydra app, config validation, the run folder.

The entry points are the modules run with ``python -m``: :mod:`kdlab.run` (train and evaluate),
:mod:`kdlab.eval` (evaluate a checkpoint), :mod:`kdlab.cache_teacher` (the teacher's top-k on disk),
:mod:`kdlab.prune` (a student's shape, size and starting loss) and :mod:`kdlab.report` (tables over runs).
Each one but the last is a job function ``job(cfg)`` handed to :func:`main`; they import the library and
this module, never each other.

A job's folder is claimed with :func:`open_run_folder` (lock, leftovers of a killed job removed, the
same-config check, the finished-job check) and its results are written with :func:`write_results`.
"""
from __future__ import annotations

import hashlib
import logging
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf

from kdlab import runlock
from kdlab.checkpoint import DISK_FULL, DiskFull, atomic_write_json, atomic_write_text, read_json
from kdlab.config import ConfigError, check_name
from kdlab.loggers import quiet_library_bars, say
from kdlab.modeling import ModelUnavailable
from kdlab.preemption import Stopped
from kdlab.trainer import TrainingDiverged

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
REQUIRED_GROUPS = ("teacher", "student", "method", "divergence", "dataset", "hardware", "logger")


def _dirname(overrides: str) -> str:
    """A folder name for a job's overrides: readable when short, hashed when long."""
    name = overrides.replace("/", "_") or "default"
    return name if len(name) <= 100 else f"{name[:60]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"


OmegaConf.register_new_resolver("kdlab.dirname", _dirname, replace=True)


def validate_config(cfg) -> None:
    """Check every group before anything is loaded; raises :class:`ConfigError`."""
    from kdlab.alignment import check_config as check_cross_tokenizer
    from kdlab.data import eval_dataset_cfgs, validate_dataset
    from kdlab.divergences import validate_divergence
    from kdlab.hardware import validate_hardware
    from kdlab.loggers import validate_logger
    from kdlab.methods import method_class
    from kdlab.metrics.evaluate import validate_eval
    from kdlab.student import validate_student
    from kdlab.teacher import check_teacher, validate_teacher
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
    method = method_class(cfg.method.name)
    check_teacher(cfg, method)   # the method x teacher table, across tokenizers too
    check_cross_tokenizer(cfg, method)
    for key in ("experiment", "run_name"):
        check_name(key, cfg.get(key))
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ConfigError(f"seed={cfg.seed!r} is not an integer; set seed=<int>")


# what is in a run folder before kdlab writes any output: Hydra's config and log, the lock, kdlab's config
NOT_OUTPUTS = (".hydra", runlock.LOCK_NAME, "config.yaml")


def check_same_job(cfg, run_dir: Path) -> None:
    """Refuse a folder that holds any output of a job with a different config (a checkpoint, ``eval/``,
    ``student_best/``, metrics...: they belong to the config in the folder, and would be mixed into this
    job's results, or reported as its student); a job that stopped before writing any output (a missing
    model, say) is simply started again with the new config. Call after removing leftovers: a killed
    write's temporary is not an output."""
    saved = run_dir / "config.yaml"
    current = OmegaConf.to_yaml(cfg, resolve=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    outputs = sorted(p.name for p in run_dir.iterdir() if p.name not in NOT_OUTPUTS and not p.name.endswith(".log"))
    if outputs and (not saved.exists() or saved.read_text() != current):
        held = "a job with a different config" if saved.exists() else "outputs of a job whose config.yaml is missing"
        raise ConfigError(f"{run_dir} holds {held} ({', '.join(outputs[:4])}{', ...' if len(outputs) > 4 else ''}); "
                          f"delete that folder or pass hydra.run.dir=<another folder> (output_dir=<folder> for a "
                          f"new tree)")
    atomic_write_text(saved, current)


def finished_results(run_dir: Path, repair: bool = True) -> dict | None:
    """The results of a job that completed in ``run_dir`` (said on the console, table included), else None.
    With ``repair``, a ``results.md`` missing or empty (a full disk or a kill after ``results.json``) is
    written again from ``results.json``."""
    from kdlab.metrics.evaluate import results_table

    path = run_dir / "results.json"
    results = read_json(path) if path.exists() else None
    if results is None or results["run"].get("status") != "completed":
        return None
    derived = run_dir / "results.md"
    if repair and (not derived.exists() or not derived.read_text().strip()):
        atomic_write_text(derived, results_tables(results) + "\n")
    print(f"kdlab: {run_dir} is already complete (delete it to run again)\n{results_table(results['eval'])}")
    return results


def results_tables(results: dict) -> str:
    """``results.md``: the results table, where measured the analysis table, and what they measured (decoding,
    test rows scored)."""
    from kdlab.metrics.evaluate import analysis_table, measured_line, results_table

    return "\n\n".join(t for t in (results_table(results["eval"]), analysis_table(results["eval"]),
                                    measured_line(results)) if t)


@contextmanager
def open_run_folder(cfg):
    """Claim the job's Hydra run folder for this process: yields ``(run_dir, finished results or None)``.

    The folder is locked before kdlab writes anything into it (Hydra's ``.hydra/`` and log are already
    there), a killed job's leftovers are removed, and a folder holding another config's job is refused.
    """
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    main_process = runlock.main_process()
    with runlock.hold(run_dir, locks=main_process):
        if main_process:
            # rank 0 alone writes here: another rank's config.yaml temporary, written while rank 0 clears
            # leftovers, would be deleted as one, and that rank would crash on its rename
            runlock.remove_leftovers(run_dir)
            check_same_job(cfg, run_dir)
        yield run_dir, finished_results(run_dir, repair=main_process)


def override_dirname() -> str:
    """Hydra's ``override_dirname`` of the running job: the command line minus seed, method, student, ...;
    ``kdlab.report`` tells configurations apart by it."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().job.override_dirname


def write_results(cfg, run_dir: Path, results: dict, logger) -> None:
    """``results.json`` (atomically), the W&B/CSV summary, ``results.md`` and the tables on the console."""
    from kdlab.loggers import flatten

    atomic_write_json(run_dir / "results.json", results)
    logger.summary(flatten({"eval": results["eval"]}))
    tables = results_tables(results)
    atomic_write_text(run_dir / "results.md", tables + "\n")
    print(f"\nkdlab: results in {run_dir}\n{tables}")


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
        if arg != group and group in REQUIRED_GROUPS:
            options = ", ".join(sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml")))
            print(f"kdlab: error: {arg} removes the {group} group, which every job needs; choose {group}=<one of: "
                  f"{options}>", file=sys.stderr)
            sys.exit(2)


def main(job, config_name: str) -> None:
    """Run ``job(cfg)`` as a Hydra app on ``conf/<config_name>.yaml``: ``-m`` may stand anywhere; a bad
    config, an unavailable model, a busy run folder, a diverged training or a full disk end the process with one line and exit
    status 2, a stop on SIGTERM/SIGUSR1/SIGUSR2 (checkpoint written) with 128 + the signal's number, and
    Ctrl-C with one line and 130. In a local ``-m`` sweep (Hydra's basic launcher) a job that fails otherwise
    is said and the next job runs; the process then ends with a line naming the failed jobs and status 1."""
    import hydra

    def one_job(cfg) -> None:
        logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs every scorer it builds
        try:
            job(cfg)
        except (ConfigError, ModelUnavailable, TrainingDiverged) as err:
            say(f"kdlab: error: {err}")
            sys.exit(2)
        except Stopped as stop:
            say(f"kdlab: {stop}")
            stop.chain()   # under submitit, its own handler of that signal (requeue on its USR2) runs now
            sys.exit(128 + stop.signum)
        except KeyboardInterrupt:
            say("kdlab: interrupted (Ctrl-C); run the same command again to resume from the last checkpoint")
            sys.exit(130)
        except OSError as err:   # DiskFull from kdlab's writes; a bare ENOSPC from a library's own (Hydra's log)
            if err.errno not in DISK_FULL:
                raise
            say(f"kdlab: error: {err if isinstance(err, DiskFull) else DiskFull(err.errno, err.filename or '?')}")
            sys.exit(2)

    failed = []   # the jobs of a local sweep that failed

    @hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")
    def app(cfg) -> None:
        try:
            one_job(cfg)
        except (Exception, SystemExit) as err:   # not Ctrl-C or a stop signal (exit status 128+): those end the sweep
            if isinstance(err, SystemExit) and err.code != 2 or not in_local_sweep():
                raise
            if not isinstance(err, SystemExit):
                traceback.print_exc()
            failed.append(sweep_job_name())
            say(f"kdlab: sweep job {failed[-1]} failed; going on with the next job")

    multirun_flag_first()
    refuse_null_groups(sys.argv[1:])
    quiet_library_bars()
    app()
    if failed:
        say(f"kdlab: error: {len(failed)} job(s) of the sweep failed (each said why above): {'; '.join(failed)}")
        sys.exit(1)


def in_local_sweep() -> bool:
    """Whether this job is one of a ``-m`` sweep run in this process by Hydra's basic launcher, where one job's
    exit would end the jobs after it (a submitit launcher runs each job as a process of its own)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    return hydra_cfg.mode == RunMode.MULTIRUN and hydra_cfg.launcher._target_.endswith(".BasicLauncher")


def sweep_job_name() -> str:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    return f"#{hydra_cfg.job.num} ({' '.join(hydra_cfg.overrides.task)})"
