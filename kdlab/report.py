"""Aggregate finished runs into the tables of the seed papers: ``python -m kdlab.report <folder>``.

Walks ``<folder>`` for ``results.json`` (format in docs/DESIGN.md) and writes to ``--out``
(default ``<folder>``):

- ``report.md`` (also printed): one table per (experiment, training dataset). Rows are methods grouped
  by student, plus a ``teacher`` row; columns are the evaluation datasets, ``AVG`` and the mean
  training time. A cell is ``mean ± std (n)`` of ``eval.<model>.<dataset>.<metric>`` over the n runs
  (seeds). std is the sample standard deviation (ddof=1), as the papers report over 5 seeds; with
  one run it is undefined and printed as ``-`` (empty in the CSV). ``AVG`` is, per run, the mean
  over the table's datasets, then mean ± std over the runs that evaluated all of them.
- ``report.csv``: the same numbers in long form (one row per cell).
- ``curves_<table>.png``: validation metric (``valid/<metric>`` in ``metrics.jsonl``) over training
  steps, mean over seeds per method; ``unc_<table>_<dataset>.png``: per UNC bucket, the mean std,
  KL and TOP-1 agreement per method when the results carry ``unc_buckets`` (OKD Eqs. 3-4).
- a "Missing/failed runs" section: run directories (``.hydra/`` or ``config.yaml``) without
  ``results.json``, and results whose ``status`` is not ``completed``. They are never averaged in.

A folder that does not exist, or holds no run at all, is an error (exit status 2, one line), not an
empty report.

Methods are labelled ``method (divergence)`` when the run names a divergence, followed by the run's
other command-line overrides (results.json ``run.overrides``, e.g. ``[method.lora_layers=null]``) so
that the points of an ablation grid get a row each; overrides that do not change what is trained or
measured (``hardware``, ``logger``, ``hydra``, ``output_dir``) and those the table already shows
(``divergence``, ``dataset``, ``teacher``) are left out of the label.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kdlab.checkpoint import DiskFull, atomic_file, atomic_write_text

# Folders a run writes that are never run directories themselves.
SKIP_DIRS = {".hydra", "wandb", "checkpoints", "student", "student_best", "__pycache__"}
METHOD_ORDER = ["sft", "kd", "seqkd", "imitkd", "gkd", "minillm", "dpkd", "okd"]
UNC_FIELDS = (("std", "std"), ("kl", "KL"), ("top1", "TOP-1 agreement"))
UNLABELLED = re.compile(r"^(hardware|logger|hydra|output_dir|divergence|dataset|teacher)([./=]|$)")


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

    @property
    def label(self) -> str:
        method, div = self.meta.get("method"), self.meta.get("divergence")
        label = f"{method} ({div})" if div else str(method)
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

    def __str__(self) -> str:
        if not self.values:
            return "-"
        std = "-" if math.isnan(self.std) else f"{self.std:.2f}"
        return f"{self.mean:.2f} ± {std} ({len(self.values)})"


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
                runs.append(Run(run_dir, meta, results.get("eval", {})))
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


def plot_unc(rows: list[Row], dataset: str, title: str, out: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # series[label][bucket][field] -> values over runs
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
    if not series:
        return False
    all_buckets = sorted({b for buckets in series.values() for b in buckets}, key=str)
    width = 0.8 / len(series)
    fig, axes = plt.subplots(1, len(UNC_FIELDS), figsize=(4.5 * len(UNC_FIELDS), 4))
    for ax, (name, nice) in zip(axes, UNC_FIELDS):
        for i, (label, buckets) in enumerate(series.items()):
            values = [buckets.get(b, {}).get(name, []) for b in all_buckets]
            means = [statistics.fmean(v) if v else math.nan for v in values]
            errs = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(all_buckets))]
            ax.bar(xs, means, width, yerr=errs, label=label, capsize=2)
        ax.set_xticks(range(len(all_buckets)), [str(b) for b in all_buckets])
        ax.set(xlabel="UNC bucket", title=nice)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
    return True


def save_figure(fig, out: Path) -> None:
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=120, format=out.suffix[1:])


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in body]


CSV_FIELDS = ["experiment", "train_dataset", "teacher", "student", "method", "eval_dataset", "metric",
              "mean", "std", "n", "train_time_s"]
PROBLEM_FIELDS = ["method", "divergence", "student", "seed", "dataset", "status"]


def _table(key: tuple, runs: list[Run], metric: str, out: Path, csv_rows: list[dict]) -> list[str]:
    """Markdown (table + plot links) of one (experiment, training dataset); appends to ``csv_rows``."""
    experiment, train_set = key
    datasets = sorted({d for r in runs for model in ("student", "teacher") for d in r.eval.get(model, {})})
    rows = table_rows(runs)
    body = []
    for row in rows:
        cells = row_cells(row, datasets, metric)
        seconds = train_time(row)
        body.append([row.teacher, row.student, row.method, *map(str, cells.values()),
                     "-" if math.isnan(seconds) else f"{seconds:.0f}"])
        for dataset, cell in cells.items():
            csv_rows.append({
                "experiment": experiment, "train_dataset": train_set, "teacher": row.teacher,
                "student": row.student, "method": row.method, "eval_dataset": dataset, "metric": metric,
                "mean": cell.mean if cell.values else "",
                "std": "" if math.isnan(cell.std) or not cell.values else cell.std,
                "n": len(cell.values), "train_time_s": "" if math.isnan(seconds) else seconds,
            })
    md = [f"## experiment `{experiment}` · trained on `{train_set}`", ""]
    md += _md_table(["teacher", "student", "method", *datasets, "AVG", "train time (s)"], body) + [""]
    name = _slug(experiment, train_set)
    curve_png = out / f"curves_{name}.png"
    if plot_curves(rows, f"valid/{metric}", f"valid/{metric} · {experiment} · {train_set}", curve_png):
        md += [f"![validation curves]({curve_png.name})", ""]
    for dataset in datasets:
        unc_png = out / f"unc_{name}_{_slug(dataset)}.png"
        if plot_unc(rows, dataset, f"UNC buckets · {dataset} · trained on {train_set}", unc_png):
            md += [f"![UNC buckets on {dataset}]({unc_png.name})", ""]
    return md


def build_report(folder: Path, out: Path, metric: str = "rougeL") -> str:
    """Write report.md, report.csv and the plots into ``out``; return the markdown."""
    folder, out = Path(folder), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs, problems = scan(folder)
    md = [f"# kdlab report: `{metric}`", "",
          f"Runs under `{folder}`: {len(runs)} completed, {len(problems)} missing/failed.",
          "Cells: mean ± sample std (ddof=1) over runs (n); std `-` with one run. "
          "AVG: per-run mean over the table's datasets, then mean ± std. Train time: mean seconds.", ""]
    tables: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        tables[run.table].append(run)
    csv_rows: list[dict] = []
    for key in sorted(tables, key=str):
        md += _table(key, tables[key], metric, out, csv_rows)

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
    args = parser.parse_args(argv)
    problem = (f"{args.folder} is not a folder" if not args.folder.is_dir() else
               f"{args.folder} holds no run (no results.json, config.yaml or .hydra/ under it)"
               if scan(args.folder) == ([], []) else None)
    if problem:
        print(f"kdlab: error: {problem}; pass the output folder of a run or sweep (e.g. outputs/multirun/<experiment>)",
              file=sys.stderr)
        sys.exit(2)
    try:
        print(build_report(args.folder, args.out or args.folder, args.metric), end="")
    except DiskFull as err:
        print(f"kdlab: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
