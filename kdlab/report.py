"""Aggregate finished runs into the tables of the seed papers: ``python -m kdlab.report <folder>``.

Walks ``<folder>`` for ``results.json`` (format in docs/DESIGN.md) and writes to ``--out``
(default ``<folder>``):

- ``report.md`` (also printed): one table per (experiment, training dataset). Rows are methods grouped
  by student, plus a ``teacher`` row; columns are the evaluation datasets, ``AVG``, the mean training
  time (results.json ``run.train_time_s``) and the mean training throughput (``train/tokens_per_s``
  of ``metrics.jsonl``, mean over the logged steps of a run, then over runs). A cell is
  ``mean ± std [low, high] (n)`` of ``eval.<model>.<dataset>.<metric>`` over the n runs (seeds): std is
  the sample standard deviation (ddof=1), as the papers report over 5 seeds, and ``[low, high]`` the
  95 % t-interval of the mean over seeds, ``mean ± t(0.975, n-1) · std / sqrt(n)``: it treats the
  training seeds as the sample (the test set is held fixed). With one run both are undefined and
  printed as ``-`` (empty in the CSV). ``AVG`` is, per run, the mean over the table's datasets, then
  the same statistics over the runs that evaluated all of them.
- with ``--baseline <method>``, a second table per student: each method's difference from the baseline
  (method − baseline) with two paired 95 % intervals, one over test rows (bootstrap) and one over
  seeds (t), see :func:`paired_difference`. The pairing is by
  training seed and by test row (the example ``id`` of ``eval.<model>.<dataset>.per_row``: ``rougeL``,
  ``exact_match``); a metric without per-row scores (``exaccerr.l=16``, ``top1``) is paired by seed only and
  gets the t-interval alone (MiniLLM's exposure-bias claim is read this way).
- under each table, what its numbers measured, read from the runs themselves: the decoding of the scored
  generations (results.json ``run.decoding``; for older runs, the saved ``config.yaml``'s ``eval``), the test rows scored of each dataset and why the others
  were dropped (results.json ``data``), the training rows, the prompts of the teacher-forcing analysis, and
  the machine the times were measured on (``run.machine``); where runs differ, each value with the number of
  runs it holds for.
- ``report.csv``: the same numbers in long form (one row per cell), with the decoding and the test rows
  scored by the students (``decoding``, ``test_rows``: ``kept/rows``; a teacher's rows are tokenized by its own
  tokenizer, so its ``test_rows`` is left empty).
- ``curves_<table>.png``: validation metric (``valid/<metric>`` in ``metrics.jsonl``) over training
  steps, mean over seeds per method; ``unc_<table>_<dataset>.png``: per UNC bucket, one line per method
  (mean over seeds, band ± std) of the student's logit std, KL and TOP-1 agreement, when the results
  carry ``unc_buckets`` (OKD Eqs. 3-4, Figs. 2 and 5).
- a "Missing/failed runs" section: run directories (``.hydra/`` or ``config.yaml``) without
  ``results.json``, and results whose ``status`` is not ``completed``. They are never averaged in.

A folder that does not exist, or holds no run at all, is an error (exit status 2, one line), not an
empty report; so is a ``--baseline`` that names no row.

A ``kdlab.eval`` run's student row is labelled ``student_init (kdlab.eval)`` (no ``student.path``: the student
as its group builds it, a training job's ``student_init``) or ``kdlab.eval <path>``. Methods are labelled
``method (divergence)`` when the method's loss reads the divergence group
(``Method.uses_divergence``: kd, gkd, imitkd, okd) or the divergence is a cross-tokenizer one (it
decides the student's tokenizer), else ``method``; then the run's other command-line overrides
(results.json ``run.overrides``, e.g. ``[method.lora_layers=null]``) so that the points of an ablation
grid get a row each; overrides that do not change what is trained or measured (``hardware``,
``logger``, ``hydra``, ``output_dir``), the ``sweep`` group (it picks which jobs run: what they vary is in
their own overrides, what it pins is the experiment's setting for them, e.g. MiniLLM's rollouts in
``+sweep=dolly-cpu-minillm``) and those the table already shows (``divergence``, ``dataset``, ``teacher``)
are left out of the label.
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import os
import re
import statistics
import sys
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from kdlab.checkpoint import DiskFull, atomic_file, atomic_write_text
from kdlab.config import ConfigError
from kdlab.divergences import is_cross_tokenizer
from kdlab.methods import method_class
from kdlab.metrics.evaluate import decoding_text, rows_text

# Folders a run writes that are never run directories themselves.
SKIP_DIRS = {".hydra", "wandb", "checkpoints", "student", "student_best", "__pycache__"}
METHOD_ORDER = ["sft", "kd", "seqkd", "imitkd", "gkd", "minillm", "dpkd", "okd"]
UNC_FIELDS = (("std", "student logit std"), ("kl", "KL(p‖q)"), ("top1", "TOP-1 agreement"))
UNLABELLED = re.compile(r"^(hardware|logger|hydra|output_dir|sweep|divergence|dataset|teacher)([./=]|$)")
CONFIDENCE = 0.95
PERCENTILES = (50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE))  # 2.5 and 97.5
BOOTSTRAP_SEED = 0  # fixed: the same folder gives the same intervals
BOOTSTRAP_REPLICATES = 10_000


class ReportError(ValueError):
    """A request the runs cannot answer (e.g. a ``--baseline`` that names no row)."""


@functools.lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """Student's t quantile ``t(p, df)`` for ``p`` in (0.5, 1) (no scipy): bisection on the CDF
    ``1/2 + integral_0^x pdf``, the density integrated by Simpson's rule."""
    scale = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float) -> float:
        u = np.linspace(0.0, x, 4001)
        f = scale * (1 + u * u / df) ** (-(df + 1) / 2)
        return 0.5 + (x / 4000 / 3) * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    low, high = 0.0, 1.0
    while cdf(high) < p:
        low, high = high, 2 * high
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


def uses_divergence(method: str, divergence: str | None) -> bool:
    """Whether runs of ``method`` depend on the ``divergence`` group: its loss reads it, or it is a
    cross-tokenizer divergence (which gives the student its own tokenizer). An unknown method (a run
    of another kdlab version) keeps what it recorded."""
    try:
        reads_it = method_class(method).uses_divergence
    except ConfigError:
        return True
    return reads_it or is_cross_tokenizer(divergence)


def split_overrides(overrides: str) -> list[str]:
    """Hydra's ``override_dirname`` (``a=1,b.c=[x,y]``) back into its overrides (commas in brackets stay)."""
    parts, depth, current = [], 0, ""
    for char in overrides:
        depth += char in "[{("
        depth -= char in "]})"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p for p in parts + [current] if p]


@dataclass
class Run:
    dir: Path
    meta: dict
    eval: dict
    data: dict = field(default_factory=dict)   # results.json ``data``: rows kept and dropped per split

    @functools.cached_property
    def config(self) -> dict:
        """The run's resolved ``config.yaml`` (empty when missing or unreadable)."""
        try:
            return yaml.safe_load((self.dir / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            return {}

    @property
    def label(self) -> str:
        if self.meta.get("job") == "eval":   # kdlab.eval: no training; without a path, the student as built
            path = self.meta.get("student_path")
            return f"kdlab.eval {path}" if path else "student_init (kdlab.eval)"
        method, div = self.meta.get("method"), self.meta.get("divergence")
        label = f"{method} ({div})" if div and uses_divergence(method, div) else str(method)
        extra = [o for o in split_overrides(self.meta.get("overrides") or "") if not UNLABELLED.match(o.lstrip("+~"))]
        return f"{label} [{', '.join(extra)}]" if extra else label

    @property
    def table(self) -> tuple:
        return (self.meta.get("experiment"), self.meta.get("dataset"))


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan

    @property
    def interval(self) -> tuple[float, float]:
        """95 % t-interval of the mean over the runs (seeds); NaNs with fewer than two."""
        n = len(self.values)
        if n < 2:
            return math.nan, math.nan
        half = t_quantile((1 + CONFIDENCE) / 2, n - 1) * self.std / math.sqrt(n)
        return self.mean - half, self.mean + half

    def __str__(self) -> str:
        if not self.values:
            return "-"
        if len(self.values) == 1:
            return f"{self.mean:.2f} ± - (1)"
        low, high = self.interval
        return f"{self.mean:.2f} ± {self.std:.2f} [{low:.2f}, {high:.2f}] ({len(self.values)})"


def _dig(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


def _name(cfg: dict, group: str):
    """``cfg[group].name`` or ``cfg[group]`` when the group is a plain string."""
    value = cfg.get(group)
    return value.get("name") if isinstance(value, dict) else value


def _config_meta(run_dir: Path) -> dict:
    """What a run without results.json was meant to be, read from its saved config."""
    for path in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if path.exists():
            try:
                cfg = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError:
                continue
            names = {g: _name(cfg, g) for g in ("method", "student", "teacher", "dataset", "divergence")}
            return {**names, "seed": cfg.get("seed")}
    return {}


def scan(root: Path) -> tuple[list[Run], list[dict]]:
    """Completed runs, and problem rows ``{dir, status, method, student, seed, dataset, ...}``."""
    runs, problems = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        run_dir = Path(dirpath)
        if "results.json" in filenames:
            try:
                results = json.loads((run_dir / "results.json").read_text())
            except ValueError:
                problems.append({"dir": run_dir, "status": "unreadable results.json", **_config_meta(run_dir)})
                continue
            meta = results.get("run", {})
            if meta.get("status") == "completed":
                runs.append(Run(run_dir, meta, results.get("eval", {}), results.get("data") or {}))
            else:
                problems.append({"dir": run_dir, **meta, "status": meta.get("status") or "no status"})
        elif "config.yaml" in filenames or (run_dir / ".hydra").is_dir():
            problems.append({"dir": run_dir, **_config_meta(run_dir), "status": "no results.json"})
    return runs, problems


def _method_key(label: str) -> tuple:
    method = label.split(" ")[0]
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), label)


@dataclass
class Row:
    teacher: str
    student: str
    method: str
    runs: list[Run]
    model: str  # key under eval: "student" or "teacher"


def table_rows(runs: list[Run]) -> list[Row]:
    """Teacher rows first, then methods grouped by student. A teacher is evaluated once per seed
    (every method's run of that seed repeats the same numbers), so its runs are deduplicated."""
    teachers: dict[str, dict] = defaultdict(dict)
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        if "teacher" in run.eval:
            teachers[run.meta.get("teacher")].setdefault(run.meta.get("seed"), run)
        if "student" in run.eval:
            groups[(run.meta.get("teacher"), run.meta.get("student"), run.label)].append(run)
    rows = [Row(str(t), "-", "teacher", list(by_seed.values()), "teacher")
            for t, by_seed in sorted(teachers.items(), key=str)]
    for key in sorted(groups, key=lambda k: (str(k[1]), str(k[0]), _method_key(k[2]))):
        rows.append(Row(str(key[0]), str(key[1]), key[2], groups[key], "student"))
    return rows


def row_cells(row: Row, datasets: list[str], metric: str) -> dict[str, Cell]:
    cells = {d: Cell() for d in [*datasets, "AVG"]}
    for run in row.runs:
        scores = {d: _dig(run.eval, f"{row.model}.{d}.{metric}") for d in datasets}
        for d, value in scores.items():
            if value is not None:
                cells[d].values.append(float(value))
        if all(v is not None for v in scores.values()):
            cells["AVG"].values.append(statistics.fmean(float(v) for v in scores.values()))
    return cells


def train_time(row: Row) -> float:
    if row.model != "student":
        return math.nan
    times = [r.meta["train_time_s"] for r in row.runs if r.meta.get("train_time_s") is not None]
    return statistics.fmean(times) if times else math.nan


def tokens_per_s(row: Row) -> float:
    """Mean over runs of each run's mean ``train/tokens_per_s`` over its logged steps (NaN if none logged)."""
    if row.model != "student":
        return math.nan
    curves = [_read_curve(run.dir, "train/tokens_per_s") for run in row.runs]
    per_run = [statistics.fmean(curve.values()) for curve in curves if curve]
    return statistics.fmean(per_run) if per_run else math.nan


@dataclass
class Difference:
    """``estimate`` (method − baseline) over ``rows`` test rows x the seeds of ``per_seed``, with two
    95 % intervals: ``low``/``high`` over test rows (:func:`bootstrap_means`), and the t-interval over
    seeds of ``per_seed`` (each seed's mean difference over the rows)."""
    estimate: float
    low: float
    high: float
    per_seed: dict
    rows: int

    @property
    def seeds(self) -> int:
        return len(self.per_seed)

    @property
    def seed_interval(self) -> tuple[float, float]:
        return Cell(list(self.per_seed.values())).interval

    def __str__(self) -> str:
        seed_low, seed_high = self.seed_interval
        seeds = "-" if math.isnan(seed_low) else f"[{seed_low:+.2f}, {seed_high:+.2f}]"
        rows = f"[{self.low:+.2f}, {self.high:+.2f}]" if self.rows else "-"
        return f"{self.estimate:+.2f} {rows} / {seeds} ({self.seeds}×{self.rows or '-'})"


def per_row_scores(run: Run, model: str, dataset: str, metric: str) -> dict[str, float] | None:
    """``{example id: score}`` of one run's ``per_row`` record, None when it has none for ``metric``."""
    rows = _dig(run.eval, f"{model}.{dataset}.per_row")
    if not isinstance(rows, dict) or metric not in rows:
        return None
    return dict(zip(rows["id"], map(float, rows[metric])))


def by_seed(row: Row, value) -> dict:
    """``{seed: value(run)}`` over ``row``'s runs where ``value`` gives something other than None; a second
    run of one seed is ignored."""
    found: dict = {}
    for run in row.runs:
        v = value(run)
        if v is not None:
            found.setdefault(run.meta.get("seed"), v)
    return found


def paired_rows(row: Row, base: Row, dataset: str, metric: str) -> tuple[list, list[str], np.ndarray] | None:
    """``(seeds, ids, differences)`` of ``row`` against ``base``: the seeds both have per-row scores for
    (a second run of one seed is ignored), the example ids present in every one of those runs (sorted),
    and ``differences[s, i]`` = score of ``row`` − score of ``base`` on row ``ids[i]`` at seed ``seeds[s]``.
    None when no seed or no row is shared."""
    scores = [by_seed(r, lambda run, r=r: per_row_scores(run, r.model, dataset, metric)) for r in (row, base)]
    seeds = sorted(set(scores[0]) & set(scores[1]), key=str)
    ids = sorted(set.intersection(*(set(side[s]) for side in scores for s in seeds))) if seeds else []
    if not ids:
        return None
    return seeds, ids, np.array([[scores[0][s][i] - scores[1][s][i] for i in ids] for s in seeds])


def seed_differences(row: Row, base: Row, dataset: str, metric: str) -> dict:
    """``{seed: row's metric − base's}`` over the seeds both evaluated on ``dataset`` (a second run of one seed is
    ignored): the pairing of a metric with no per-row scores (ExAccErr, the UNC-bucket numbers)."""
    def number(run, r):
        value = _dig(run.eval, f"{r.model}.{dataset}.{metric}")
        return float(value) if isinstance(value, (int, float)) else None

    values = [by_seed(r, lambda run, r=r: number(run, r)) for r in (row, base)]
    return {s: values[0][s] - values[1][s] for s in sorted(set(values[0]) & set(values[1]), key=str)}


def bootstrap_means(differences: np.ndarray, dataset: str, replicates: int) -> np.ndarray:
    """``replicates`` bootstrap means of ``differences`` (seeds x rows) over test rows: each replicate draws
    the row indices once, with replacement, and applies them to every seed and to both methods (a row's
    difficulty is shared by seeds), then averages over rows and seeds. The generator is seeded by
    ``BOOTSTRAP_SEED`` and the dataset name, so an interval depends only on its own cell."""
    rng = np.random.default_rng([BOOTSTRAP_SEED, zlib.crc32(dataset.encode())])
    per_row = differences.mean(axis=0)
    return per_row[rng.integers(0, per_row.size, size=(replicates, per_row.size))].mean(axis=1)


def paired_difference(row: Row, base: Row, datasets: list[str], metric: str,
                      replicates: int = BOOTSTRAP_REPLICATES) -> dict[str, Difference | None]:
    """Per dataset (and ``AVG``): the mean over shared seeds and shared test rows of (row − base), its 95 %
    percentile interval over test rows from :func:`bootstrap_means` (2.5th and 97.5th percentiles, numpy's
    linear interpolation), which covers the test set's sampling given the trained students, and the 95 %
    t-interval over seeds of the per-seed mean differences, which covers the training seeds' spread on
    this test set. A metric without per-row scores is paired over seeds only (:func:`seed_differences`: the
    mean over shared seeds and the t-interval, no row interval, ``rows`` 0). ``AVG`` is the mean over
    datasets: its replicates are the means of the datasets' replicates, its per-seed values the means over
    datasets (seeds every dataset pairs); only when every dataset has a pairing of the same kind."""
    out: dict[str, Difference | None] = {}
    replicated = {}
    for dataset in datasets:
        paired = paired_rows(row, base, dataset, metric)
        if paired is None:
            per_seed = seed_differences(row, base, dataset, metric)
            out[dataset] = (Difference(statistics.fmean(per_seed.values()), math.nan, math.nan, per_seed, 0)
                            if per_seed else None)
            continue
        seeds, ids, differences = paired
        replicated[dataset] = bootstrap_means(differences, dataset, replicates)
        out[dataset] = Difference(float(differences.mean()), *np.percentile(replicated[dataset], PERCENTILES),
                                  dict(zip(seeds, differences.mean(axis=1).tolist())), len(ids))
    seeds_only = datasets and all(out[d] is not None and out[d].rows == 0 for d in datasets)
    if datasets and (len(replicated) == len(datasets) or seeds_only):
        low, high = np.percentile(np.mean([replicated[d] for d in datasets], axis=0), PERCENTILES) \
            if replicated else (math.nan, math.nan)
        seeds = [s for s in out[datasets[0]].per_seed if all(s in out[d].per_seed for d in datasets)]
        out["AVG"] = Difference(statistics.fmean(out[d].estimate for d in datasets), low, high,
                                {s: statistics.fmean(out[d].per_seed[s] for d in datasets) for s in seeds},
                                sum(out[d].rows for d in datasets))
    else:
        out["AVG"] = None
    return out


def baseline_rows(rows: list[Row], baseline: str) -> dict[tuple, Row]:
    """``{(teacher, student): the baseline's row}``: the row labelled ``baseline`` (e.g. ``sft``,
    ``kd (rkl)``), or the one row of that method (``kd`` for ``kd (fkl)``)."""
    found: dict[tuple, Row] = {}
    for key in {(r.teacher, r.student) for r in rows if r.model == "student"}:
        group = [r for r in rows if r.model == "student" and (r.teacher, r.student) == key]
        exact = [r for r in group if r.method == baseline]
        named = exact or [r for r in group if r.runs[0].meta.get("method") == baseline]
        if len(named) > 1:
            raise ReportError(f"--baseline {baseline} matches several rows of student {key[1]}: "
                              f"{', '.join(r.method for r in named)}; pass one of these labels")
        if named:
            found[key] = named[0]
    return found


def _slug(*parts) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(str(p) for p in parts if p is not None)) or "all"


def _read_curve(run_dir: Path, key: str) -> dict[int, float]:
    path, curve = run_dir / "metrics.jsonl", {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if isinstance(entry, dict) and entry.get(key) is not None:
                curve[entry["step"]] = float(entry[key])  # a resumed run's re-logged step wins
    return curve


def mean_curve(runs: list[Run], key: str) -> dict[int, float]:
    """step -> mean of ``key`` over the runs that logged it at that step (sorted by step)."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        for step, value in _read_curve(run.dir, key).items():
            by_step[step].append(value)
    return {step: statistics.fmean(by_step[step]) for step in sorted(by_step)}


def plot_curves(rows: list[Row], key: str, title: str, out: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for row in rows:
        if row.model != "student":
            continue
        curve = mean_curve(row.runs, key)
        if not curve:
            continue
        steps, means = zip(*curve.items())
        ax.plot(steps, means, marker=".", label=f"{row.student} · {row.method} (n={len(row.runs)})")
        drawn = True
    if drawn:
        ax.set(xlabel="training step", ylabel=key, title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, out)
    plt.close(fig)
    return drawn


def unc_series(rows: list[Row], dataset: str) -> dict[str, dict]:
    """``{"student · method": {bucket: {field: [value per run]}}}`` from the runs' ``unc_buckets``."""
    series: dict[str, dict] = {}
    for row in rows:
        if row.model != "student":
            continue
        buckets: dict = defaultdict(lambda: defaultdict(list))
        for run in row.runs:
            for entry in _dig(run.eval, f"student.{dataset}.unc_buckets") or []:
                for name, _ in UNC_FIELDS:
                    if entry.get(name) is not None:
                        buckets[entry["bucket"]][name].append(float(entry[name]))
        if buckets:
            series[f"{row.student} · {row.method}"] = buckets
    return series


def unc_figure(rows: list[Row], dataset: str, title: str):
    """One panel per UNC field, one line per method (mean over runs per bucket, band ± std over
    runs); None when no run has UNC buckets on ``dataset``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = unc_series(rows, dataset)
    if not series:
        return None
    all_buckets = sorted({b for buckets in series.values() for b in buckets}, key=str)
    xs = np.arange(len(all_buckets))
    fig, axes = plt.subplots(1, len(UNC_FIELDS), figsize=(4.5 * len(UNC_FIELDS), 4))
    for ax, (name, nice) in zip(axes, UNC_FIELDS):
        for label, buckets in series.items():
            values = [buckets.get(b, {}).get(name, []) for b in all_buckets]
            means = np.array([statistics.fmean(v) if v else np.nan for v in values])
            stds = np.array([statistics.stdev(v) if len(v) > 1 else 0.0 for v in values])
            (line,) = ax.plot(xs, means, marker="o", label=label)
            ax.fill_between(xs, means - stds, means + stds, color=line.get_color(), alpha=0.15)
        ax.set_xticks(xs, [str(b) for b in all_buckets])
        ax.set(xlabel="UNC bucket (easy → hard)", title=nice)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_unc(rows: list[Row], dataset: str, title: str, out: Path) -> bool:
    fig = unc_figure(rows, dataset, title)
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    save_figure(fig, out)
    plt.close(fig)
    return True


def save_figure(fig, out: Path) -> None:
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=120, format=out.suffix[1:])


def decoding(run: Run) -> str:
    """How the run's scored generations were decoded: results.json ``run.decoding``, or its saved ``eval`` config
    (runs written before kdlab recorded it)."""
    if run.meta.get("decoding"):
        return run.meta["decoding"]
    cfg = run.config.get("eval")
    return decoding_text(cfg) if isinstance(cfg, dict) and "do_sample" in cfg else "not recorded"


def test_rows(run: Run, dataset: str) -> str:
    """``kept/rows`` of ``dataset``'s test split as the run scored it (results.json ``data.test``)."""
    counts = (run.data.get("test") or {}).get(dataset)
    return f"{counts['kept']}/{counts['rows']}" if counts else "not recorded"


def _analysis(run: Run) -> str:
    cfg = (run.config.get("eval") or {}).get("analysis")
    if not isinstance(cfg, dict):
        return "not recorded"
    if not cfg.get("enabled"):
        return "off"
    prompts = f"first {cfg['max_examples']} scored rows" if cfg.get("max_examples") else "every scored row"
    return f"{prompts} per dataset, {cfg.get('exaccerr_samples')} ExAccErr sample(s) per prompt"


def _tally(values: list[str]) -> str:
    """One value, or each distinct value with the number of runs that have it."""
    counts = Counter(values)   # first-seen order
    if len(counts) == 1:
        return values[0]
    return "; ".join(f"{value} ({n} run{'s' if n > 1 else ''})" for value, n in counts.items())


def measured(runs: list[Run], datasets: list[str]) -> str:
    """The paragraph under a table: the settings and rows behind its numbers, read from the runs."""
    students = [r for r in runs if "student" in r.eval] or runs
    tests = "; ".join(f"{d} {_tally([rows_text((r.data.get('test') or {}).get(d)) for r in students])}"
                      for d in datasets)
    return (f"Measured: generations {_tally([decoding(r) for r in students])}. Test rows scored: {tests}. "
            f"Training rows: {_tally([rows_text(r.data.get('train')) for r in students])}. Teacher-forcing "
            f"analysis (TOP-1, UNC, ExAccErr): {_tally([_analysis(r) for r in students])}. Machine (times): "
            f"{_tally([r.meta.get('machine') or 'not recorded' for r in runs])}.")


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in body]


CSV_FIELDS = ["experiment", "train_dataset", "teacher", "student", "method", "eval_dataset", "metric",
              "mean", "std", "n", "ci_low", "ci_high", "train_time_s", "tokens_per_s", "decoding", "test_rows",
              "baseline", "diff", "diff_low", "diff_high", "diff_seed_low", "diff_seed_high", "diff_seeds",
              "diff_rows"]
PROBLEM_FIELDS = ["method", "divergence", "student", "seed", "dataset", "status"]


def _number(x) -> float | str:
    """A CSV field: the number, or empty when undefined."""
    return "" if x is None or math.isnan(x) else x


def _table(key: tuple, runs: list[Run], metric: str, out: Path, csv_rows: list[dict],
           baseline: str | None = None, replicates: int = BOOTSTRAP_REPLICATES) -> list[str]:
    """Markdown (table, differences from ``baseline``, plot links) of one (experiment, training dataset);
    appends to ``csv_rows``."""
    experiment, train_set = key
    datasets = sorted({d for r in runs for model in ("student", "teacher") for d in r.eval.get(model, {})})
    rows = table_rows(runs)
    bases = baseline_rows(rows, baseline) if baseline else {}
    body, diff_body = [], []
    for row in rows:
        cells = row_cells(row, datasets, metric)
        seconds, speed = train_time(row), tokens_per_s(row)
        body.append([row.teacher, row.student, row.method, *map(str, cells.values()),
                     "-" if math.isnan(seconds) else f"{seconds:.0f}", "-" if math.isnan(speed) else f"{speed:.0f}"])
        base = bases.get((row.teacher, row.student)) if row.model == "student" else None
        diffs = paired_difference(row, base, datasets, metric, replicates) if base and base is not row else {}
        if any(diffs.values()):
            diff_body.append([row.teacher, row.student, row.method, *("-" if diffs[d] is None else str(diffs[d])
                                                                      for d in [*datasets, "AVG"])])
        for dataset, cell in cells.items():
            diff = diffs.get(dataset)
            csv_rows.append({
                "experiment": experiment, "train_dataset": train_set, "teacher": row.teacher,
                "student": row.student, "method": row.method, "eval_dataset": dataset, "metric": metric,
                "mean": cell.mean if cell.values else "", "std": _number(cell.std) if cell.values else "",
                "n": len(cell.values), "ci_low": _number(cell.interval[0]), "ci_high": _number(cell.interval[1]),
                "train_time_s": _number(seconds), "tokens_per_s": _number(speed),
                "decoding": _tally([decoding(r) for r in row.runs]),
                "test_rows": ("" if dataset == "AVG" or row.model != "student" else
                              _tally([test_rows(r, dataset) for r in row.runs])),
                "baseline": base.method if diffs else "",
                **({} if diff is None else {
                    "diff": diff.estimate, "diff_low": _number(diff.low), "diff_high": _number(diff.high),
                    "diff_seed_low": _number(diff.seed_interval[0]), "diff_seed_high": _number(diff.seed_interval[1]),
                    "diff_seeds": diff.seeds, "diff_rows": diff.rows}),
            })
    md = [f"## experiment `{experiment}` · trained on `{train_set}`", ""]
    md += _md_table(["teacher", "student", "method", *datasets, "AVG", "train time (s)", "tokens/s"], body) + [""]
    md += [measured(runs, datasets), ""]
    if baseline:
        missing = sorted({r.student for r in rows if r.model == "student"} - {s for _, s in bases})
        md += [f"Difference from `{baseline}` (method − {baseline}, same teacher and student): mean over the "
               "paired seeds and test rows [95 % bootstrap interval over test rows] / [95 % t-interval over "
               "seeds] (seeds × rows paired; rows `-`: the metric has no per-row scores, so it is paired over "
               "seeds only)."
               + (f" No `{baseline}` row for student {', '.join(missing)}." if missing else ""), ""]
        md += (_md_table(["teacher", "student", "method", *datasets, "AVG"], diff_body) if diff_body else
               [f"No pairing: no other method shares a seed and `{metric}` scores with `{baseline}`."])
        md += [""]
    name = _slug(experiment, train_set)
    curve_png = out / f"curves_{name}.png"
    if plot_curves(rows, f"valid/{metric}", f"valid/{metric} · {experiment} · {train_set}", curve_png):
        md += [f"![validation curves]({curve_png.name})", ""]
    for dataset in datasets:
        unc_png = out / f"unc_{name}_{_slug(dataset)}.png"
        if plot_unc(rows, dataset, f"UNC buckets · {dataset} · trained on {train_set}", unc_png):
            md += [f"![UNC buckets on {dataset}]({unc_png.name})", ""]
    return md


def build_report(folder: Path, out: Path, metric: str = "rougeL", baseline: str | None = None,
                 replicates: int = BOOTSTRAP_REPLICATES) -> str:
    """Write report.md, report.csv and the plots into ``out``; return the markdown. Raises
    :class:`ReportError` when ``baseline`` names no row of any table."""
    folder, out = Path(folder), Path(out)
    runs, problems = scan(folder)
    tables: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        tables[run.table].append(run)
    if baseline and not any(baseline_rows(table_rows(t), baseline) for t in tables.values()):
        labels = sorted({r.method for t in tables.values() for r in table_rows(t) if r.model == "student"})
        raise ReportError(f"--baseline {baseline} names no row; rows: {', '.join(labels) or 'none'}")
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# kdlab report: `{metric}`", "",
          f"Runs under `{folder}`: {len(runs)} completed, {len(problems)} missing/failed.",
          "Cells: mean ± sample std (ddof=1) over runs [95 % t-interval of the mean over runs (seeds): "
          "mean ± t(0.975, n−1)·std/√n] (n); std and interval `-` with one run. "
          "AVG: per-run mean over the table's datasets, then the same. Train time: mean seconds; "
          "tokens/s: mean of the logged `train/tokens_per_s`.", ""]
    if baseline:
        md += [f"Differences from `{baseline}`: per seed and test row (the example id), method − {baseline}, on "
               "the seeds and rows both have; the estimate is their mean, the interval the 2.5th–97.5th "
               f"percentiles of {replicates} bootstrap means that resample test rows (the same rows for every "
               f"seed and both methods; generator seed {BOOTSTRAP_SEED}): the uncertainty from the test rows "
               "given the trained students. The second interval is the t-interval over seeds of each seed's mean "
               "difference: the training seeds' spread on these rows (`-` with one seed).", ""]
    csv_rows: list[dict] = []
    for key in sorted(tables, key=str):
        md += _table(key, tables[key], metric, out, csv_rows, baseline, replicates)

    md += ["## Missing/failed runs", ""]
    body = [[str(p["dir"].relative_to(folder)), *("-" if p.get(k) is None else str(p[k]) for k in PROBLEM_FIELDS)]
            for p in problems]
    md += _md_table(["run dir", *PROBLEM_FIELDS], body) if body else ["None."]

    text = "\n".join(md) + "\n"
    atomic_write_text(out / "report.md", text)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(csv_rows)
    atomic_write_text(out / "report.csv", table.getvalue())
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="folder searched recursively for run directories")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write report.md/csv and plots (default: folder)")
    parser.add_argument("--metric", default="rougeL", help="metric under eval.<model>.<dataset> (default: rougeL)")
    parser.add_argument("--baseline", default=None,
                        help="a method (e.g. sft) or row label (e.g. 'kd (rkl)'): add each method's difference from "
                             "it with a paired 95%% bootstrap interval over test rows (metrics with per-row scores) and a "
                             "t-interval over seeds")
    parser.add_argument("--bootstrap", type=int, default=BOOTSTRAP_REPLICATES, metavar="N",
                        help=f"bootstrap replicates of the paired intervals (default: {BOOTSTRAP_REPLICATES})")
    args = parser.parse_args(argv)
    problem = (f"{args.folder} is not a folder" if not args.folder.is_dir() else
               f"{args.folder} holds no run (no results.json, config.yaml or .hydra/ under it)"
               if scan(args.folder) == ([], []) else None)
    if problem:
        print(f"kdlab: error: {problem}; pass the output folder of a run or sweep (e.g. outputs/multirun/<experiment>)",
              file=sys.stderr)
        sys.exit(2)
    if args.bootstrap < 100:
        print(f"kdlab: error: --bootstrap {args.bootstrap} is too few replicates for a 95% interval; use at least "
              f"1000 (default {BOOTSTRAP_REPLICATES})", file=sys.stderr)
        sys.exit(2)
    try:
        print(build_report(args.folder, args.out or args.folder, args.metric, args.baseline, args.bootstrap), end="")
    except (ReportError, DiskFull) as err:
        print(f"kdlab: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
