"""Metric sinks: ``metrics.jsonl`` always, plus ``metrics.csv`` or Weights & Biases (``conf/logger``).

``build_logger(cfg, run_dir, is_main)`` returns a :class:`Logger` that fans every call out to its
sinks. Only the main rank logs; other ranks get a logger without sinks, so the trainer never has
to branch on the rank.

Console: :func:`progress` is a tqdm bar on a terminal and plain periodic lines otherwise (a SLURM log
holds no carriage returns or cursor escapes); :func:`say` prints one of kdlab's own lines on a line of its
own, clearing a bar being drawn first.

Resume: the trainer restarts from its checkpoint step and logs those steps again, so it calls
``logger.truncate_after(step)`` first; the file sinks drop the lines past that step (W&B cannot
rewrite history; a resumed W&B run keeps its id, see :class:`WandbSink`).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from kdlab import network
from kdlab.checkpoint import atomic_write_text, on_full_disk
from kdlab.config import ConfigError, OneOf, Type, check_section

log = logging.getLogger(__name__)

WANDB_MODES = ("online", "offline", "disabled")

SCHEMAS: dict[str, dict] = {
    "none": {},
    "csv": {},
    "wandb": {
        "project": Type(str),
        "entity": Type(str, optional=True),
        "group": Type(str, optional=True),
        "job_type": OneOf("train", "eval"),
        "tags": Type(list),
        "mode": OneOf(*WANDB_MODES, optional=True),
        "dir": Type(str, optional=True),
    },
}


def validate_logger(cfg_logger: DictConfig | dict) -> None:
    """Check ``cfg.logger`` against the schema of the logger it names."""
    if isinstance(cfg_logger, DictConfig):
        section = OmegaConf.to_container(cfg_logger, resolve=True)
    else:
        section = dict(cfg_logger)
    name = section.get("name")
    if name not in SCHEMAS:
        raise ConfigError(f"logger.name={name!r} is not valid; choose one of: {', '.join(SCHEMAS)}")
    check_section("logger", section, SCHEMAS[name])
    for tag in section.get("tags") or []:
        if not isinstance(tag, str):
            raise ConfigError(f"logger.tags contains {tag!r}; every tag must be a string")


PROGRESS_EVERY_S = 30.0   # a line at most this often when stderr is not a terminal


def interactive() -> bool:
    """Whether stderr is a terminal (not a file, a pipe or a SLURM log)."""
    return sys.stderr.isatty()


def say(line: str, file=None) -> None:
    """One of kdlab's own lines, on a fresh line: a progress bar being drawn is cleared first and redrawn after
    (``tqdm.write``), so the line never continues a bar's."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=file or sys.stderr)


class PlainProgress:
    """The part of tqdm's interface kdlab's loops use, as whole lines on stderr: at most one every
    :data:`PROGRESS_EVERY_S` seconds; a loop that ``leave``s its bar (training) also says its first step and
    its end, a passing one (an evaluation's batches) only what takes longer."""

    def __init__(self, iterable=None, total=None, initial: int = 0, desc: str = "", leave: bool = True,
                 disable: bool = False, unit: str = "it", **_):
        self.iterable, self.desc, self.leave, self.disable, self.unit = iterable, desc, leave, disable, unit
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.n, self.postfix, self.started, self.said_n = initial, "", time.time(), None
        self.said_at = None if leave else self.started

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.said_at is None or time.time() - self.said_at >= PROGRESS_EVERY_S:
            self._say()

    def close(self) -> None:
        if self.leave and self.said_n != self.n:
            self._say()
        self.leave = False   # closed: said once

    def _say(self) -> None:
        if self.disable:
            return
        self.said_at, self.said_n = time.time(), self.n
        of = f"/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else ""
        line = f"{self.desc}: {self.n}{of} {self.unit} {self.postfix} [{self.said_at - self.started:.0f} s]"
        print(" ".join(line.split()), file=sys.stderr, flush=True)


def quiet_library_bars() -> None:
    """When stderr is not a terminal, the libraries' own bars (transformers' "Loading weights", hub downloads)
    are switched off too (``HF_HUB_DISABLE_PROGRESS_BARS``, which both read, for subprocesses as well)."""
    if interactive():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def progress(iterable=None, **kwargs):
    """A progress bar (``tqdm.auto.tqdm``'s arguments) on a terminal; :class:`PlainProgress` lines otherwise."""
    if interactive():
        from tqdm.auto import tqdm

        return tqdm(iterable, dynamic_ncols=True, **kwargs)
    return PlainProgress(iterable, **kwargs)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts (and lists of dicts, keyed by index) to one level with '/'-joined keys."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) for v in value):
            flat.update(flatten({str(i): v for i, v in enumerate(value)}, f"{name}/"))
        else:
            flat[name] = value
    return flat


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars to Python numbers, so every sink can serialise them."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 else value


def _numeric(metrics: dict) -> dict[str, float]:
    """Only numbers go to the CSV and W&B sinks (a string like ``split`` stays in the jsonl)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity (``json.dumps`` writes a bare ``NaN`` that strict parsers reject): a
    non-finite number goes to ``metrics.jsonl`` as the string ``"nan"``, ``"inf"`` or ``"-inf"``."""
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def _rewrite_keeping(path: Path, keep) -> None:
    """Rewrite ``path`` with the lines for which ``keep(line)`` holds (atomically)."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if keep(line)]
    atomic_write_text(path, "".join(lines))


class JsonlSink:
    """``metrics.jsonl``: one ``{"step": step, **metrics}`` object per line, flushed per line."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, metrics: dict, step: int) -> None:
        line = {"step": step, **{k: _json_safe(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(line, allow_nan=False) + "\n")
        self._file.flush()

    def summary(self, metrics: dict) -> None:
        pass  # final metrics live in results.json

    def truncate_after(self, step: int) -> None:
        def keep(line: str) -> bool:
            try:
                return json.loads(line)["step"] <= step
            except (ValueError, KeyError, TypeError):
                return False  # a line cut short by a crash

        self._file.close()
        _rewrite_keeping(self.path, keep)
        self._file = open(self.path, "a", encoding="utf-8")

    def finish(self) -> None:
        self._file.close()


class CsvSink:
    """``metrics.csv`` in long format ``step,key,value``: append-only, so new keys never force a
    header rewrite and a crash loses at most the current line."""

    HEADER = ["step", "key", "value"]

    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.csv"
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = open(self.path, "a", encoding="utf-8", newline="")
        self._writer = csv.writer(self._file, lineterminator="\n")
        if new:
            self._writer.writerow(self.HEADER)
            self._file.flush()

    def log(self, metrics: dict, step: int) -> None:
        self._writer.writerows([step, k, v] for k, v in _numeric(metrics).items())
        self._file.flush()

    def summary(self, metrics: dict) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        def keep(line: str) -> bool:
            head = line.split(",", 1)[0]
            if head == "step":
                return True
            return head.isdigit() and int(head) <= step and line.endswith("\n")

        self._file.close()
        _rewrite_keeping(self.path, keep)
        self._file = open(self.path, "a", encoding="utf-8", newline="")
        self._writer = csv.writer(self._file, lineterminator="\n")

    def finish(self) -> None:
        self._file.close()


def resolve_wandb_mode(mode: str | None) -> tuple[str, bool]:
    """(mode, auto): an explicit mode wins, then ``WANDB_MODE``, then online iff the API answers."""
    if mode is not None:
        return mode, False
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], False
    online = network.reachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"), timeout=1.5)
    return ("online" if online else "offline"), True


class WandbSink:
    """A W&B run in ``<dir>/wandb``: the resolved config, every ``log`` and the final ``summary``.
    ``<dir>`` is ``logger.dir``, else ``$WANDB_DIR`` (as W&B users on clusters set it), else the run folder.

    Offline runs are uploaded later with ``wandb sync <run_dir>/wandb/offline-run-*``. The run id is
    kept in ``<run_dir>/wandb_id.<job_type>`` so a resumed job continues its W&B run (``resume="allow"``;
    steps it logs again are ones W&B already has).
    """

    def __init__(self, cfg: DictConfig, run_dir: Path):
        os.environ.setdefault("WANDB_SILENT", "true")  # no banners; prompts are off without a TTY
        import wandb  # lazily: only runs that ask for W&B pay for the import

        lcfg = cfg.logger
        mode, auto = resolve_wandb_mode(lcfg.get("mode"))
        job_type = lcfg.get("job_type") or "train"
        id_file = run_dir / f"wandb_id.{job_type}"  # an eval job in a train dir gets its own run
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        atomic_write_text(id_file, run_id)
        wandb_dir = Path(lcfg.get("dir") or os.environ.get("WANDB_DIR") or run_dir)   # W&B's own variable, then the run
        wandb_dir.mkdir(parents=True, exist_ok=True)
        kwargs = dict(
            project=lcfg.get("project") or "kdlab",
            entity=lcfg.get("entity"),
            group=lcfg.get("group") or cfg.get("group"),
            name=cfg.get("run_name"),
            job_type=job_type,
            tags=list(lcfg.get("tags") or []),
            dir=str(wandb_dir),
            id=run_id,
            resume="allow",
            config=OmegaConf.to_container(cfg, resolve=True),
            # Hydra's basic launcher runs multirun jobs in one process: one W&B run per job.
            reinit="finish_previous",
            # console off: Hydra already keeps the job's log file; system stats stay on (GPU use).
            settings=wandb.Settings(silent=True, console="off"),
        )
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except wandb.errors.UsageError:
            if not (auto and mode == "online"):
                raise
            log.warning("W&B host reachable but no API key configured: logging offline instead")
            self.run = wandb.init(mode="offline", **kwargs)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(_numeric(metrics), step=step)

    def summary(self, metrics: dict) -> None:
        self.run.summary.update(metrics)

    def truncate_after(self, step: int) -> None:
        pass  # W&B history cannot be rewritten

    def finish(self) -> None:
        self.run.finish()


class Logger:
    """Fans ``log`` / ``summary`` / ``truncate_after`` / ``finish`` out to its sinks."""

    def __init__(self, sinks: Iterable = ()):
        self.sinks = list(sinks)

    def log(self, metrics: dict[str, float], step: int) -> None:
        metrics = {k: _plain(v) for k, v in metrics.items()}
        for sink in self.sinks:
            with on_full_disk(getattr(sink, "path", "the W&B run")):   # W&B's own process writes its files
                sink.log(metrics, step)

    def summary(self, metrics: dict) -> None:
        flat = {k: _plain(v) for k, v in flatten(metrics).items()}
        for sink in self.sinks:
            sink.summary(flat)

    def truncate_after(self, step: int) -> None:
        """Drop what was logged after ``step`` (call on resume, before logging again)."""
        for sink in self.sinks:
            sink.truncate_after(step)

    def finish(self) -> None:
        for sink in self.sinks:
            sink.finish()
        self.sinks = []


def build_logger(cfg: DictConfig, run_dir: Path, is_main: bool = True) -> Logger:
    """The logger named by ``cfg.logger.name`` (none | csv | wandb), writing into ``run_dir``."""
    validate_logger(cfg.logger)
    if not is_main:
        return Logger()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sinks: list = [JsonlSink(run_dir)]
    name = cfg.logger.name
    if name == "csv":
        sinks.append(CsvSink(run_dir))
    elif name == "wandb":
        sinks.append(WandbSink(cfg, run_dir))
    return Logger(sinks)
