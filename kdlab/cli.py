"""What every ``python -m kdlab.<entry>`` shares: the Hydra app, config validation, the run folder.

The entry points are the modules run with ``python -m``: :mod:`kdlab.run` (train and evaluate),
:mod:`kdlab.eval` (evaluate a checkpoint), :mod:`kdlab.cache_teacher` (the teacher's top-k on disk) and
:mod:`kdlab.report` (tables over runs). Each one is a job function ``job(cfg)`` handed to :func:`main`;
they import the library and this module, never each other.

A job's folder is claimed with :func:`open_run_folder` (lock, leftovers of a killed job removed, the
same-config check, the finished-job check) and its results are written with :func:`write_results`.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import sys
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf

from kdlab import runlock
from kdlab.checkpoint import atomic_write_json, atomic_write_text, read_json
from kdlab.config import ConfigError
from kdlab.modeling import ModelUnavailable
from kdlab.preemption import Stopped

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
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ConfigError(f"seed={cfg.seed!r} is not an integer; set seed=<int>")


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
    atomic_write_text(saved, current)


def finished_results(run_dir: Path) -> dict | None:
    """The results of a job that completed in ``run_dir`` (said on the console, table included), else None."""
    from kdlab.metrics.evaluate import results_table

    path = run_dir / "results.json"
    results = read_json(path) if path.exists() else None
    if results is None or results["run"].get("status") != "completed":
        return None
    print(f"kdlab: {run_dir} is already complete (delete it to run again)\n{results_table(results['eval'])}")
    return results


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
        yield run_dir, finished_results(run_dir)


def override_dirname() -> str:
    """Hydra's ``override_dirname`` of the running job: the command line minus seed, method, student, ...;
    ``kdlab.report`` tells configurations apart by it."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().job.override_dirname


def write_results(cfg, run_dir: Path, results: dict, logger) -> None:
    """``results.json`` (atomically), the W&B/CSV summary, ``results.md`` and the tables on the console."""
    from kdlab.loggers import flatten
    from kdlab.metrics.evaluate import analysis_table, results_table

    atomic_write_json(run_dir / "results.json", results)
    logger.summary(flatten({"eval": results["eval"]}))
    tables = "\n\n".join(t for t in (results_table(results["eval"]), analysis_table(results["eval"])) if t)
    (run_dir / "results.md").write_text(tables + "\n")
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
    config, an unavailable model, a busy run folder or a full disk end the process with one line and exit
    status 2, a stop on SIGTERM/SIGUSR1/SIGUSR2 (checkpoint written) with 128 + the signal's number, and
    Ctrl-C with one line and 130."""
    import hydra

    @hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")
    def app(cfg) -> None:
        logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs every scorer it builds
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
    app()
